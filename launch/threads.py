"""Intra-op CPU threads per rank: chosen deliberately, set once at start, and said in the start-up lines.

torch runs its CPU operators on an OpenMP pool that defaults to one thread per core, in every process. Its
threads spin-wait at the end of each operator, so the pool is only as fast as its slowest thread: when a core
is also wanted by a data-loading worker, the Python thread that queues the work, another rank or another job,
every operator waits for the thread that lost its core. On a 2-core machine shared with other jobs, the
width-128 digits model trained at 4.3-6.6 steps/s with one thread and 0.6-0.7 with two (the default of a plain
process); a width-64 model at 61 steps/s against 1.5-2.3. ``torchrun`` sets ``OMP_NUM_THREADS=1`` when it starts
several ranks; a plain ``dfm train`` has no launcher to do it.

The choice (:func:`choose_threads`), in order: ``train.threads``; ``$OMP_NUM_THREADS`` (a launcher's or the
user's); otherwise ``usable cores // ranks on this node - 1`` (at least 1), leaving a core per rank to the
data workers, the Python thread and the rest of the machine. On an idle machine more threads can help a large
model on CPU: set ``train.threads``. The thread count changes the order of floating-point sums in CPU
kernels, so runs compared bit for bit must use the same count.
"""

from __future__ import annotations

import os

import torch


def local_world_size(env=None) -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (the deepspeed launcher), else 1."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a batch scheduler may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None, env=None, cores: int | None = None) -> tuple[int, str]:
    """``(threads per rank, why)``: see the module docstring for the order of the sources."""
    env = os.environ if env is None else env
    if requested is not None:
        return requested, "train.threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores = usable_cores() if cores is None else cores
    local = local_world_size(env)
    threads = max(1, cores // local - 1)
    return threads, f"{cores} usable cores / {local} rank(s) on this node, one core each left free"


def set_threads(requested: int | None = None) -> tuple[int, str]:
    """Choose (:func:`choose_threads`) and set this process's intra-op thread count; returns ``(threads, why)``."""
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads, why


__all__ = ["choose_threads", "local_world_size", "set_threads", "usable_cores"]
