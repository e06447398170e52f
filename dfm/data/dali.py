"""NVIDIA DALI loader over a latent store: external source → (GPU) → posterior draw → PyTorch iterator.

The sample order comes from :class:`~dfm.data.stream.ShardedStream`, the same as the PyTorch loader's, and is
fed through ``fn.external_source`` with ``batch_info``: iteration ``i`` of a pipeline built at the loader state
``(offset, k0)`` reads this rank's micro-batch ``k0 + i``. Positions are a pure function of the iteration
number, so the batches DALI prefetched but the caller never took are simply produced again after a resume.
DALI's built-in reader shuffling is not used: its shuffle buffer reads ahead across epochs and shards, which
breaks both the per-epoch coverage and exact resumption.

The posterior ``(mean + std * n - shift) * scale`` is drawn by DALI operators, on the GPU when the device is CUDA (the
moments cross PCIe in the store dtype and the noise never does). DALI random operators take one seed per
pipeline, so the pipeline is seeded from the loader state: a resumed run continues the sample order exactly
and draws a deterministic, but different, noise stream than the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from dfm.data.store import LatentStore
from dfm.data.stream import ShardedStream, StreamReader, batch_seed

try:  # optional: selected by dfm.data.use_dali
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError:  # pragma: no cover - exercised where DALI is not installed
    fn = pipeline_def = types = DALIGenericIterator = None


class _ExternalBatches:
    """``fn.external_source`` callable: moments and labels of this rank's micro-batch ``k0 + batch_info.iteration``.

    Picklable (the store drops its memory map), so it also runs in DALI's parallel Python workers.
    """

    def __init__(self, store: LatentStore, stream: ShardedStream, offset: int, k0: int):
        self.store, self.stream, self.offset, self.k0 = store, stream, offset, k0

    def __call__(self, batch_info) -> tuple[np.ndarray, np.ndarray]:
        start = self.stream.micro_start(self.offset, self.k0 + batch_info.iteration)
        idx = self.stream.indices(start, self.stream.micro_batch)
        return self.store.gather(idx), self.store.labels[idx]


def _dali_type(dtype: np.dtype):
    return {np.dtype(np.float16): types.FLOAT16, np.dtype(np.float32): types.FLOAT}[np.dtype(dtype)]


class DaliLatentLoader(StreamReader):
    """Endless DALI loader over a latent store, reading ``stream``; CPU or GPU operators depending on ``device``.

    ``num_workers > 0`` runs the external source in that many DALI Python worker processes (spawned, so safe
    after CUDA initialisation); ``num_threads`` is DALI's operator thread pool.
    """

    def __init__(
        self,
        store: LatentStore,
        stream: ShardedStream,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        num_threads: int = 2,
        prefetch_queue_depth: int = 2,
    ):
        if pipeline_def is None:
            raise RuntimeError("DaliLatentLoader needs nvidia.dali (pip install nvidia-dali-cuda130)")
        super().__init__(stream)
        if stream.count != store.count:
            raise ValueError(f"a stream over {stream.count} samples cannot read the {store.count} of {store.root}")
        self.store, self.device = store, torch.device(device)
        self.num_workers, self.num_threads, self.prefetch_queue_depth = num_workers, num_threads, prefetch_queue_depth

    def _pipeline(self, offset: int, k0: int):
        on_gpu = self.device.type == "cuda"
        c, scale, shift = self.store.channels, self.store.scale, self.store.shift
        source = _ExternalBatches(self.store, self.stream, offset, k0)
        parallel = self.num_workers > 0
        device_id = None  # None: a CPU-only pipeline, which needs no CUDA at all
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

        @pipeline_def(
            batch_size=self.stream.micro_batch,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=batch_seed(self.stream.seed, self.stream.micro_start(offset, k0)) % 2**31,
            prefetch_queue_depth=self.prefetch_queue_depth,
            py_num_workers=max(self.num_workers, 1),
            py_start_method="spawn",
        )
        def latent_pipeline():
            # In parallel mode each worker prepares one batch per slot of the source's own queue (default 1):
            # with one slot per worker, every worker has a batch in flight instead of all but one idling.
            queue = {"prefetch_queue_depth": max(self.num_workers, 1)} if parallel else {}
            moments, y = fn.external_source(
                source,
                num_outputs=2,
                batch=True,
                batch_info=True,
                parallel=parallel,
                dtype=[_dali_type(self.store.dtype), types.INT64],
                ndim=[3, 0],
                **queue,
            )
            if on_gpu:
                moments, y = moments.gpu(), y.gpu()
            moments = fn.cast(moments, dtype=types.FLOAT)
            mean, std = moments[0:c], moments[c : 2 * c]
            n = fn.random.normal(mean)  # same shape as mean, on the same device
            return (mean + std * n - shift) * scale, y

        pipe = latent_pipeline()
        if parallel:
            pipe.start_py_workers()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        pipe = self._pipeline(self.offset, self.k)
        # The source never ends, so neither does the iterator; no reader, so no epoch size to announce.
        batches = DALIGenericIterator([pipe], ["x", "y"], auto_reset=False)
        for out in batches:
            x, y = out[0]["x"], out[0]["y"].view(-1)
            self.k += 1  # the caller holds this batch from here on
            yield x, y
