"""``dfm export``: a checkpoint's EMA weights as one safetensors file, for sampling anywhere.

    dfm export --ckpt runs/dfm-sit-xl-256 --out dfm-sit-xl-256.safetensors          # latest checkpoint
    dfm export --ckpt runs/dfm-sit-xl-256/checkpoints/0400000 --out raw.safetensors --raw
    dfm sample --ckpt dfm-sit-xl-256.safetensors      # reads dfm-sit-xl-256.yaml beside it

Every checkpoint already holds the full EMA weights (``ema.safetensors``; under ZeRO-3 the partitions
are gathered when saving), so exporting needs neither a process group nor a GPU, whatever the ZeRO stage
and world size of the run. ``--raw`` exports the trained (non-EMA) weights instead: the checkpoint's
``model.safetensors``, which every save writes whole (under ZeRO-3 gathered from the partitions, as the EMA).
The run config travels with the weights, in the file's metadata (``config``, with ``model`` and
``step``) and beside it as ``<out>.yaml``. The checkpoint is verified against its manifest first (an
altered one is refused); an existing ``--out`` or ``.yaml`` is replaced only with ``--force``, and never
is a file written into the checkpoint being exported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dfm.files import atomic_path, check_output, write_text_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_outputs(ckpt_dir: Path, out: Path, force: bool = False) -> Path:
    """Refuse, before anything is read: an ``out`` (or the ``.yaml`` written beside it) that exists without
    ``force`` or cannot be written, and any ``out`` inside the checkpoint being exported (writing there would
    break the checkpoint's manifest). Returns the config's path."""
    config_out = out.with_suffix(".yaml")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a .safetensors file (its config goes beside it as .yaml)")
    if out.resolve().is_relative_to(ckpt_dir.resolve()):
        raise ValueError(f"--out {out} is inside the checkpoint {ckpt_dir} it exports: write it elsewhere")
    check_output(out, force=force)
    check_output(config_out, force=force, written_by=str(out))
    return config_out


def export(ckpt: str | Path, out: str | Path, raw: bool = False, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the weights of checkpoint (or run directory) ``ckpt`` to ``out`` and its config to ``out.yaml``.

    The checkpoint's files are checked against its manifest and for finite values first
    (``dfm.pretrained.load_pretrained``): an altered checkpoint is refused, never exported as a clean file."""
    import yaml

    from dfm.pretrained import load_pretrained, resolve_pretrained

    ckpt_dir = resolve_pretrained(ckpt)
    if not ckpt_dir.is_dir():
        raise ValueError(f"{ckpt_dir} is already an exported file")
    out = Path(out)
    config_out = check_outputs(ckpt_dir, out, force)
    model = load_pretrained(ckpt_dir, ema=not raw)  # verified, and every key and shape checked
    weights = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    config_yaml = (ckpt_dir / "config.yaml").read_text()
    config = yaml.safe_load(config_yaml)
    metadata = {
        "config": config_yaml,
        "model": str(config.get("model", "")),
        "step": str(int(ckpt_dir.name)) if ckpt_dir.name.isdigit() else "",
        "weights": "raw" if raw else "ema",
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            save_file(weights, str(tmp), metadata=metadata)
        write_text_atomic(config_out, config_yaml)
    except OSError as err:  # a full disk, say: name the user's path, not the temporary one
        raise OSError(f"--out {out}: writing failed ({err.strerror or err})") from None
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="dfm export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors path (the config goes beside it as .yaml)")
    p.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored precision (default fp32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out and the .yaml beside it")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, raw=args.raw, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm export: {err}")
    print(f"dfm export: wrote {out} and {out.with_suffix('.yaml')}")
    return out


if __name__ == "__main__":
    main()
