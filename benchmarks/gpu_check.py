"""The Python half of ``benchmarks/gpu_check.sh``: the environment probe, the wheel install, the summary.

    python benchmarks/gpu_check.py env                       # GPU, versions, packages, compiler, imports
    python benchmarks/gpu_check.py install WHEELS TARGET     # wheels of packages not already importable
    python benchmarks/gpu_check.py summary WORK OUT          # OUT/summary.md, benchmarks.md, results.json, logs.tar.gz

``summary`` reads what the script left in WORK (``steps.tsv``, ``logs/*.log``, ``json/*.json``) and turns
it into the numbers the check exists for: the fused kernels' bandwidth as a share of the card's own copy
bandwidth, the training step against the plain reference step (s/step, images/s, TFLOP/s, MFU), the
sampler's CUDA graphs against eager and against ``torch.compile(mode="reduce-overhead")``, the attention
backends, and the CUDA-only tests with every skip named. It writes four files: the GPU machine returns at
most eight.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402

OPTIONAL = ("deepspeed", "diffusers", "nvidia.dali", "flash_attn", "xdist")
NO_CUDA = "no CUDA device"


# -- env ---------------------------------------------------------------------------------------------------


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported; False also when a parent package (``nvidia``) is missing."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def package_state(name: str) -> str:
    """``missing``, its version once imported, or ``broken (the error)``: a carried wheel can lack a dependency."""
    if not has_module(name):
        return "missing"
    try:
        module = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001  (what broke is the answer)
        return f"broken ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return str(getattr(module, "__version__", "yes"))


def compiler() -> str:
    """The C compiler Triton builds its launcher with on the first launch, or why there is none."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return "missing (Triton needs gcc or cc to build its launcher)"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"{cc} ({version[0] if version else 'version unknown'})"


def env() -> int:
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else NO_CUDA
    print(f"gpu: {gpu}")
    print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); Triton {triton.__version__}")
    print(f"python: {platform.python_version()} ({sys.executable})")
    print("packages: " + ", ".join(f"{n} {package_state(n)}" for n in OPTIONAL))
    print(f"compiler: {compiler()}")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    print(f"Python.h: {'yes' if headers.exists() else 'missing'} ({headers})")
    try:
        import dfm.kernels
        import dfm.launch

        import dfm
    except Exception as err:  # noqa: BLE001  (one line, whatever broke)
        print(f"imports: failed: {type(err).__name__}: {err}")
        return 1
    print(f"imports: ok (dfm from {Path(dfm.__file__).parent}, dfm.kernels, dfm.launch)")
    return 0


# -- install -----------------------------------------------------------------------------------------------


