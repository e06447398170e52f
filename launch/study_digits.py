"""The digits study: DFM-SiT vs the SiT flow-matching baseline at equal training steps and equal sampling NFE.

    python -m dfm.launch.study_digits --out runs/study-digits
    python -m dfm.launch.study_digits --out runs/study-smoke --steps 4 --every 2 --samples 20 --nfe 5 \\
        arch.depth=2 arch.hidden_size=64 arch.num_heads=2 train.global_batch_size=8 sample.per_class=1

Trains ``configs/dfm_digits.yaml`` and ``configs/sit_digits.yaml`` for the same number of steps (same
backbone, batch, optimizer and data; a run directory that already holds the final checkpoint is reused, a
partial one is resumed), keeping a checkpoint every ``--every`` steps. Every checkpoint's EMA weights then
sample ``--samples`` digits with balanced labels (index ``i`` gets class ``i % 10`` and noise from
``(seed, i)``, the same draws for both models) with the same number of function evaluations: SiT takes
``--nfe`` Euler steps, DFM splits them over its stages in its config's proportions (50 = 40 + 10). Each set is
scored with ``dfm.evaluation.digits.digit_scores``: the Fréchet distance of the digits classifier's features
to all 1,797 real digits (lower is better) and the fraction of samples the classifier assigns to their
requested class (higher is better). ``--samples`` real digits give the floor of the FD at that sample count.

Writes ``<out>/study.json`` (every number, the settings, timings; evaluations already in it are reused
when the settings match) and ``<out>/study.md`` (the table). ``key=value`` overrides apply to both runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dfm import checkpoint
from dfm.config import Config, ConfigError, load_config
from dfm.files import write_json_atomic

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODELS = ("dfm", "sit")
NAMES = {"dfm": "DFM-SiT", "sit": "SiT"}
# Keys that may differ between a reused run directory and this study (they do not change the weights).
# Keys that schedule work around training without changing the weights (the study evaluates by itself).
SCHEDULE_KEYS = {"max_steps", "ckpt_every", "keep_ckpts", "sample_every", "log_every", "eval_every", "eval_samples"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="study_digits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/study-digits", help="study folder: both runs, study.json, study.md")
    p.add_argument("--dfm-config", default=str(CONFIGS / "dfm_digits.yaml"))
    p.add_argument("--sit-config", default=str(CONFIGS / "sit_digits.yaml"))
    p.add_argument("--steps", type=int, default=None, help="training steps of both runs (default: the configs')")
    p.add_argument("--every", type=int, default=500, help="evaluate a checkpoint every this many steps")
    p.add_argument("--samples", type=int, default=500, help="generated digits per evaluation")
    p.add_argument("--nfe", type=int, default=50, help="model evaluations per sample, for both models")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the evaluations")
    p.add_argument("--batch-size", type=int, default=250, help="samples per sampling batch")
    p.add_argument(
        "--cache-dir", default=None, help="digits classifier cache (default: $DFM_CACHE_DIR or ~/.cache/dfm)"
    )
    p.add_argument("--eval-only", action="store_true", help="do not train; evaluate the checkpoints that exist")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    if min(args.every, args.samples, args.nfe, args.batch_size) < 1 or (args.steps is not None and args.steps < 1):
        p.error("--steps, --every, --samples, --nfe and --batch-size must be >= 1")
    if args.samples < 2:
        p.error("--samples must be >= 2 (a Fréchet distance needs a covariance)")
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


def study_configs(args: argparse.Namespace) -> dict[str, Config]:
    """Both training configs with the study's shared schedule and overrides; equal steps are enforced."""
    cfgs = {}
    for name, path in (("dfm", args.dfm_config), ("sit", args.sit_config)):
        base = load_config(path, args.overrides)
        steps = args.steps or base.train.max_steps
        keep = steps // args.every + 2  # every evaluated checkpoint survives pruning
        extra = [f"output_dir={args.out}", f"train.max_steps={steps}", f"train.ckpt_every={args.every}",
                 f"train.keep_ckpts={keep}", "train.eval_every=0"]  # fmt: skip
        cfgs[name] = load_config(path, list(args.overrides) + extra)
    if cfgs["dfm"].train.max_steps != cfgs["sit"].train.max_steps:
        raise ConfigError("the two configs train for different steps; pass --steps")
    if cfgs["dfm"].train.global_batch_size != cfgs["sit"].train.global_batch_size:
        raise ConfigError("the two configs use different batch sizes; equal training compute needs the same")
    return cfgs


