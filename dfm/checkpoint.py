"""Atomic run checkpoints.

A checkpoint is a directory ``<run>/checkpoints/<step:07d>/`` holding the DeepSpeed engine state (model,
optimizer, ZeRO shards), ``ema.safetensors`` (the EMA weights, loadable without DeepSpeed),
``config.yaml`` and one ``trainer_rank<r>.pt`` per rank (step, RNG states, data position).
Every rank writes into ``checkpoints/.staging/<tag>``; only when all have finished does rank 0 rename
the directory into place and then replace the ``latest`` pointer, each an atomic ``os.replace``. A save
interrupted at any point therefore leaves the previous checkpoint, and the pointer to it, untouched.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"
STAGING = ".staging"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The directory the ``latest`` pointer names, or None when there is no finished checkpoint."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_root / tag
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r} but {path} does not exist")
    return path


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    engine,
    ema: torch.nn.Module,
    trainer_state: dict,
    config_yaml: str,
    keep: int = 2,
) -> Path:
    """Save engine, EMA, per-rank trainer state and config as ``<ckpt_root>/<step:07d>``, atomically."""
    ckpt_root = Path(ckpt_root)
    tag = f"{step:07d}"
    staging = ckpt_root / STAGING
    rank = _rank()
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # debris of an interrupted save
        (staging / tag).mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    torch.save(trainer_state, staging / tag / f"trainer_rank{rank}.pt")
    if rank == 0:
        weights = {k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}
        save_file(weights, staging / tag / "ema.safetensors")
        (staging / tag / "config.yaml").write_text(config_yaml)
    _barrier()
    final = ckpt_root / tag
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        write_text_atomic(ckpt_root / LATEST, tag)
        _prune(ckpt_root, keep, protect=tag)
    _barrier()
    return final


def _prune(ckpt_root: Path, keep: int, protect: str) -> None:
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit())
    for tag in tags[:-keep]:
        if tag != protect:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)


def load_trainer_state(ckpt_dir: Path, rank: int) -> dict | None:
    path = Path(ckpt_dir) / f"trainer_rank{rank}.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_ema_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """EMA state dict from a checkpoint directory or an exported ``.safetensors`` file."""
    ckpt = Path(ckpt)
    path = ckpt / "ema.safetensors" if ckpt.is_dir() else ckpt
    if not path.is_file():
        raise FileNotFoundError(f"no EMA weights at {path}")
    return load_file(str(path))


def load_model_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Raw (non-EMA) model weights from the engine's model-state file (ZeRO stages 0-2)."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model state file (mp_rank_*_model_states.pt) in {ckpt_dir}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module:
        raise ValueError(f"{files[0]} holds no full model weights (ZeRO-3 shards); use the EMA weights or zero_to_fp32")
    return module
