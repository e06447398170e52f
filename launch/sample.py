"""``dfm sample``: sample a checkpoint into a PNG grid (a row per class, a column per stage preview).

    dfm sample --ckpt runs/dfm-digits/checkpoints/0003000 --out samples.png [--npz samples.npz]
    dfm sample --ckpt runs/dfm-digits          # the run's latest checkpoint
Sampling keys of the run config can be overridden: sample.cfg_scale=2.0 sample.num_steps_per_scale=[20,5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dfm import checkpoint
from dfm.config import ConfigError, config_from_dict, load_config, parse_override
from dfm.models import DFMSiT
from dfm.visualize import class_rows, sample_model, save_png, stage_preview_grid, to_uint8


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory / its checkpoints folder (-> latest checkpoint)."""
    path = Path(path)
    if (path / "ema.safetensors").is_file() or path.suffix == ".safetensors":
        return path
    for root in (path / "checkpoints", path):
        if (root / checkpoint.LATEST).is_file():
            return checkpoint.latest_checkpoint(root)
    raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a run with a 'latest' checkpoint")


def load_model(ckpt: str | Path, config: str | None = None, overrides: list[str] | None = None, use_ema=None):
    """(model in eval mode on CPU, config) from a checkpoint; EMA weights unless ``sample.use_ema=false``."""
    ckpt = resolve_checkpoint(ckpt)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        # a checkpoint directory holds config.yaml; `dfm export` writes F.yaml beside F.safetensors
        cfg_file = ckpt / "config.yaml" if ckpt.is_dir() else ckpt.with_suffix(".yaml")
        if not cfg_file.is_file():
            raise ConfigError(f"no config.yaml beside {ckpt}; pass --config")
        import yaml

        values = yaml.safe_load(cfg_file.read_text())
        for text in overrides or []:
            values = _merge(values, parse_override(text))
        cfg = config_from_dict(values)
    model = DFMSiT.from_config(cfg)
    ema = cfg.sample.use_ema if use_ema is None else use_ema
    state = checkpoint.load_ema_weights(ckpt) if ema else checkpoint.load_model_weights(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt}: weights do not match {cfg.model}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), cfg


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="dfm sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, exported .safetensors, or run directory")
    p.add_argument("--config", help="run config (default: the one saved beside the checkpoint)")
    p.add_argument("--out", default=None, help="PNG path (default: <checkpoint>/samples.png)")
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
    ckpt = resolve_checkpoint(args.ckpt)
    default = ckpt.parent.parent / "samples" / f"sample_{ckpt.name}.png" if ckpt.is_dir() else ckpt.with_suffix(".png")
    out = Path(args.out) if args.out else default
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