def sampling_overrides(cfg: Config, nfe: int) -> list[str]:
    """Overrides giving ``cfg`` an ODE sampler with exactly ``nfe`` model evaluations (no CFG: cfg_scale 1)."""
    steps = split_nfe(cfg.steps_per_stage(), nfe)
    return ["sample.mode=ode", "sample.method=euler", "sample.cfg_scale=1.0", f"sample.num_steps_per_scale={steps}"]


def _weights_keys(cfg_dict: dict) -> dict:
    """A run config without the keys that only schedule training or sampling."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("sample", "output_dir")}
    out["train"] = {k: v for k, v in cfg_dict["train"].items() if k not in SCHEDULE_KEYS}
    return out


def train(cfg: Config) -> float | None:
    """Train ``cfg`` to ``train.max_steps`` (resuming a partial run); returns seconds spent, None if reused."""
    import yaml
    from dfm.launch.train import run

    saved = cfg.run_dir / "config.yaml"
    if saved.is_file():
        before = _weights_keys(yaml.safe_load(saved.read_text()))
        if before != _weights_keys(cfg.to_dict()):
            raise ConfigError(f"{cfg.run_dir} was trained with another config; use another --out or delete it")
    latest = checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints")
    if latest is not None and int(latest.name) >= cfg.train.max_steps:
        return None
    tic = time.perf_counter()
    run(cfg, resume=True)
    return time.perf_counter() - tic


def checkpoints(cfg: Config, every: int) -> list[Path]:
    """The run's checkpoints at multiples of ``every`` (and the final one), oldest first."""
    root = cfg.run_dir / "checkpoints"
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    steps = cfg.train.max_steps
    return [p for p in found if int(p.name) <= steps and (int(p.name) % every == 0 or int(p.name) == steps)]


def evaluate(ckpt: Path, overrides: list[str], samples: int, seed: int, batch_size: int, cache_dir: str | None) -> dict:
    """Sample ``samples`` digits from the EMA weights of ``ckpt`` with the sampling ``overrides`` and score them."""
    from dfm.evaluation.digits import digit_scores
    from dfm.generation import IndexSampler
    from dfm.pretrained import load_pretrained, pretrained_config

    cfg = pretrained_config(ckpt, overrides=overrides)
    model = load_pretrained(ckpt, cfg=cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    sampler = IndexSampler(model, cfg, seed=seed, labels="balanced")
    tic = time.perf_counter()
    xs, ys = [], []
    for start in range(0, samples, batch_size):
        x, y = sampler.sample(range(start, min(samples, start + batch_size)))
        xs.append(x.cpu())
        ys.append(y)
    sample_s = time.perf_counter() - tic
    scores = digit_scores(torch.cat(xs), torch.cat(ys), cfg.data.resolution, cache_dir)
    return dict(scores, steps_per_stage=cfg.steps_per_stage(), sample_s=round(sample_s, 2))


def real_floor(resolution: int, samples: int, seed: int, cache_dir: str | None) -> dict:
    """Scores of ``samples`` real digits (a seeded subset): the best FD reachable at this sample count."""
    from dfm.data.digits import load_digits_tensor
    from dfm.evaluation.digits import digit_scores

    x, y = load_digits_tensor(resolution)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: min(samples, len(x))]
    return digit_scores(x[idx], y[idx], resolution, cache_dir)


def first_match(steps: list[int], fd: dict[int, float], target: float) -> int | None:
    """The first training step whose FD is at or below ``target``."""
    return next((s for s in steps if fd[s] <= target), None)


