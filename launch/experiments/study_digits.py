"""The digits study: DFM-SiT vs the SiT flow-matching baseline at equal training steps and equal sampling NFE,
over several training seeds.

    dfm study-digits --out runs/study-digits                      # 3 seeds, both configs, plot and table
    dfm study-digits --out runs/study-digits --jobs 2             # two trainings at a time (one thread each)
    dfm study-digits --out runs/study-smoke --steps 4 --every 2 --samples 20 --nfe 5 --seeds 0 \\
        arch.depth=2 arch.hidden_size=64 arch.num_heads=2 train.global_batch_size=8 sample.per_class=1

Trains ``configs/dfm_digits.yaml`` and ``configs/sit_digits.yaml`` once per ``--seeds`` entry (the config's
``seed``: initial weights, data order and training noise) for the same number of steps (same backbone, batch,
optimizer and data; a run directory that already holds the final checkpoint is reused, a partial one is
resumed), keeping a checkpoint every ``--every`` steps. Every checkpoint's EMA weights then sample
``--samples`` digits with balanced labels (index ``i`` gets class ``i % 10`` and noise from ``(--seed, i)``, the
same draws for every model) with the same number of function evaluations: SiT takes ``--nfe`` Euler steps, DFM
splits them over its stages in its config's proportions. Each set is scored with
``dfm.evaluation.digits.digit_scores``: the Fréchet distance of the digits classifier's features to all 1,797
real digits (lower is better), the fraction of samples the classifier assigns to their requested class
(higher is better) and the fine-band energy ratio to the real digits (1 is best). ``--samples`` real digits
give the floor of the FD at that sample count.

Writes ``<out>/study.json`` (every number, the settings, timings; evaluations already in it are reused when
the settings match), ``<out>/study.md`` (the table: mean ± standard deviation over the seeds) and
``<out>/study.png`` (each metric against the training step, mean and a band of ± one standard deviation).
``key=value`` overrides apply to both configs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from dfm.launch.train import run as train_run

from dfm import checkpoint
from dfm.config import Config, ConfigError, load_config
from dfm.data.digits import load_digits_tensor
from dfm.evaluation.digits import NUM_CLASSES, digit_scores
from dfm.evaluation.training import eval_samples
from dfm.files import write_json_atomic
from dfm.pretrained import load_pretrained, pretrained_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODELS = ("dfm", "sit")
NAMES = {"dfm": "DFM-SiT", "sit": "SiT"}
METRICS = {"fd": "FD", "accuracy": "acc", "fine_band_ratio": "fine-band ratio"}
# Keys that schedule work around training without changing the weights (the study evaluates by itself).
SCHEDULE_KEYS = {"max_steps", "ckpt_every", "keep_ckpts", "sample_every", "log_every", "eval_every", "eval_samples"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="study_digits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/study-digits", help="study folder: the runs, study.json, .md and .png")
    p.add_argument("--dfm-config", default=str(CONFIGS / "dfm_digits.yaml"))
    p.add_argument("--sit-config", default=str(CONFIGS / "sit_digits.yaml"))
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (one run per model each)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the configs')")
    p.add_argument("--every", type=int, default=500, help="evaluate a checkpoint every this many steps")
    p.add_argument("--samples", type=int, default=500, help="generated digits per evaluation")
    p.add_argument("--nfe", type=int, default=50, help="model evaluations per sample, for both models")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the evaluations (the same for every run)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per sampling batch")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once, each a `dfm train` process")
    p.add_argument(
        "--cache-dir", default=None, help="digits classifier cache (default: $DFM_CACHE_DIR or ~/.cache/dfm)"
    )
    p.add_argument("--eval-only", action="store_true", help="do not train; evaluate the checkpoints that exist")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if min(args.every, args.samples, args.nfe, args.batch_size, args.jobs) < 1 or (
        args.steps is not None and args.steps < 1
    ):
        p.error("--steps, --every, --samples, --nfe, --batch-size and --jobs must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (a Fréchet distance needs a covariance)")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    return args


def split_nfe(steps: list[int], nfe: int) -> list[int]:
    """``nfe`` steps split over the stages in the proportions of ``steps`` (largest remainder, >= 1 each)."""
    if nfe < len(steps):
        raise ConfigError(f"--nfe {nfe} is below one step per stage ({len(steps)} stages)")
    total = sum(steps)
    exact = [n * nfe / total for n in steps]
    out = [max(1, int(e)) for e in exact]
    order = sorted(range(len(steps)), key=lambda s: exact[s] - int(exact[s]), reverse=True)
    i = 0
    while sum(out) < nfe:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > nfe:  # only when the minimum of 1 pushed a stage up
        s = max(range(len(out)), key=lambda s: out[s])
        out[s] -= 1
    return out


def run_overrides(args: argparse.Namespace, path: str, seed: int) -> list[str]:
    """The overrides of one study run: the user's, then the study's schedule, seed and run name."""
    base = load_config(path, args.overrides)
    steps = args.steps or base.train.max_steps
    keep = steps // args.every + 2  # every evaluated checkpoint survives pruning
    return list(args.overrides) + [
        f"output_dir={args.out}", f"exp_name={base.exp_name}-seed{seed}", f"seed={seed}",
        f"train.max_steps={steps}", f"train.ckpt_every={args.every}", f"train.keep_ckpts={keep}",
        "train.eval_every=0",
    ]  # fmt: skip


def study_runs(args: argparse.Namespace) -> dict[tuple[str, int], tuple[Config, list[str]]]:
    """Every (model, seed) run: its config and the overrides that made it; equal steps and batch are enforced."""
    runs = {}
    for m, path in (("dfm", args.dfm_config), ("sit", args.sit_config)):
        for seed in args.seeds:
            overrides = run_overrides(args, path, seed)
            runs[m, seed] = (load_config(path, overrides), overrides)
    dfm, sit = runs["dfm", args.seeds[0]][0], runs["sit", args.seeds[0]][0]
    if dfm.train.max_steps != sit.train.max_steps:
        raise ConfigError("the two configs train for different steps; pass --steps")
    if dfm.train.global_batch_size != sit.train.global_batch_size:
        raise ConfigError("the two configs use different batch sizes; equal training compute needs the same")
    return runs


def sampling_overrides(cfg: Config, nfe: int) -> list[str]:
    """Overrides giving ``cfg`` an ODE sampler with exactly ``nfe`` model evaluations (no CFG: cfg_scale 1)."""
    steps = split_nfe(cfg.steps_per_stage(), nfe)
    return ["sample.mode=ode", "sample.method=euler", "sample.cfg_scale=1.0", f"sample.num_steps_per_scale={steps}"]


def _weights_keys(cfg_dict: dict) -> dict:
    """A run config without the keys that only schedule training or sampling (and the measured statistics)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("sample", "output_dir")}
    out["train"] = {k: v for k, v in cfg_dict["train"].items() if k not in SCHEDULE_KEYS}
    out["dfm"] = {k: v for k, v in cfg_dict["dfm"].items() if k != "stage_rms"}  # measured when a run starts
    return out


