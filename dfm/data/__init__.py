"""Data sources behind one loader interface, and the choice between them.

Every loader is an endless iterator of ``(x, y)`` micro-batches (x float32 (B, C, H, W), y int64 (B,)) in the
order of one shared sample stream (:mod:`dfm.data.stream`): sharded by rank, reshuffled each epoch from the seed,
with ``state_dict`` / ``load_state_dict`` to resume mid-epoch exactly, at any world size.

* :mod:`dfm.data.digits` -- the embedded digits, held in memory;
* :mod:`dfm.data.store` -- the latent store format, read by :mod:`dfm.data.torch_loader` and :mod:`dfm.data.dali`;
* :mod:`dfm.data.convert` and :mod:`dfm.data.encode` -- ``dfm prepare``: images to a latent store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from dfm.data.digits import InMemoryLoader, load_digits_tensor
from dfm.data.store import validate_store
from dfm.data.stream import ShardedStream
from dfm.data.torch_loader import TorchLatentLoader
from dfm.files import log_once

log = logging.getLogger(__name__)


class Loader(Protocol):
    """What the training loop relies on: an endless batch stream with a resumable position."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_loader(
    data_cfg, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, device=None, accum_steps: int = 1
) -> Loader:
    """The loader named by ``data_cfg.kind``: the embedded digits or a prepared latent store.

    ``accum_steps`` lets the loaders cut each global batch into per-rank, per-accumulation-step slots, so that
    the global batch does not depend on the world size (:class:`~dfm.data.stream.ShardedStream`).
    """
    if data_cfg.kind == "digits":
        x, y = load_digits_tensor(data_cfg.resolution)
        return InMemoryLoader(x, y, micro_batch, rank, world_size, seed, accum_steps=accum_steps)
    if data_cfg.kind == "latents":
        check_store_matches(data_cfg, world_size)
        return build_latent_loader(
            data_cfg.data_dir,
            micro_batch,
            rank,
            world_size,
            seed,
            loader=data_cfg.loader,
            num_workers=data_cfg.num_workers,
            device=device,
            accum_steps=accum_steps,
        )
    raise ValueError(f"unknown data.kind {data_cfg.kind!r}")


def check_store_matches(data_cfg, world_size: int = 1) -> None:
    """Validate the latent store (a shard for each of ``world_size`` ranks) and that its shape and classes are
    those the config builds the model for (:func:`dfm.config.apply_store_facts`, which fills unset keys)."""
    from dfm.config import apply_store_facts

    apply_store_facts(data_cfg, validate_store(data_cfg.data_dir, world_size))


def dali_available() -> bool:
    """Whether NVIDIA DALI and its PyTorch plugin import."""
    from dfm.data import dali

    return dali.pipeline_def is not None


def use_dali(loader: str, device: str | torch.device) -> bool:
    """The one predicate choosing DALI over the PyTorch DataLoader for a latent store.

    ``"dali"`` insists (error if DALI is missing), ``"torch"`` never uses it, ``"auto"`` uses DALI when it
    imports and the batches go to a CUDA device: there DALI draws the posterior with GPU operators. On CPU the
    DataLoader with two workers delivered 3-6x the samples/s of DALI's CPU pipeline on the packed store
    (``benchmarks/bench_loader.py``, 2-core AMD EPYC), so ``auto`` keeps the DataLoader there.
    """
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"loader must be 'auto', 'dali' or 'torch', got {loader!r}")
    if loader == "torch":
        return False
    available = dali_available()
    if loader == "dali":
        if not available:
            raise RuntimeError(
                "loader='dali' was asked for but nvidia.dali does not import (pip install nvidia-dali-*)"
            )
        return True
    on_cuda = torch.device(device).type == "cuda"
    if not (available and on_cuda):
        why = "DALI does not import" if not available else "the device is not CUDA"
        log_once(log, "torch-fallback", "latent loader: using the PyTorch DataLoader (%s)", why)
    return available and on_cuda


def build_latent_loader(
    data_dir: str | Path,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    loader: str = "auto",
    num_workers: int = 2,
    device: str | torch.device | None = "cpu",
    accum_steps: int = 1,
    deep_validate: bool = False,
    **kwargs: Any,
) -> Loader:
    """Validate the store at ``data_dir`` (errors name the file, before training starts) and build this rank's
    endless loader: DALI or the PyTorch DataLoader as :func:`use_dali` decides. ``accum_steps`` (gradient
    accumulation) shapes the global batch, see :class:`~dfm.data.stream.ShardedStream`; ``kwargs`` go to the
    loader."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be positive, got {micro_batch}")
    device = torch.device("cpu") if device is None else torch.device(device)
    store = validate_store(data_dir, world_size=world_size, deep=deep_validate)
    stream = ShardedStream(store.count, rank, world_size, seed, micro_batch, accum_steps)
    if use_dali(loader, device):
        from dfm.data.dali import DaliLatentLoader

        return DaliLatentLoader(store, stream, num_workers, device, **kwargs)
    return TorchLatentLoader(store, stream, num_workers, device, **kwargs)
