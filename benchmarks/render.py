"""Render pytest-benchmark JSON files into a markdown table and a PNG plot for the README.

    python benchmarks/render.py train_step.json sampler.json --md benchmarks.md --png benchmarks.png

Each benchmark's provider comes from ``extra_info["provider"]`` (or its ``provider`` parameter); within
a group (same file, same ``group``) the ratio is the baseline's median over the provider's median, so
2.00x means twice as fast as the baseline: the ``reference`` provider where a group has one (the plain step
the training benchmark compares against), else ``eager``. The hardware line names the device recorded in ``extra_info``
(the GPU on CUDA) and the CPU, Python and date from pytest-benchmark's ``machine_info``. Without
``--md`` the table goes to stdout; the plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

EXTRA_COLUMNS = [  # (extra_info key, column title, format)
    ("images_per_s", "images/s", "{:.2f}"),
    ("peak_mem_mb", "peak memory (MB)", "{:.0f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("first_call_s", "first call (s)", "{:.2f}"),
    ("prepare_s", "compile/capture (s)", "{:.2f}"),
]
BASELINES = ("reference", "eager")  # in order of preference


def load(paths: list[Path]) -> list[dict]:
    """One record per benchmark: file, hardware, group, provider, median (s) and extra_info."""
    records = []
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            extra = bench.get("extra_info", {})
            params = bench.get("params") or {}
            records.append(
                {
                    "file": path.name,
                    "hardware": hardware(machine, extra, data.get("datetime", "")),
                    "group": bench.get("group") or bench["name"],
                    "provider": str(extra.get("provider", params.get("provider", bench["name"]))),
                    "median": bench["stats"]["median"],
                    "extra": extra,
                }
            )
    return records


def hardware(machine: dict, extra: dict, when: str) -> str:
    """'device · CPU (cores) · Python · date' from the JSON's machine_info and the benchmark's extra_info."""
    cpu = machine.get("cpu", {})
    cpu_name = cpu.get("brand_raw") or machine.get("processor") or machine.get("machine", "?")
    cores = cpu.get("count")
    parts = []
    device = extra.get("device")
    if device and device != cpu_name and device != "cpu":
        parts.append(device)
    parts.append(f"{cpu_name} ({cores} cores)" if cores else cpu_name)
    if "torch" in extra:
        parts.append(f"torch {extra['torch']}")
    parts.append(f"Python {machine.get('python_version', '?')}")
    if when:
        parts.append(when[:10])
    return " · ".join(parts)


def with_ratios(records: list[dict]) -> list[dict]:
    """Add ``ratio`` = baseline median / median within each (file, group); None without a baseline run."""
    baseline = {}
    for name in reversed(BASELINES):  # the preferred baseline overwrites the other
        for r in records:
            if r["provider"] == name:
                baseline[(r["file"], r["group"])] = r["median"]
    for r in records:
        base = baseline.get((r["file"], r["group"]))
        r["ratio"] = base / r["median"] if base else None
    return records


def format_time(seconds: float) -> str:
    """A duration as the tables show it: s, ms or µs."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def markdown(records: list[dict]) -> str:
    """Markdown: one table per hardware line, rows grouped by benchmark group, providers in file order."""
    by_hardware: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_hardware[r["hardware"]].append(r)
    out = []
    for hw, rows in by_hardware.items():
        extras = [c for c in EXTRA_COLUMNS if any(c[0] in r["extra"] for r in rows)]
        header = ["group", "provider", "median", "vs baseline"] + [title for _, title, _ in extras]
        out.append(f"**Hardware:** {hw}\n")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for r in rows:
            cells = [r["group"], r["provider"], format_time(r["median"]), f"{r['ratio']:.2f}x" if r["ratio"] else "–"]
            for key, _, fmt in extras:
                value = r["extra"].get(key)
                cells.append(fmt.format(value) if isinstance(value, (int, float)) else "–")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(records: list[dict], path: Path) -> None:
    """Grouped horizontal bars of the speed-up over eager, one bar per provider, one row per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["file"], r["group"]) for r in records))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    ratio = {(r["file"], r["group"], r["provider"]): r["ratio"] for r in records}
    height = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(groups) * max(1, len(providers) / 2)))
    for j, provider in enumerate(providers):
        ys, xs = [], []
        for i, key in enumerate(groups):
            value = ratio.get((*key, provider))
            if value is not None:
                ys.append(i + (j - (len(providers) - 1) / 2) * height)
                xs.append(value)
        bars = ax.barh(ys, xs, height=height, label=provider)
        ax.bar_label(bars, labels=[f"{x:.2f}x" for x in xs], fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    top = max((r["ratio"] for r in records if r["ratio"] is not None), default=1.0)
    ax.set_xlim(0, max(top, 1.0) * 1.2)  # room for the bar labels
    ax.set_yticks(range(len(groups)), [g for _, g in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"speed-up over the baseline ({' or '.join(BASELINES)}; median time ratio)")
    hardware_lines = sorted({r["hardware"] for r in records})
    ax.set_title("\n".join(hardware_lines), fontsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--md", type=Path, help="write the markdown table here (default: stdout)")
    parser.add_argument("--png", type=Path, help="write the speed-up plot here")
    args = parser.parse_args(argv)
    records = with_ratios(load(args.json))
    if not records:
        parser.error("no benchmarks in the given files (were they run with --benchmark-enable?)")
    table = markdown(records)
    if args.md:
        args.md.write_text(table)
    else:
        sys.stdout.write(table)
    if args.png:
        plot(records, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
