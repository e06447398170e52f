"""The sample stream every loader reads: order, sharding, the resumable position, and the posterior draw.

Epoch ``e`` visits one permutation of all ``N`` samples drawn from ``(seed, e)``; the epochs' permutations,
concatenated, are cut into global batches of ``micro_batch * world_size * accum_steps`` and every rank reads its
own slots of each global batch (:class:`ShardedStream`). Shards are disjoint, every epoch is covered (nothing
dropped or padded), and the position at a step boundary, ``{"samples_seen": ...}``, is the same on every rank
and resumes at any world size (:class:`StreamReader`). The loaders over the latent store
(:mod:`dfm.data.torch_loader`, :mod:`dfm.data.dali`) and over the in-memory digits (:mod:`dfm.data.digits`)
differ only in how they fetch the samples at the positions the stream names.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from dfm.data.store import LATENT_SCALE


class ShardedStream:
    """Which samples rank ``rank`` reads, micro-batch by micro-batch.

    The global stream is one seeded permutation of all ``N`` samples per epoch, epochs concatenated. It is cut
    into global batches of ``G = micro_batch * world_size * accum_steps`` positions; micro-batch ``j`` of rank
    ``r`` in a global batch is slot ``r * accum_steps + j`` of it, ``micro_batch`` consecutive positions. So the
    ranks' shards are disjoint and together cover every epoch (a global batch may straddle two epochs; nothing
    is dropped or padded), and a global batch does not depend on how ``G`` is split into ranks and accumulation
    steps: a run resumes at another world size with the same global stream.

    Positions count from ``offset`` (the global samples consumed before a loader started); ``k`` numbers this
    rank's micro-batches from there.
    """

    def __init__(self, count: int, rank: int, world_size: int, seed: int, micro_batch: int, accum_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch < 1 or accum_steps < 1:
            raise ValueError(f"micro_batch and accum_steps must be positive, got {micro_batch} and {accum_steps}")
        if count < world_size:
            raise ValueError(f"{count} samples cannot give each of {world_size} ranks a non-empty shard")
        self.count, self.rank, self.world_size, self.seed = count, rank, world_size, seed
        self.micro_batch, self.accum_steps = micro_batch, accum_steps
        self.global_batch = micro_batch * world_size * accum_steps
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The global visiting order of epoch ``epoch`` (sample indices), the same on every rank."""
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._perm

    def spans(self, start: int, n: int) -> Iterator[tuple[int, int, int]]:
        """Global positions ``[start, start + n)`` as ``(epoch, lo, hi)`` pieces, in order: positions ``lo:hi`` of
        epoch ``epoch``'s permutation (more than one piece where the range straddles epochs)."""
        end = start + n
        while start < end:
            epoch, pos = divmod(start, self.count)
            hi = min(self.count, pos + end - start)
            yield epoch, pos, hi
            start += hi - pos

    def indices(self, start: int, n: int) -> np.ndarray:
        """Sample indices at global positions ``[start, start + n)``; may straddle epochs."""
        pieces = [self.epoch_permutation(epoch)[lo:hi] for epoch, lo, hi in self.spans(start, n)]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def micro_start(self, offset: int, k: int) -> int:
        """Global position of this rank's ``k``-th micro-batch after ``offset``."""
        b, j = divmod(k, self.accum_steps)
        return offset + b * self.global_batch + (self.rank * self.accum_steps + j) * self.micro_batch


class StreamReader:
    """Base of every loader: its position in a :class:`ShardedStream` and the ``state_dict`` that resumes it.

    The position is ``offset`` (global samples consumed when the loader started or was resumed) plus ``k``
    micro-batches this rank has handed out since. A loader counts a micro-batch (``k += 1``) just before it
    yields it, so a state read after a training step already names the next step's data. At a step boundary
    the state is the same on every rank and for every split of the global batch, which is what lets a
    checkpoint resume at another world size.
    """

    def __init__(self, stream: ShardedStream):
        self.stream = stream
        self.offset, self.k = 0, 0

    def starts(self) -> Iterator[int]:
        """Global positions of this rank's micro-batches from the current one on (endless)."""
        offset = self.offset
        return (self.stream.micro_start(offset, k) for k in itertools.count(self.k))

    def state_dict(self) -> dict:
        steps, micro = divmod(self.k, self.stream.accum_steps)
        samples_seen = self.offset + steps * self.stream.global_batch  # global samples of the completed steps
        epoch, position = divmod(samples_seen, self.stream.count)
        return {
            "samples_seen": samples_seen,
            "micro": micro,  # micro-batches of an unfinished accumulation (0 at a step boundary)
            "epoch": epoch,  # samples_seen as (epoch, position in its permutation)
            "position": position,
            "global_batch": self.stream.global_batch,
            "world_size": self.stream.world_size,
            "seed": self.stream.seed,
            "count": self.stream.count,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("count", self.stream.count), ("seed", self.stream.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {key}={mine}: cannot resume")
        if "samples_seen" not in state and "position" not in state:
            raise ValueError(f"loader state {sorted(state)} names no stream position (samples_seen or position)")
        micro = int(state.get("micro", 0))
        layout = (state.get("global_batch"), state.get("world_size"))
        if micro and layout != (self.stream.global_batch, self.stream.world_size):
            raise ValueError(
                f"loader state stops {micro} micro-batches into an accumulation of global batch {layout[0]} on "
                f"{layout[1]} ranks; this loader has {self.stream.global_batch} on {self.stream.world_size}: "
                "resume at a step boundary to change the layout"
            )
        if "samples_seen" in state:
            self.offset = int(state["samples_seen"])
        else:
            self.offset = int(state["epoch"]) * self.stream.count + int(state["position"])
        self.k = micro


def batch_seed(seed: int, start: int) -> int:
    """Seed of the posterior noise of the micro-batch at global position ``start``: rank-independent, so a
    global batch draws the same noise however it is split into ranks (for one micro-batch size)."""
    return int(np.random.SeedSequence([seed, start, 0x9E3779B9]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_posterior(
    moments: Tensor, scale: float = LATENT_SCALE, generator: torch.Generator | None = None, shift: float = 0.0
) -> Tensor:
    """Draw ``(mean + std * n - shift) * scale`` from moments ``(B, 2C, h, w)``; float32 out whatever the store
    dtype. ``shift`` is the VAE's ``shift_factor`` (0 for the SD VAE)."""
    mean, std = moments.float().chunk(2, dim=1)
    n = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = n.mul_(std).add_(mean)  # in place: no temporaries
    return (z.sub_(shift) if shift else z).mul_(scale)
