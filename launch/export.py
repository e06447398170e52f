"""``dfm export``: a checkpoint's EMA weights as one safetensors file, for sampling anywhere.

    dfm export --ckpt runs/dfm-sit-xl-256 --out dfm-sit-xl-256.safetensors          # latest checkpoint
    dfm export --ckpt runs/dfm-sit-xl-256/checkpoints/0400000 --out raw.safetensors --raw
    dfm sample --ckpt dfm-sit-xl-256.safetensors      # reads dfm-sit-xl-256.yaml beside it

Every checkpoint already holds the full EMA weights (``ema.safetensors``; under ZeRO-3 the partitions
are gathered when saving), so exporting needs neither a process group nor a GPU, whatever the ZeRO stage
and world size of the run. ``--raw`` exports the trained (non-EMA) weights instead: the engine's model
state for ZeRO 0-2, the fp32 weights consolidated from the shards (DeepSpeed's zero_to_fp32) for ZeRO-3.
The run config travels with the weights, in the file's metadata (``config``, with ``model`` and
``step``) and beside it as ``<out>.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dfm.files import atomic_path, write_text_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(ckpt: str | Path, out: str | Path, raw: bool = False, dtype: str = "fp32") -> Path:
    """Write the weights of checkpoint (or run directory) ``ckpt`` to ``out`` and its config to ``out.yaml``."""
    import yaml

    from dfm.pretrained import load_pretrained, resolve_pretrained

    ckpt_dir = resolve_pretrained(ckpt)
    if not ckpt_dir.is_dir():
        raise ValueError(f"{ckpt_dir} is already an exported file")
    model = load_pretrained(ckpt_dir, ema=not raw)  # every key and shape checked against the saved config
    weights = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    config_yaml = (ckpt_dir / "config.yaml").read_text()
    config = yaml.safe_load(config_yaml)
    metadata = {
        "config": config_yaml,
        "model": str(config.get("model", "")),
        "step": str(int(ckpt_dir.name)) if ckpt_dir.name.isdigit() else "",
        "weights": "raw" if raw else "ema",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    write_text_atomic(out.with_suffix(".yaml"), config_yaml)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="dfm export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors path (the config goes beside it as .yaml)")
    p.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="stored precision (default fp32)")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, raw=args.raw, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm export: {err}")
    print(f"dfm export: wrote {out} and {out.with_suffix('.yaml')}")
    return out


if __name__ == "__main__":
    main()