def _dist(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def _installed(wheel: Path) -> bool:
    """Whether the machine already has this wheel's distribution at this wheel's version."""
    try:
        return importlib.metadata.version(_dist(wheel)) == wheel.name.split("-")[1]
    except importlib.metadata.PackageNotFoundError:
        return False


def install(wheels: Path, target: Path) -> int:
    """Install into ``target`` the wheels in ``wheels`` that the machine lacks or has at another version (the
    versions the suite passes with, ahead of the machine's own on the path)."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        print(f"wheels: none in {wheels} (steps needing deepspeed or diffusers skip; gpu_wheels.sh makes them)")
        return 0
    needed = [w for w in found if not _installed(w)]
    kept = sorted({_dist(w) for w in found} - {_dist(w) for w in needed})
    if needed:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target", str(target)]
        subprocess.run(cmd + [str(w) for w in needed], check=True)
    installed = ", ".join(_dist(w) for w in needed) or "none"
    print(f"wheels: installed {installed}; already there: {', '.join(kept) or 'none'}")
    return 0


# -- summary -----------------------------------------------------------------------------------------------


def read_steps(work: Path) -> list[dict]:
    lines = (work / "steps.tsv").read_text().splitlines()[1:] if (work / "steps.tsv").exists() else []
    return [dict(zip(("step", "status", "seconds", "limit"), line.split("\t"))) for line in lines]


def read_env(work: Path) -> dict[str, str]:
    log = work / "logs" / "environment.log"
    text = log.read_text() if log.exists() else ""
    return dict(line.split(": ", 1) for line in text.splitlines() if re.match(r"^[\w.]+: ", line))


def pytest_outcome(log: Path) -> dict:
    """Counts from pytest's closing line, and the skip, failure and error lines of its short summary."""
    text = log.read_text(errors="replace") if log.exists() else ""
    counts = {}
    closing = [line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error)", line)]
    if closing:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", closing[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
    return {
        "counts": counts,
        "collecting": len(re.findall(r"^_+ ERROR collecting ", text, flags=re.M)),
        "skips": re.findall(r"^SKIPPED \[(\d+)\] (.+)$", text, flags=re.M),
        "failures": re.findall(r"^(?:FAILED|ERROR) (.+)$", text, flags=re.M),
        "interrupted": "KeyboardInterrupt" in text,
    }


def _gbps(record: dict) -> float | None:
    nbytes = record["extra"].get("bytes")
    return nbytes / record["median"] / 1e9 if nbytes else None


def _fmt(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def kernel_section(records: list[dict]) -> list[str]:
    copies = [r for r in records if r["group"].startswith("device copy")]
    copy = max((_gbps(r) for r in copies), default=None)
    out = ["## Pyramid and noising kernels against the card's copy bandwidth", ""]
    if copy is None:
        return out + ["No copy measurement (the kernels step did not run or was cut short).", ""]
    out += [f"Device-to-device copy: **{copy:.0f} GB/s** (read + write, measured in the same step).", ""]
    fast = "triton" if any(r["provider"] == "triton" for r in records) else "eager"
    rows = []
    for r in records:
        if r["provider"] != fast or r["group"].startswith("device copy") or _gbps(r) is None:
            continue
        gbps = _gbps(r)
        rows.append([r["group"], r["provider"], render.format_time(r["median"]), f"{gbps:.0f}", f"{gbps / copy:.0%}",
                     _fmt(r["ratio"], "{:.2f}x")])  # fmt: skip
    return out + _table(["kernel", "provider", "median", "GB/s", "share of copy", "vs eager"], rows)


def provider_section(title: str, records: list[dict], group_prefix: str, columns: list[tuple[str, str, str]]):
    rows = []
    for r in records:
        if r["group"].startswith(group_prefix):
            cells = [r["group"], r["provider"], render.format_time(r["median"]), _fmt(r["ratio"], "{:.2f}x")]
            rows.append(cells + [_fmt(r["extra"].get(key), fmt) for key, _, fmt in columns])
    header = ["case", "provider", "median", "vs baseline"] + [title for _, title, _ in columns]
    return [f"## {title}", ""] + (_table(header, rows) if rows else ["Not measured (see the steps above).", ""])


def graph_verdict(records: list[dict]) -> list[str]:
    """Whether the hand-captured CUDA graphs beat torch's reduce-overhead in the same run: they stay only if so."""
    by = {r["provider"]: r["median"] for r in records if r["group"].startswith("sampler")}
    if not by:
        return []
    if "cudagraph" not in by or "reduce-overhead" not in by:
        missing = " and ".join(p for p in ("cudagraph", "reduce-overhead") if p not in by)
        return [f"No verdict on the hand-captured CUDA graphs: {missing} did not finish (see the sampler log).", ""]
    ratio = by["reduce-overhead"] / by["cudagraph"]
    verdict = "keep their place" if ratio > 1 else "lose: replace them with torch.compile(mode='reduce-overhead')"
    return [f"Hand-captured CUDA graphs vs torch's reduce-overhead: **{ratio:.2f}x** — they {verdict}.", ""]


def tests_section(work: Path) -> list[str]:
    out = ["## CUDA-only tests", ""]
    for name in ("cuda_tests", "cuda_compile_tests"):
        log = work / "logs" / f"{name}.log"
        if not log.exists():
            continue
        result = pytest_outcome(log)
        counts = ", ".join(f"{n} {what}" for what, n in result["counts"].items()) or "no closing line"
        errors = f"errors: {result['counts'].get('errors', 0)} ({result['collecting']} of them collecting)"
        out.append(f"- `{name}`: {counts}; {errors}" + (" (interrupted)" if result["interrupted"] else ""))
        out += [f"  - failed: {line}" for line in result["failures"]]
        out += [f"  - skipped {n}: {reason}" for n, reason in result["skips"]]
    return out + [""]


def summary(work: Path, out: Path, seconds: int | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    steps, environment = read_steps(work), read_env(work)
    paths = sorted((work / "json").glob("*.json"))
    paths = [p for p in paths if p.stat().st_size > 0]
    records = render.with_ratios(render.load(paths)) if paths else []
    gpu = environment.get("gpu", "unknown (the environment step failed)")

    merged = {"environment": environment, "steps": steps, "files": {}}
    for path in paths:
        merged["files"][path.name] = json.loads(path.read_text())
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    (out / "benchmarks.md").write_text(render.markdown(records) if records else "No benchmark rows.\n")

    lines = [f"# GPU check: {gpu}", ""]
    if gpu == NO_CUDA:
        lines += [f"**{NO_CUDA}**: a dry run. The rows below are CPU timings, not GPU numbers.", ""]
    lines += [f"- {key}: {value}" for key, value in environment.items() if key != "gpu"]
    total = f"{seconds} s in all" if seconds is not None else ""
    lines += ["", f"## Steps ({total})", ""]
    lines += _table(
        ["step", "status", "seconds", "limit (s)"], [[s["step"], s["status"], s["seconds"], s["limit"]] for s in steps]
    )
    lines += kernel_section(records)
    train = [("batch", "batch", "{}"), ("images_per_s", "images/s", "{:.1f}"), ("tflops", "TFLOP/s", "{:.1f}"),
             ("mfu", "MFU", "{:.1%}"), ("peak_mem_mb", "peak memory (MB)", "{:.0f}"),
             ("first_call_s", "first step (s)", "{:.1f}")]  # fmt: skip
    lines += provider_section("Training step (engine vs the plain reference step)", records, "train_step", train)
    sampler = [
        ("images_per_s", "images/s", "{:.1f}"),
        ("nfe", "NFE", "{}"),
        ("prepare_s", "compile/capture (s)", "{:.1f}"),
    ]
    lines += provider_section("Sampler (eager, CUDA graphs, torch.compile)", records, "sampler", sampler)
    lines += graph_verdict(records)
    lines += provider_section("Attention backends (fwd+bwd)", records, "attention", [("tflops", "TFLOP/s", "{:.1f}")])
    lines += tests_section(work)
    (out / "summary.md").write_text("\n".join(lines))

    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for log in sorted((work / "logs").glob("*.log")):
            tar.add(log, arcname=f"logs/{log.name}")
    print(f"summary: {out / 'summary.md'}; {len(records)} benchmark rows from {len(paths)} files")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    p_install = sub.add_parser("install")
    p_install.add_argument("wheels", type=Path)
    p_install.add_argument("target", type=Path)
    p_summary = sub.add_parser("summary")
    p_summary.add_argument("work", type=Path)
    p_summary.add_argument("out", type=Path)
    p_summary.add_argument("--seconds", type=int)
    args = parser.parse_args(argv)
    if args.command == "env":
        return env()
    if args.command == "install":
        return install(args.wheels, args.target)
    return summary(args.work, args.out, args.seconds)


if __name__ == "__main__":
    raise SystemExit(main())
