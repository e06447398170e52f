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

from dfm.data.stream import ShardedStream, StreamReader


def load_digits_tensor(resolution: int = 16) -> tuple[Tensor, Tensor]:
    """All digits as (1797, 1, R, R) float32 in [-1, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    return x.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


class InMemoryLoader(StreamReader):
    """Endless batches over tensors held in memory, in the order of the shared :class:`ShardedStream`.

    Epoch ``e`` visits one permutation of all ``len(x)`` items drawn from ``(seed, e)``; the epochs, concatenated,
    are cut into global batches of ``G = micro_batch * world_size * accum_steps`` items, and micro-batch ``j`` of
    rank ``r`` is slot ``r * accum_steps + j`` of each. Ranks therefore never share an item within an epoch,
    every epoch is covered (a global batch may straddle two epochs), and the global batch of a step -- its
    composition and its order by slot -- is the same for any split of ``G`` into ranks, accumulation steps and
    micro batch: one rank accumulating two micro-batches sees exactly what two ranks see in one step.

    ``state_dict`` (:class:`StreamReader`) resumes exactly mid-epoch; at a step boundary it is the same on every
    rank and for every layout, so a checkpoint taken with one world size resumes the data stream at another.
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
        super().__init__(ShardedStream(len(x), rank, world_size, seed, micro_batch, accum_steps))
        self.x, self.y = x, y
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _permutation(self, epoch: int) -> Tensor:
        # The stream's permutation becomes a tensor once per epoch; a micro-batch is then slices of it. Building
        # the index tensor from host data in every step would be a host-to-device copy per step wherever the
        # data sat on an accelerator, and is what dfm.host_sync counts as one.
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, torch.from_numpy(self.stream.epoch_permutation(epoch))
        return self._perm

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in self.starts():
            spans = self.stream.spans(start, self.stream.micro_batch)
            idx = torch.cat([self._permutation(epoch)[lo:hi] for epoch, lo, hi in spans])
            self.k += 1  # counted before yielding: the state read after a step is already the next step's
            yield self.x[idx], self.y[idx]
