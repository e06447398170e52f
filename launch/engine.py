"""DeepSpeed wiring: process-group setup and the engine config generated from the run config."""

from __future__ import annotations

import os
import socket

import torch

from dfm.config import Config, ConfigError


def setup_distributed() -> tuple[int, int]:
    """Initialise the process group (gloo on CPU, nccl on CUDA); returns (rank, world_size).

    Under ``torchrun`` / ``deepspeed`` the launcher sets RANK, WORLD_SIZE and MASTER_*; a plain single
    process gets a one-rank group on a free local port, so one code path serves every scale.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_bf16(cfg: Config) -> bool:
    """bf16 on CUDA by default; fp32 on CPU, where bf16 matmuls are ~40x slower than fp32."""
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for the configured global batch."""
    g = cfg.train.global_batch_size
    micro = cfg.train.micro_batch_size or g // world_size
    if micro < 1 or g % (micro * world_size) != 0:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({g}) is not a multiple of micro batch ({micro}) x world size "
            f"({world_size}); set 'train.micro_batch_size' to a divisor"
        )
    return micro, g // (micro * world_size)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, derived from the run config (never hand-kept)."""
    micro, accum = batch_layout(cfg, world_size)
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 1 << 30,  # progress is ours (tqdm); DeepSpeed's own print syncs
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return ds


def build_engine(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
    """``deepspeed.initialize`` with the generated config; returns the engine."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
    return engine
