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
    """Endless, per-rank sharded, per-epoch shuffled batches over tensors held in memory.

    Epoch e uses the permutation drawn from ``seed + e``; rank r takes every world_size-th index of it
    (disjoint shards covering the set, up to the remainder that is dropped so all ranks see equal counts).
    ``state_dict`` (epoch, position) resumes exactly mid-epoch.
    """

    def __init__(self, x: Tensor, y: Tensor, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if micro_batch < 1:
            raise ValueError(f"micro batch must be >= 1, got {micro_batch}")
        self.x, self.y = x, y
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.per_rank = len(x) // world_size
        if self.per_rank < micro_batch:
            raise ValueError(
                f"data set of {len(x)} items gives {self.per_rank} per rank over {world_size} ranks, "
                f"fewer than the micro batch {micro_batch}"
            )
        self.epoch, self.position = 0, 0

    def _shard(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.x), generator=g)
        return perm[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            shard = self._shard(self.epoch)
            while self.position + self.micro_batch <= len(shard):
                idx = shard[self.position : self.position + self.micro_batch]
                self.position += self.micro_batch
                yield self.x[idx], self.y[idx]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
