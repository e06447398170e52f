"""The few process-group helpers every layer needs, in one place, all working without a process group too.

A decision one rank takes (rank 0 choosing the checkpoint to resume, a save that failed on some rank) must
reach every rank, or the others wait forever at the next barrier: :func:`all_ok` and :func:`agree` are
those collectives, and they take the place of a barrier where one would stand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce; every rank must call it, at save or start only)."""
    if not initialized() or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agree(decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide()``; every rank returns its result, or every rank raises the error it raised
    (any ``Exception``: the others must not wait for a broadcast that never comes)."""
    box: list = [None, None]
    if rank() == 0:
        try:
            box[0] = decide()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            box[1] = err
    if initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


__all__ = ["agree", "all_ok", "barrier", "initialized", "rank", "world_size"]
