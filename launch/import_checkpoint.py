"""``dfm import``: a checkpoint of the authors' code, REPA or the original SiT release as a model directory.

    dfm import checkpoints/0400000.pt --out imported/dfm-sit-xl-512          # the authors' DFM-SiT-XL/2
    dfm import SiT-XL-2-256x256.pt --out imported/sit-xl-256                  # the original SiT release
    dfm import last.pt --out imported/repa-xl --weights model --resolution 256
    dfm sample --ckpt imported/dfm-sit-xl-512
    dfm generate --ckpt imported/dfm-sit-xl-512 --vae sd-vae-ft-ema --num-samples 50000 --out s.npz
    dfm train --ckpt imported/dfm-sit-xl-512 --data-dir DATA --exp-name finetune      # fine-tune from it

Reads the file with torch's weights-only loader (tensors, containers and argparse arguments only: nothing
in it is executed), renames the keys to ours, infers the architecture from the shapes and the saved
``args`` (model, resolution, classes, stages) and writes ``OUT/ema.safetensors`` and ``OUT/config.yaml``,
whose sampling defaults are the saved ``args``' (``num_steps_per_scale``, ``stage_sampling_thresholds``,
``cfg_scale``, ...). Anything that does not map exactly -- unknown or missing keys, wrong shapes, qk-norm,
a positional embedding other than the fixed sin-cos one, disagreeing sizes -- is refused with the keys
named, before anything is written. A table without the CFG null row (trained without label dropout) gets
one appended for fine-tuning and ``dfm.class_dropout: 0``, with which the config refuses ``cfg_scale != 1``.

Attention heads are the one number the weights do not show: registered sizes carry theirs; a size of
another depth or width needs ``--model`` (the name written, with ``arch.*`` overrides) and ``--num-heads``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfm.config import ConfigError
from dfm.importer import LAYOUTS, Converted, Options, import_checkpoint
from dfm.safe_load import CorruptFileError, UnsafeFileError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dfm import", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="checkpoint file (.pt): training checkpoint with 'ema'/'model', or a bare state dict")
    p.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    p.add_argument("--model", help="registered name to write (default: args.model, or the size the shapes match)")
    p.add_argument("--resolution", type=int, help="image side, as their args.resolution (latents: 1/8 of it)")
    p.add_argument("--weights", choices=("ema", "model"), default=None, help="entry of a training checkpoint (ema)")
    p.add_argument("--num-heads", type=int, help="attention heads, for a size that is not registered")
    p.add_argument("--num-classes", type=int, help="classes, when neither args nor a 1000/1001-row table says")
    p.add_argument("--layout", choices=tuple(LAYOUTS), help="force the layout: " + "; ".join(
        f"{k}: {v}" for k, v in LAYOUTS.items()))  # fmt: skip
    return p.parse_args(argv)


def summary(converted: Converted, out: Path) -> str:
    """What was read and what was written, for the user to check against what they expect."""
    cfg, src = converted.config, converted.source
    step = f", step {src.steps}" if src.steps is not None else ""
    guidance = "CFG available" if cfg.dfm.class_dropout > 0 else "no CFG (trained without label dropout)"
    lines = [
        f"dfm import: {src.path} ({LAYOUTS[converted.layout]}, {src.entry}{step})",
        f"  -> {out}: {cfg.model}, {cfg.stages} stage(s), {cfg.data.channels}x{cfg.data.resolution}x"
        f"{cfg.data.resolution} latents, {cfg.data.num_classes} classes, {guidance}; sampling "
        f"{cfg.steps_per_stage()} steps, thresholds {cfg.thresholds()}, cfg_scale {cfg.sample.cfg_scale}",
    ]
    return "\n".join(lines + [f"  {note}" for note in converted.notes])


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    options = Options(
        model=args.model, resolution=args.resolution, num_heads=args.num_heads, num_classes=args.num_classes,
        weights=args.weights, layout=args.layout,
    )  # fmt: skip
    out = Path(args.out)
    try:
        converted = import_checkpoint(args.src, out, options)
    except (ConfigError, CorruptFileError, FileExistsError, FileNotFoundError, UnsafeFileError, ValueError) as err:
        sys.exit(f"dfm import: {err}")
    print(summary(converted, out))
    return out


if __name__ == "__main__":
    main()
