"""Atomic run checkpoints.

A checkpoint is a directory ``<run>/checkpoints/<step:07d>/`` holding the DeepSpeed engine state (model,
optimizer, ZeRO shards), ``ema.safetensors`` (the EMA weights, loadable without DeepSpeed),
``config.yaml`` and one ``trainer_rank<r>.pt`` per rank (step, RNG states, data position).
Every rank writes into ``checkpoints/.staging/<tag>``; only when all have finished does rank 0 rename
the directory into place and then replace the ``latest`` pointer, each an atomic ``os.replace``. A save
interrupted at any point therefore leaves the previous checkpoint, and the pointer to it, untouched.

The engine state is DeepSpeed's own: ZeRO shards per rank (``zero_pp_rank_<r>_*optim_states.pt``) and the
model-state file. Resuming at another world size (or after a ZeRO-1/2/3 run lost or gained ranks) goes
through DeepSpeed's universal checkpoint: :func:`to_universal` converts the shards once, into
``<checkpoint>/universal`` (``deepspeed.checkpoint.ds_to_universal``), and the engine, built with
``checkpoint.load_universal``, repartitions them (:func:`needs_universal` decides). A ZeRO-0 checkpoint
holds the full optimizer state and loads at any world size directly. Everything else is layout-free:
the EMA is saved whole, and the step and data position are the same on every rank at a step boundary.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"
STAGING = ".staging"
UNIVERSAL = "universal"


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


def rng_state() -> dict:
    """The process-global RNG states (the training draws have their own per-micro-batch seeds)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    ema,
    trainer_state: dict,
    config_yaml: str,
    keep: int = 2,
) -> Path:
    """Save engine, EMA, per-rank trainer state and config as ``<ckpt_root>/<step:07d>``, atomically.

    ``ema`` has ``state_dict()`` giving the full weights on rank 0 (``dfm.train.ModelEMA``, or
    ``ZeRO3EMA``, for which it is a collective: every rank calls it here).
    """
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
    weights = ema.state_dict()
    if rank == 0:
        weights = {k: v.detach().float().contiguous() for k, v in weights.items()}
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


def saved_layout(ckpt_dir: str | Path) -> tuple[int, int]:
    """(world size, ZeRO stage) of the run that wrote ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    state = load_trainer_state(ckpt_dir, 0)
    if state is None:
        raise FileNotFoundError(f"{ckpt_dir} has no trainer state (trainer_rank0.pt)")
    return int(state["world_size"]), int(state["zero_stage"])


def needs_universal(ckpt_dir: str | Path, world_size: int, zero_stage: int) -> bool:
    """Whether resuming ``ckpt_dir`` at ``world_size`` must go through a universal checkpoint.

    ZeRO shards are tied to the world size that wrote them; a ZeRO-0 checkpoint is not. Changing the ZeRO
    stage on resume is refused: DeepSpeed does not document it as supported.
    """
    saved_world, saved_stage = saved_layout(ckpt_dir)
    if saved_stage != zero_stage:
        raise ValueError(
            f"{ckpt_dir} was written with train.zero_stage={saved_stage}; resume it with the same stage "
            f"(got {zero_stage})"
        )
    return zero_stage > 0 and saved_world != world_size


def to_universal(ckpt_dir: str | Path) -> Path:
    """Convert the ZeRO shards of ``ckpt_dir`` to ``<ckpt_dir>/universal`` once (rank 0; the others wait).

    The conversion writes into a scratch directory that is renamed into place when complete, so an
    interrupted conversion is redone rather than half-read.
    """
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / UNIVERSAL
    if _rank() == 0 and not out.is_dir():
        scratch = ckpt_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
               "--output_folder", str(scratch), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"universal conversion of {ckpt_dir} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass the tag
        os.replace(scratch, out)
    _barrier()
    return out


def load_engine(engine, ckpt_dir: str | Path) -> None:
    """Load the engine state of ``ckpt_dir``; through its universal form when the engine was built for one."""
    ckpt_dir = Path(ckpt_dir)
    if engine.load_universal_checkpoint():
        to_universal(ckpt_dir)
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=UNIVERSAL)
    else:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine state in {ckpt_dir}")


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
    """Raw (non-EMA) model weights: the engine's model-state file (ZeRO 0-2), or for ZeRO-3, whose model
    state holds only partitions, the fp32 weights consolidated from the shards by DeepSpeed's zero_to_fp32."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model state file (*mp_rank_*_model_states.pt) in {ckpt_dir}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module or any(v.numel() == 0 for v in module.values()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    return module