def needs_training(cfg: Config) -> bool:
    """Whether ``cfg``'s run lacks its final checkpoint; a folder trained with another config is refused."""
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file():
        before = _weights_keys(yaml.safe_load(saved.read_text()))
        if before != _weights_keys(cfg.to_dict()):
            raise ConfigError(f"{cfg.run_dir} was trained with another config; use another --out or delete it")
    latest = checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints")
    return latest is None or int(latest.name) < cfg.train.max_steps


def train_in_process(cfg: Config) -> float:
    """Train ``cfg`` to ``train.max_steps`` here (resuming a partial run); returns the seconds spent."""
    tic = time.perf_counter()
    resume = has_checkpoint(cfg)  # else an interrupted start may have left outputs: nothing in them to keep
    train_run(cfg, resume=resume, overwrite=not resume)
    return time.perf_counter() - tic


def has_checkpoint(cfg: Config) -> bool:
    """Whether the run has a checkpoint to continue (``--resume`` refuses a run with nothing to resume)."""
    return checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints") is not None


def train_subprocess(config_path: str, overrides: list[str], log: Path, resume: bool) -> float:
    """Train one run as a ``dfm train --resume|--overwrite`` process (its output in ``log``); returns the seconds
    spent. ``needs_training`` has checked the folder's config, so without a checkpoint there is nothing to keep.

    One thread per process unless ``OMP_NUM_THREADS`` says otherwise: on a 2-core machine two single-thread
    trainings finish sooner than two that each ask for both cores.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # each its own one-rank group
        env.pop(key, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dfm.launch.cli", "train", "--config", config_path, *overrides]
    cmd += ["--resume"] if resume else ["--overwrite"]  # no checkpoint: what an interrupted start left goes
    tic = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"training failed (exit {done.returncode}); see {log}: {tail[0]}")
    return time.perf_counter() - tic


def train_all(args: argparse.Namespace, runs: dict) -> dict[tuple[str, int], float]:
    """Train every run that lacks its final checkpoint, ``--jobs`` at a time; seconds per trained run."""
    todo = [key for key, (cfg, _) in runs.items() if needs_training(cfg)]
    paths = {"dfm": args.dfm_config, "sit": args.sit_config}
    if args.jobs == 1:
        return {key: train_in_process(runs[key][0]) for key in todo}
    logs = Path(args.out) / "logs"
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            key: pool.submit(
                train_subprocess,
                paths[key[0]],
                runs[key][1],
                logs / f"{runs[key][0].exp_name}.log",
                has_checkpoint(runs[key][0]),
            )
            for key in todo
        }
        return {key: f.result() for key, f in futures.items()}


def checkpoints(cfg: Config, every: int) -> list[Path]:
    """The run's checkpoints at multiples of ``every`` (and the final one), oldest first."""
    root = cfg.run_dir / "checkpoints"
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    steps = cfg.train.max_steps
    return [p for p in found if int(p.name) <= steps and (int(p.name) % every == 0 or int(p.name) == steps)]


