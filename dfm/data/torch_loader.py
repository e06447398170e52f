"""The PyTorch ``DataLoader`` loader over a latent store: the fallback beside DALI, and the choice on CPU.

Items are whole micro-batches at the stream's positions (:class:`~dfm.data.stream.ShardedStream`), gathered in
one fancy-indexed read of the memory map rather than ``micro_batch`` item reads and a collate.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from dfm.data.store import LatentStore
from dfm.data.stream import ShardedStream, StreamReader, batch_seed, sample_posterior


class _BatchDataset(torch.utils.data.Dataset):
    """Item ``start`` is the whole micro-batch at global position ``start``.

    With ``draw`` the posterior sample is drawn here (in the worker); otherwise the moments are returned and the
    caller draws on its device.
    """

    def __init__(self, store: LatentStore, stream: ShardedStream, draw: bool):
        self.store, self.stream, self.draw = store, stream, draw

    def __getitem__(self, start: int) -> tuple[Tensor, Tensor, int]:
        idx = self.stream.indices(start, self.stream.micro_batch)
        moments = torch.from_numpy(self.store.gather(idx))
        y = torch.from_numpy(self.store.labels[idx])
        if self.draw:
            g = torch.Generator().manual_seed(batch_seed(self.stream.seed, start))
            return sample_posterior(moments, self.store.scale, g, self.store.shift), y, start
        return moments, y, start


class TorchLatentLoader(StreamReader):
    """Endless loader over a latent store built on ``torch.utils.data.DataLoader``, reading ``stream``.

    The noise of each micro-batch is seeded by ``(seed, global position)``, so a resumed run reproduces the
    uninterrupted one exactly, noise included, whatever ``num_workers`` is. On CUDA the moments travel pinned
    and the posterior is drawn on the device; on CPU the workers draw it.
    """

    def __init__(
        self,
        store: LatentStore,
        stream: ShardedStream,
        num_workers: int = 2,
        device: str | torch.device = "cpu",
        prefetch_factor: int = 2,
    ):
        super().__init__(stream)
        if stream.count != store.count:
            raise ValueError(f"a stream over {stream.count} samples cannot read the {store.count} of {store.root}")
        self.store = store
        self.num_workers, self.device, self.prefetch_factor = num_workers, torch.device(device), prefetch_factor

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        on_cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self.store, self.stream, draw=not on_cuda),
            batch_size=None,  # items are already batches
            sampler=self.starts(),
            num_workers=self.num_workers,
            pin_memory=on_cuda,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        generator = torch.Generator(self.device) if on_cuda else None
        for out, y, start in loader:
            if on_cuda:
                generator.manual_seed(batch_seed(self.stream.seed, start))
                moments = out.to(self.device, non_blocking=True)
                out = sample_posterior(moments, self.store.scale, generator, self.store.shift)
                y = y.to(self.device, non_blocking=True)
            self.k += 1  # the caller holds this batch from here on
            yield out, y
