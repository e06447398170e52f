"""``dfm sample``: sample a checkpoint into a PNG grid (a row per class, a column per stage preview).

    dfm sample --ckpt runs/dfm-digits/checkpoints/0003000 --out samples.png [--npz samples.npz]
    dfm sample --ckpt runs/dfm-digits          # the run's latest checkpoint
    dfm sample --ckpt imported/dfm-sit-xl-512  # a directory written by dfm import
Sampling keys of the run config can be overridden: sample.cfg_scale=2.0 sample.num_steps_per_scale=[20,5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dfm.config import ConfigError
from dfm.pretrained import load_pretrained, pretrained_config, resolve_pretrained
from dfm.visualize import class_rows, sample_model, save_png, stage_preview_grid, to_uint8


def load_model(ckpt: str | Path, config: str | None = None, overrides: list[str] | None = None, use_ema=None):
    """(model in eval mode on CPU, run config) of saved weights: :func:`dfm.load_pretrained` with the config
    saved beside them (or ``config``) and ``key=value`` overrides; EMA weights unless ``sample.use_ema=false``."""
    cfg = pretrained_config(ckpt, config, overrides)
    return load_pretrained(ckpt, cfg=cfg, ema=use_ema), cfg


def default_out(weights: Path) -> Path:
    """Where the grid goes without --out: a run's samples folder for its checkpoints, else beside the weights."""
    if weights.is_dir() and weights.parent.name == "checkpoints":
        return weights.parent.parent / "samples" / f"sample_{weights.name}.png"
    return weights / "samples.png" if weights.is_dir() else weights.with_suffix(".png")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="dfm sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run or imported directory, or exported .safetensors")
    p.add_argument("--config", help="run config (default: the one saved beside the checkpoint)")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/samples/, or beside the weights)")
    p.add_argument("--npz", default=None, help="also write the final images as uint8 N x H x W x 3 in arr_0")
    p.add_argument("--per-class", type=int, default=None, help="samples per class row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--score",
        action="store_true",
        help="digits runs: class accuracy and Frechet distance of the samples (classifier trained on real digits)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of sampling keys")
    args = p.parse_args(argv)
    try:
        model, cfg = load_model(args.ckpt, args.config, args.overrides, use_ema=False if args.raw else None)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm sample: {err}")
    device = torch.device(args.device)
    model.to(device)
    per_class = args.per_class or cfg.sample.per_class
    y = class_rows(cfg.data.num_classes, per_class, device)
    g = torch.Generator(device).manual_seed(args.seed)
    result = sample_model(model, cfg, y, generator=g)
    out = Path(args.out) if args.out else default_out(resolve_pretrained(args.ckpt))
    save_png(stage_preview_grid(result, rows=min(cfg.data.num_classes, 10), scale=4), out)
    print(f"dfm sample: wrote {out} ({len(y)} samples, {len(result.previews)} stage previews each)")
    if args.score:
        if cfg.data.kind != "digits":
            sys.exit("dfm sample: --score needs a digits run (for latents use dfm generate + dfm evaluate)")
        from dfm.evaluation.digits import digit_scores

        scores = digit_scores(result.x.cpu(), y.cpu(), cfg.data.resolution)
        acc, fd = scores["accuracy"], scores["fd"]
        print(f"dfm sample: class accuracy {acc:.3f}, Frechet distance {fd:.2f} ({len(y)} samples)")
    if args.npz:
        np.savez(args.npz, arr_0=to_uint8(result.x), labels=y.cpu().numpy())
        print(f"dfm sample: wrote {args.npz}")
    return out


if __name__ == "__main__":
    main()
