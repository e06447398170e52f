"""Latent loader throughput: DALI vs the PyTorch DataLoader, on the packed store and on per-image ``.npy`` files.

``pytest benchmarks/bench_loader.py --benchmark-enable``. Each case pulls ``BATCHES`` micro-batches of SD-VAE
256 px moments ``(8, 32, 32)`` float32 from a warm, endless loader (pipeline and worker start-up is reported as
``first_call_s``, not timed) and records samples/s; the summary gives each provider's ratio over the
DataLoader without workers (``torch-w0``). The stores sit in the page cache, so this measures the loaders'
CPU cost (gather, posterior draw, batching), not the disk. On CUDA the batches land on the GPU: DALI draws
the noise with GPU operators, the DataLoader path draws it on the device after a pinned copy.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from dfm.data import build_latent_loader, dali
from dfm.data.store import write_store

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
THREADS = torch.get_num_threads()  # read at import: a loader's worker set-up may change it later
COUNT = 4096  # 128 MiB of float32 moments: large enough to defeat CPU caches, small enough for the page cache
SHAPE = (8, 32, 32)  # SD-VAE moments of a 256 px image
MICRO_BATCH = 128
BATCHES = 8  # per timed round: 1024 samples
BASELINE = "torch-w0"

# provider -> (loader, workers). DALI's workers are its parallel external-source processes.
PROVIDERS = {
    "torch-w0": ("torch", 0),
    "torch-w2": ("torch", 2),
    "dali-w0": ("dali", 0),
    "dali-w2": ("dali", 2),
}

_samples_per_s: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((COUNT, *SHAPE), dtype=np.float32)
    moments[:, 4:] = np.abs(moments[:, 4:]) * 0.1
    labels = rng.integers(0, 1000, COUNT)
    root = tmp_path_factory.mktemp("bench_loader")
    return {layout: write_store(root / layout, moments, labels, 1000, layout=layout) for layout in ("packed", "files")}


class _Summary:
    """Plugin registered at run time: prints samples/s and ratios after pytest-benchmark's tables."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _samples_per_s:
            return
        device = torch.cuda.get_device_name() if HAS_CUDA else f"cpu, {THREADS} torch threads, {os.cpu_count()} cores"
        terminalreporter.write_sep("-", f"loader samples/s and ratio over {BASELINE} ({device})")
        for group, by_provider in _samples_per_s.items():
            base = by_provider.get(BASELINE)
            cells = [
                f"{p} {v:,.0f}/s" + (f" ({v / base:.2f}x)" if base and p != BASELINE else "")
                for p, v in by_provider.items()
            ]
            terminalreporter.write_line(f"{group}: " + ", ".join(cells))


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    if not request.config.pluginmanager.has_plugin("bench_loader_summary"):
        request.config.pluginmanager.register(_Summary(), "bench_loader_summary")


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("layout", ["packed", "files"])
def test_loader_throughput(benchmark, stores, layout, provider):
    kind, workers = PROVIDERS[provider]
    if kind == "dali" and dali.pipeline_def is None:
        pytest.skip("needs nvidia.dali")
    start = time.perf_counter()
    loader = build_latent_loader(stores[layout], MICRO_BATCH, seed=0, loader=kind, num_workers=workers, device=DEVICE)
    batches = iter(loader)
    next(batches)  # start-up: workers, pipeline build, first batch
    benchmark.extra_info.update(
        provider=provider, layout=layout, device=DEVICE, first_call_s=round(time.perf_counter() - start, 3)
    )
    benchmark.group = f"loader {layout} B={MICRO_BATCH} {SHAPE} float32 {DEVICE}"

    def pull():
        for _ in range(BATCHES):
            x, _ = next(batches)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return x

    x = benchmark.pedantic(pull, rounds=5, warmup_rounds=1, iterations=1)
    assert x.shape == (MICRO_BATCH, SHAPE[0] // 2, *SHAPE[1:]) and x.dtype == torch.float32
    if benchmark.stats is None:  # --benchmark-disable
        return
    rate = BATCHES * MICRO_BATCH / benchmark.stats.stats.median
    benchmark.extra_info["samples_per_s"] = round(rate, 1)
    _samples_per_s.setdefault(benchmark.group, {})[provider] = rate
