"""The card's device-to-device copy bandwidth: the yardstick for the memory-bound kernels.

``pytest benchmarks/bench_copy.py --benchmark-enable --benchmark-json=copy.json``. A kernel that reads
and writes each byte once can at best match ``dst.copy_(src)`` of the same size; the fused pyramid and
noising kernels (``bench_laplacian.py``, ``bench_noising.py``, ``bench_pyramid_noise.py``) report their
bandwidth in the same terms (the op's minimal bytes over the median time), so ``gpu_check.sh`` states
each as a share of this measurement, taken in the same run, rather than of a data-sheet peak that no
copy reaches. 1 GiB on CUDA (far beyond any cache), 64 MiB on CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, run

SIZES = [2**30] if HAS_CUDA else [2**26]  # bytes


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s >> 20}MiB")
def test_copy(benchmark, size):
    src = torch.empty(size // 4, device=DEVICE, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    run(benchmark, f"device copy {size >> 20} MiB", "copy", lambda: dst.copy_(src), 2 * size)  # read + write