def evaluate(ckpt: Path, overrides: list[str], samples: int, seed: int, batch_size: int, cache_dir: str | None) -> dict:
    """Sample ``samples`` digits from the EMA weights of ``ckpt`` with the sampling ``overrides`` and score them."""
    cfg = pretrained_config(ckpt, overrides=overrides)
    model = load_pretrained(ckpt, cfg=cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tic = time.perf_counter()
    x, y = eval_samples(model, cfg, count=samples, seed=seed, batch=batch_size)
    sample_s = time.perf_counter() - tic
    scores = digit_scores(x, y, cfg.data.resolution, cache_dir)
    return dict(scores, steps_per_stage=cfg.steps_per_stage(), sample_s=round(sample_s, 2))


def real_floor(resolution: int, samples: int, seed: int, cache_dir: str | None) -> dict:
    """Scores of ``samples`` real digits, balanced over the classes like the generated sets (a seeded choice per
    class): what the data itself scores at this sample count. A random subset would also pay for its class
    imbalance, which balanced samples do not (500 random digits: FD 6.60)."""
    x, y = load_digits_tensor(resolution)
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(y == c).flatten() for c in range(NUM_CLASSES)]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    # index i takes class i % 10, as the generated sets do
    count = min(samples, NUM_CLASSES * min(len(idx) for idx in per_class))
    idx = torch.stack([per_class[i % NUM_CLASSES][i // NUM_CLASSES] for i in range(count)])
    return digit_scores(x[idx], y[idx], resolution, cache_dir)


# -- aggregation over seeds ------------------------------------------------------------------------------------


def curves(study: dict) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
    """``{model: {metric: {step: (mean, std over seeds)}}}`` for the steps every seed of both models has."""
    seeds = study["settings"]["seeds"]
    evals = {m: [study["runs"][f"{m}-seed{s}"]["evals"] for s in seeds] for m in MODELS}
    steps = sorted(set.intersection(*(set(map(int, e)) for m in MODELS for e in evals[m])))
    out = {}
    for m in MODELS:
        out[m] = {}
        for metric in METRICS:
            out[m][metric] = {}
            for step in steps:
                values = [e[str(step)][metric] for e in evals[m]]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                out[m][metric][step] = (statistics.fmean(values), spread)
    return out


def first_match(steps: list[int], fd: dict[int, float], target: float) -> int | None:
    """The first training step whose FD is at or below ``target``."""
    return next((s for s in steps if fd[s] <= target), None)


def crossing(steps: list[int], fd: dict[int, float], target: float) -> float | None:
    """The step where ``fd`` first reaches ``target``, interpolated linearly in log FD between the evaluated steps
    around it (FD falls roughly exponentially late in training); None if it never does."""
    hit = first_match(steps, fd, target)
    if hit is None or hit == steps[0]:
        return hit
    before = steps[steps.index(hit) - 1]
    a, b = math.log(fd[before]), math.log(fd[hit])
    return before + (hit - before) * (a - math.log(target)) / (a - b) if a != b else float(hit)


def step_ratio(study: dict) -> dict:
    """DFM's steps to reach SiT's final FD, as a share of SiT's steps: from the seed-mean curves and per seed."""
    c = curves(study)
    steps = sorted(c["dfm"]["fd"])
    if not steps:
        return {}
    final = steps[-1]
    target = c["sit"]["fd"][final][0]
    mean_fd = {s: c["dfm"]["fd"][s][0] for s in steps}
    at = first_match(steps, mean_fd, target)
    between = crossing(steps, mean_fd, target)
    per_seed = {}
    for seed in study["settings"]["seeds"]:
        dfm = {int(k): v["fd"] for k, v in study["runs"][f"dfm-seed{seed}"]["evals"].items()}
        sit = {int(k): v["fd"] for k, v in study["runs"][f"sit-seed{seed}"]["evals"].items()}
        hit = first_match(steps, dfm, sit[final])
        per_seed[str(seed)] = None if hit is None else hit / final
    return {"final_step": final, "sit_final_fd": target, "dfm_step": at, "ratio": None if at is None else at / final,
            "interpolated_step": between, "interpolated_ratio": None if between is None else between / final,
            "per_seed": per_seed}  # fmt: skip


def _cell(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def markdown(study: dict) -> str:
    """The study table (mean ± standard deviation over the seeds) and its reading, as markdown."""
    s = study["settings"]
    c = curves(study)
    steps = sorted(c["dfm"]["fd"])
    batch = s["global_batch_size"]
    lines = [
        f"DFM-SiT vs SiT on the digits ({s['resolution']}x{s['resolution']}, {s['model_dfm']} vs {s['model_sit']}, "
        f"depth {s['depth']}, hidden {s['hidden_size']}), batch {batch}, NFE {s['nfe']} "
        f"(DFM {s['steps_dfm']}, SiT {s['steps_sit']}), {len(s['seeds'])} training seeds ({s['seeds']}), "
        f"{s['samples']} samples per evaluation (balanced labels, sampling seed {s['seed']}), EMA weights. "
        "Each cell: mean ± standard deviation over the seeds. FD: Fréchet distance of the digits-classifier "
        "features to the 1,797 real digits (lower is better); acc: classifier accuracy w.r.t. the requested label; "
        "ratio: standard deviation of the finest Laplacian band over the real digits' (1 is the data's).",
        "",
        "| training step | images seen | DFM FD | SiT FD | DFM acc | SiT acc | DFM ratio | SiT ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for step in steps:
        row = [str(step), str(step * batch)]
        for metric, digits in (("fd", 2), ("accuracy", 3), ("fine_band_ratio", 3)):
            row += [_cell(c[m][metric][step], digits) for m in MODELS]
        lines.append("| " + " | ".join(row) + " |")
    real = study["real"]
    lines.append(
        f"| real digits | | {real['fd']:.2f} | {real['fd']:.2f} | {real['accuracy']:.3f} | {real['accuracy']:.3f} "
        f"| {real['fine_band_ratio']:.3f} | {real['fine_band_ratio']:.3f} |"
    )
    r = study.get("step_ratio") or {}
    if r:
        per_seed = ", ".join(f"seed {k}: " + ("not reached" if v is None else f"{v:.2f}") for k, v in
                             r["per_seed"].items())  # fmt: skip
        reached = f"at step {r['dfm_step']}, {r['ratio']:.2f}x SiT's steps" if r["dfm_step"] else "at no evaluated step"
        lines += [
            "",
            f"DFM's mean FD reaches SiT's final mean FD ({r['sit_final_fd']:.2f} at step {r['final_step']}) {reached} "
            f"(per seed, against that seed's SiT run: {per_seed})"
            + (
                f"; interpolated in log FD between evaluated steps: step {r['interpolated_step']:.0f}, "
                f"{r['interpolated_ratio']:.2f}x."
                if r.get("interpolated_step")
                else "."
            ),
        ]
    for m in MODELS:
        secs = [study["runs"][f"{m}-seed{seed}"].get("train_s") for seed in s["seeds"]]
        if all(secs):
            lines.append(
                f"{NAMES[m]} training: {statistics.fmean(secs):.0f} s per run for {s['max_steps']} steps "
                f"(mean of {len(secs)})."
            )
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> Path:
    """Each metric against the training step: the seed mean and a band of ± one standard deviation per model,
    the real digits' value as a dashed line (matplotlib, from the dev extras)."""
    import matplotlib  # local: a dev extra, needed only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(study)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, label) in zip(axes, METRICS.items()):
        for m, colour in zip(MODELS, ("tab:blue", "tab:orange")):
            steps = sorted(c[m][metric])
            mean = [c[m][metric][s][0] for s in steps]
            std = [c[m][metric][s][1] for s in steps]
            ax.plot(steps, mean, marker="o", color=colour, label=NAMES[m])
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=colour, alpha=0.25)  # fmt: skip
        ax.axhline(study["real"][metric], color="grey", linestyle="--", label=f"{study['settings']['samples']} real")
        ax.set_xlabel("training step")
        ax.set_title(label)
        if metric == "fd":
            ax.set_yscale("log")
    axes[0].legend()
    s = study["settings"]
    fig.suptitle(
        f"digits {s['resolution']}x{s['resolution']}, NFE {s['nfe']}, mean ± std over seeds {s['seeds']}", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = study_runs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = {m: runs[m, args.seeds[0]][0] for m in MODELS}
    nfe_steps = {m: split_nfe(first[m].steps_per_stage(), args.nfe) for m in MODELS}
    settings = {
        "nfe": args.nfe, "samples": args.samples, "seed": args.seed, "seeds": list(args.seeds), "every": args.every,
        "max_steps": first["dfm"].train.max_steps, "global_batch_size": first["dfm"].train.global_batch_size,
        "resolution": first["dfm"].data.resolution, "model_dfm": first["dfm"].model, "model_sit": first["sit"].model,
        "depth": first["dfm"].arch.depth, "hidden_size": first["dfm"].arch.hidden_size,
        "steps_dfm": nfe_steps["dfm"], "steps_sit": nfe_steps["sit"], "overrides": list(args.overrides),
    }  # fmt: skip
    path = out / "study.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    # Evaluations depend on neither the final step count, the interval nor the seed list (constant lr): reusable.
    same = lambda d: {k: v for k, v in d.items() if k not in ("max_steps", "every", "seeds")}
    reuse = same(previous.get("settings", {})) == same(json.loads(json.dumps(settings)))
    trained = {} if args.eval_only else train_all(args, runs)
    study = {"settings": settings, "runs": {}, "real": None}
    for (m, seed), (cfg, _) in runs.items():
        name = f"{m}-seed{seed}"
        before = previous.get("runs", {}).get(name, {}) if reuse else {}
        run = {"run_dir": str(cfg.run_dir), "train_s": trained.get((m, seed)) or before.get("train_s"), "evals": {}}
        study["runs"][name] = run
        for ckpt in checkpoints(cfg, args.every):
            step = str(int(ckpt.name))
            if step in before.get("evals", {}):
                run["evals"][step] = before["evals"][step]
                continue
            scores = evaluate(ckpt, sampling_overrides(cfg, args.nfe), args.samples, args.seed, args.batch_size,
                              args.cache_dir)  # fmt: skip
            run["evals"][step] = scores
            print(
                f"study: {NAMES[m]} seed {seed} step {step}: FD {scores['fd']:.3f}, accuracy "
                f"{scores['accuracy']:.3f}, fine-band ratio {scores['fine_band_ratio']:.3f}",
                flush=True,
            )
            write_json_atomic(path, study)  # an interrupted study keeps the evaluations done so far
    study["real"] = real_floor(settings["resolution"], args.samples, args.seed, args.cache_dir)
    study["step_ratio"] = step_ratio(study)
    write_json_atomic(path, study)
    table = markdown(study)
    (out / "study.md").write_text(table)
    plot(study, out / "study.png")
    print(table)
    return study


if __name__ == "__main__":
    main()
