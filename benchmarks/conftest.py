"""Shared pieces of the kernel benchmarks: providers, timing, bandwidth and a ratio summary.

Run with ``pytest benchmarks/bench_laplacian.py --benchmark-enable`` (the project's pytest options
disable benchmarks by default). Every test times one provider on one case:

- ``eager``: the PyTorch reference the code falls back to;
- ``compile``: ``torch.compile`` of that reference (first-call compile time in ``extra_info``);
- ``triton``: the fused kernels through their launcher. CUDA only: on CPU Triton runs in its
  interpreter, whose timings measure NumPy and Python rather than the kernel, so that provider is
  skipped there and the CPU comparison is eager vs compile.

``DFM_BENCH_THREADS=1`` pins CPU runs to one intra-op thread (see below). On GPU ``extra_info``
carries the effective bandwidth (the op's minimal bytes / median time) and its fraction of the card's
peak. At the end a table gives each provider's median and its speed-up over eager.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from dfm import pyramid

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# DFM_BENCH_THREADS sets the CPU intra-op threads. On a machine shared with other work use 1: with OpenMP
# teams a thread descheduled by any other load stalls the whole op at its barrier, and medians of these
# sub-millisecond ops then swing by 100x between runs. The thread count is printed with the results.
if not HAS_CUDA and os.environ.get("DFM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DFM_BENCH_THREADS"]))

# (name, shape, stages): SD-VAE latents at 256 and 512 px, and a raw-pixel pyramid.
if HAS_CUDA:
    CASES = [("latent256", (256, 4, 32, 32), 2), ("latent512", (256, 4, 64, 64), 2), ("pixels", (64, 3, 256, 256), 3)]
    DTYPES = [torch.float32, torch.bfloat16]
else:  # bf16 is emulated on CPU (~40x slower than fp32): fp32 only
    CASES = [("latent256", (32, 4, 32, 32), 2), ("pixels", (4, 3, 256, 256), 3)]
    DTYPES = [torch.float32]


PROVIDERS = [
    "eager",
    "compile",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not HAS_CUDA, reason="on CPU Triton only runs in its interpreter, which times Python, not the kernel"
        ),
    ),
]

# Peak DRAM bandwidth (bytes/s) by device name fragment, from the vendors' data sheets.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
    "L40S": 0.864e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
}

_medians: dict[str, dict[str, float]] = {}


def noising_inputs(shape: tuple[int, ...], stages: int, dtype: torch.dtype):
    """x, its bands, noise per band, t (B, S) and a prefix mask (B, S) on the benchmark device."""
    x = torch.randn(shape, device=DEVICE).to(dtype)
    bands = pyramid.decompose(x, stages)
    eps = [torch.randn_like(b) for b in bands]
    B = shape[0]
    k = torch.randint(0, stages, (B, 1), device=DEVICE)
    mask = torch.arange(stages, device=DEVICE).view(1, -1) <= k
    t = torch.rand(B, stages, device=DEVICE)
    return x, bands, eps, t, mask


def nbytes(tensors) -> int:
    """Bytes held by a list of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_bandwidth() -> float | None:
    if not HAS_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` with static shapes: each benchmark case compiles once, outside the timing."""
    return torch.compile(fn, dynamic=False)


def run(benchmark, group: str, provider: str, fn: Callable[[], object], nbytes: int) -> None:
    """Time ``fn`` (already bound to its inputs) for ``provider`` in ``group``; record bandwidth and median."""
    start = time.perf_counter()
    fn()  # first call: compilation / autotuning / caches, reported but not timed
    synchronize()
    benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 4)
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else f"cpu x{torch.get_num_threads()}"
    benchmark.extra_info["bytes"] = nbytes
    benchmark.group = group

    def timed():
        fn()
        synchronize()

    benchmark(timed)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    median = benchmark.stats.stats.median
    _medians.setdefault(group, {})[provider] = median
    if HAS_CUDA:
        gbps = nbytes / median / 1e9
        benchmark.extra_info["GB/s"] = round(gbps, 1)
        peak = peak_bandwidth()
        if peak is not None:
            benchmark.extra_info["fraction_of_peak"] = round(gbps * 1e9 / peak, 3)


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    device = torch.cuda.get_device_name() if HAS_CUDA else f"cpu, {torch.get_num_threads()} thread(s)"
    terminalreporter.write_sep("-", f"median time and speed-up over eager ({device}, torch {torch.__version__})")
    for group, by_provider in _medians.items():
        eager = by_provider.get("eager")
        cells = []
        for provider, median in by_provider.items():
            ratio = f" ({eager / median:.2f}x)" if eager and provider != "eager" else ""
            cells.append(f"{provider} {median * 1e3:.3f} ms{ratio}")
        terminalreporter.write_line(f"{group}: " + ", ".join(cells))
