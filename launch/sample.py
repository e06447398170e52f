"""``dfm sample``: sample a checkpoint into a PNG grid (a row per class, a column per stage preview).

    dfm sample --ckpt runs/dfm-digits/checkpoints/0003000 --out samples.png [--npz samples.npz]
    dfm sample --ckpt runs/dfm-digits          # the run's latest checkpoint
    dfm sample --ckpt imported/dfm-sit-xl-512 --vae stabilityai/sd-vae-ft-ema   # a directory written by dfm import
Sampling keys of the run config can be overridden: sample.cfg_scale=2.0 sample.num_steps_per_scale=[20,5]

Without --out the grid goes to <run>/samples/sample_<step>.png for a run or one of its checkpoints, to
<dir>/samples.png for any other checkpoint directory (dfm import's), and to F.png beside an exported
F.safetensors. Latent models are decoded to images with the VAE their latent store recorded (or --vae);
without one, the grid and --npz hold latent channels 0-2, and a line says so. The --npz file carries its
settings (checkpoint, sampler, CFG, seed, VAE) as JSON in a 'settings' member.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from dfm.launch.options import device_name, positive_int, sampling_overrides

from dfm.config import ConfigError
from dfm.devices import resolve_device
from dfm.files import atomic_open, check_output
from dfm.generation import settings_array
from dfm.pretrained import load_pretrained, pretrained_config, resolve_pretrained
from dfm.vae import resolve_decoder
from dfm.visualize import class_rows, decode_result, grid_scale, sample_model, save_png, stage_preview_grid, to_uint8


def load_model(ckpt: str | Path, config: str | None = None, overrides: list[str] | None = None, use_ema=None):
    """(model in eval mode on CPU, run config) of saved weights: :func:`dfm.load_pretrained` with the config
    saved beside them (or ``config``) and ``key=value`` overrides; EMA weights unless ``sample.use_ema=false``."""
    cfg = pretrained_config(ckpt, config, overrides)
    return load_pretrained(ckpt, cfg=cfg, ema=use_ema), cfg


def default_out(weights: Path) -> Path:
    """Where the grid goes without --out (``weights`` resolved by ``dfm.pretrained.resolve_pretrained``): the run's
    ``samples/sample_<step>.png`` for a run's checkpoint, ``<dir>/samples.png`` for another checkpoint directory,
    ``F.png`` beside an exported ``F.safetensors``."""
    if weights.is_dir() and weights.parent.name == "checkpoints":
        return weights.parent.parent / "samples" / f"sample_{weights.name}.png"
    return weights / "samples.png" if weights.is_dir() else weights.with_suffix(".png")


def score(model, cfg, samples: int, seed: int) -> dict[str, float]:
    """Score ``samples`` digits of the fixed evaluation set (index ``i``: class ``i % 10``, noise from ``(seed, i)``;
    the set ``train.eval_every`` scores) and print one line."""
    from dfm.evaluation.digits import digit_scores
    from dfm.evaluation.training import eval_samples

    x, y = eval_samples(model, cfg, count=samples, seed=seed)
    scores = digit_scores(x, y, cfg.data.resolution)
    print(
        f"dfm sample: {samples} samples (balanced classes, seed {seed}, {sum(cfg.steps_per_stage())} steps): class "
        f"accuracy {scores['accuracy']:.3f}, Frechet distance {scores['fd']:.2f}, fine-band energy ratio "
        f"{scores['fine_band_ratio']:.3f}"
    )
    return scores


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="dfm sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run or imported directory, or exported .safetensors")
    p.add_argument("--config", help="run config (default: the one saved beside the checkpoint)")
    p.add_argument("--out", default=None, help="PNG path (default: see above)")
    p.add_argument("--npz", default=None, help="also write the final images as uint8 N x H x W x 3 in arr_0")
    p.add_argument(
        "--per-class", type=positive_int, default=None, help="samples per class row (default: sample.per_class)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--vae", default=None, help="AutoencoderKL decoding a latent model (default: its store's)")
    p.add_argument(
        "--device", type=device_name, default="auto", help="auto (the GPU when CUDA is available), cpu, cuda[:N]"
    )
    p.add_argument(
        "--score",
        action="store_true",
        help="digits runs: score the run's evaluation set (train.eval_samples fixed-seed samples, balanced classes): "
        "class accuracy and Frechet distance (classifier trained on the real digits), fine-band energy ratio",
    )
    p.add_argument(
        "--score-samples", type=int, default=None, help="samples scored by --score (default: train.eval_samples)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out or --npz")
    p.add_argument("overrides", nargs="*", help="key=value overrides of sampling keys (sample.*)")
    args = p.parse_args(argv)
    if args.npz is not None and not args.npz.endswith(".npz"):
        args.npz += ".npz"  # numpy's savez appends it anyway: check and report the file that will be written
    # A file the user named is never written over unless asked; the default grid is this command's own file in
    # the run's samples/ folder, and sampling again (same seed, same image) replaces it.
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path is not None:
            check_output(path, flag, force=args.force, inputs=(args.ckpt,))
    try:
        device = resolve_device(args.device)
        overrides = sampling_overrides(args.overrides)
        model, cfg = load_model(args.ckpt, args.config, overrides, use_ema=False if args.raw else None)
        decoder, note = resolve_decoder(cfg, args.vae, device)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm sample: {err}")
    if args.score_samples is not None and args.score_samples < 2:
        sys.exit("dfm sample: --score-samples must be >= 2 (a Frechet distance needs a covariance)")
    if args.score and cfg.data.kind != "digits":
        sys.exit("dfm sample: --score needs a digits run (for latents use dfm generate + dfm evaluate)")
    if note:
        print(f"dfm sample: {note}" + ("" if decoder else "; writing latent channels 0-2 instead of images"))
    model.to(device)
    per_class = args.per_class if args.per_class is not None else cfg.sample.per_class
    y = class_rows(cfg.data.num_classes, per_class, device)
    g = torch.Generator(device).manual_seed(args.seed)
    raw = sample_model(model, cfg, y, generator=g)
    result = decode_result(raw, decoder)
    weights = resolve_pretrained(args.ckpt)
    out = Path(args.out) if args.out else default_out(weights)
    grid = stage_preview_grid(result, rows=min(cfg.data.num_classes, 10), scale=grid_scale(result.x.shape[-1]))
    save_png(grid, out)
    print(f"dfm sample: wrote {out} ({len(y)} samples, {len(result.previews)} stage previews each)")
    if args.score:
        score(model, cfg, args.score_samples or cfg.train.eval_samples, args.seed)
    if args.npz:
        settings = {
            "checkpoint": str(weights.resolve()),
            "weights": "raw" if args.raw else "ema",
            "seed": args.seed,
            "model": cfg.model,
            "sample": asdict(cfg.sample) | {"per_class": per_class},
            "steps_per_stage": cfg.steps_per_stage(),
            "thresholds": cfg.thresholds(),
            "vae": decoder.spec.to_dict() if decoder is not None else None,
            "decoded": decoder is not None or cfg.data.kind != "latents",
        }
        with atomic_open(args.npz, "wb") as f:  # never a half-written file in place of the user's
            np.savez(f, arr_0=to_uint8(result.x), labels=y.cpu().numpy(), settings=settings_array(settings))
        print(f"dfm sample: wrote {args.npz}")
    return out


if __name__ == "__main__":
    main()