def markdown(study: dict) -> str:
    """The study table and its reading, as markdown."""
    s = study["settings"]
    rows = {m: {int(k): v for k, v in study["runs"][m]["evals"].items()} for m in MODELS}
    steps = sorted(set(rows["dfm"]) & set(rows["sit"]))
    batch = s["global_batch_size"]
    lines = [
        f"DFM-SiT vs SiT on the digits ({s['resolution']}x{s['resolution']}, {s['model_dfm']} vs {s['model_sit']}, "
        f"depth {s['depth']}, hidden {s['hidden_size']}), batch {batch}, NFE {s['nfe']} "
        f"(DFM {s['steps_dfm']}, SiT {s['steps_sit']}), {s['samples']} samples per evaluation (balanced labels, "
        f"seed {s['seed']}), EMA weights. FD: Fréchet distance of the digits-classifier features to the 1,797 "
        f"real digits (lower is better); acc: classifier accuracy w.r.t. the requested label.",
        "",
        "| training step | images seen | DFM FD | SiT FD | DFM acc | SiT acc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for step in steps:
        d, t = rows["dfm"][step], rows["sit"][step]
        lines.append(
            f"| {step} | {step * batch} | {d['fd']:.2f} | {t['fd']:.2f} | {d['accuracy']:.3f} | {t['accuracy']:.3f} |"
        )
    real = study["real"]
    lines.append(f"| real digits | | {real['fd']:.2f} | {real['fd']:.2f} | {real['accuracy']:.3f} | "
                 f"{real['accuracy']:.3f} |")  # fmt: skip
    if steps:
        final = steps[-1]
        fd = {m: {k: v["fd"] for k, v in rows[m].items()} for m in MODELS}
        dfm_at = first_match(steps, fd["dfm"], fd["sit"][final])
        sit_at = first_match(steps, fd["sit"], fd["dfm"][final])
        lines += [
            "",
            f"DFM reaches SiT's step-{final} FD ({fd['sit'][final]:.2f}) "
            + (f"at step {dfm_at} ({dfm_at / final:.0%} of the steps)." if dfm_at else "at no evaluated step.")
            + f" SiT reaches DFM's step-{final} FD ({fd['dfm'][final]:.2f}) "
            + (f"at step {sit_at} ({sit_at / final:.0%} of the steps)." if sit_at else "at no evaluated step."),
        ]
    for m in MODELS:
        secs = study["runs"][m].get("train_s")
        if secs:
            lines.append(f"{NAMES[m]} training: {secs:.0f} s for {s['max_steps']} steps on this machine.")
    return "\n".join(lines) + "\n"


def save_json(study: dict, path: Path) -> None:
    write_json_atomic(path, study)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfgs = study_configs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nfe_steps = {m: split_nfe(cfgs[m].steps_per_stage(), args.nfe) for m in MODELS}
    settings = {
        "nfe": args.nfe, "samples": args.samples, "seed": args.seed, "every": args.every,
        "max_steps": cfgs["dfm"].train.max_steps, "global_batch_size": cfgs["dfm"].train.global_batch_size,
        "resolution": cfgs["dfm"].data.resolution, "model_dfm": cfgs["dfm"].model, "model_sit": cfgs["sit"].model,
        "depth": cfgs["dfm"].arch.depth, "hidden_size": cfgs["dfm"].arch.hidden_size,
        "steps_dfm": nfe_steps["dfm"], "steps_sit": nfe_steps["sit"], "overrides": list(args.overrides),
    }  # fmt: skip
    path = out / "study.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    # Evaluations depend on neither the final step count nor the evaluation interval (constant lr): reusable.
    same = lambda d: {k: v for k, v in d.items() if k not in ("max_steps", "every")}
    reuse = same(previous.get("settings", {})) == same(json.loads(json.dumps(settings)))
    study = {"settings": settings, "runs": {}, "real": None}
    for m in MODELS:
        cfg = cfgs[m]
        train_s = None if args.eval_only else train(cfg)
        before = previous.get("runs", {}).get(m, {}) if reuse else {}
        run = {"run_dir": str(cfg.run_dir), "train_s": train_s or before.get("train_s"), "evals": {}}
        study["runs"][m] = run
        for ckpt in checkpoints(cfg, args.every):
            step = str(int(ckpt.name))
            if step in before.get("evals", {}):
                run["evals"][step] = before["evals"][step]
                continue
            overrides = sampling_overrides(cfg, args.nfe)
            scores = evaluate(ckpt, overrides, args.samples, args.seed, args.batch_size, args.cache_dir)
            run["evals"][step] = scores
            print(f"study: {NAMES[m]} step {step}: FD {scores['fd']:.3f}, accuracy {scores['accuracy']:.3f}")
            save_json(study, path)  # an interrupted study keeps the evaluations done so far
    study["real"] = real_floor(cfgs["dfm"].data.resolution, args.samples, args.seed, args.cache_dir)
    save_json(study, path)
    table = markdown(study)
    (out / "study.md").write_text(table)
    print(table)
    return study


if __name__ == "__main__":
    main()
