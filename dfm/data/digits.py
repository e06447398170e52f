"""The embedded default data set: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

Shipped inside scikit-learn, so a fresh machine trains on real data without a download. Images are
bilinearly resized to ``resolution`` and scaled to [-1, 1]; one channel; labels 0..9.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def load_digits_tensor(resolution: int = 16) -> tuple[Tensor, Tensor]:
    """All digits as (1797, 1, R, R) float32 in [-1, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    return x.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


class InMemoryLoader:
    """Endless batches over tensors held in memory; the ranks' micro-batches are slices of one global batch.

    Epoch ``e`` draws a permutation of the data set from ``seed + e`` and cuts it into global batches of
    ``G = micro_batch * world_size * accum_steps`` items (a remainder of fewer than G items is dropped, so
    every rank sees the same count). Micro-batch ``j`` of rank ``r`` in global batch ``b`` is the slice
    ``slot = r * accum_steps + j`` of it: ``perm[b*G + slot*m : b*G + (slot+1)*m]``. Ranks therefore never
    share a sample within an epoch, and the global batch of a step -- its composition and its order by
    slot -- is the same for any split of ``G`` into ranks, accumulation steps and micro batch; with the same
    micro batch ``m`` each slot holds the same samples too, so one rank accumulating two micro-batches sees
    exactly what two ranks see in one step.

    ``state_dict`` (epoch, global batches done, micro-batches done in the current one) resumes exactly
    mid-epoch; at a step boundary it is the same on every rank and for every layout, so a checkpoint taken
    with one world size resumes the data stream at another.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        accum_steps: int = 1,
    ):
        if micro_batch < 1 or accum_steps < 1:
            raise ValueError(f"micro batch and accumulation steps must be >= 1, got {micro_batch}, {accum_steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.x, self.y = x, y
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.accum_steps = accum_steps
        self.global_batch = micro_batch * world_size * accum_steps
        self.batches_per_epoch = len(x) // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"data set of {len(x)} items is smaller than one global batch of {self.global_batch} "
                f"(micro batch {micro_batch} x {world_size} ranks x {accum_steps} accumulation steps)"
            )
        self.epoch, self.batch, self.micro = 0, 0, 0

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.x), generator=g)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        m, perm, perm_epoch = self.micro_batch, None, None
        while True:
            if perm_epoch != self.epoch:
                perm, perm_epoch = self._permutation(self.epoch), self.epoch
            start = self.batch * self.global_batch + (self.rank * self.accum_steps + self.micro) * m
            idx = perm[start : start + m]
            # advance before yielding, so that the state read after a step is already the next step's
            self.micro += 1
            if self.micro == self.accum_steps:
                self.batch, self.micro = self.batch + 1, 0
                if self.batch == self.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.micro = int(state["epoch"]), int(state["batch"]), int(state["micro"])
