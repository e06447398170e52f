"""Helpers of the kernel parity tests: devices, dtypes, layouts, inputs and the tolerance rule."""

from __future__ import annotations

import pytest
import torch
from parity import assert_parity as check
from parity import max_err  # noqa: F401  (re-exported for the kernel tests)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels run compiled, on the GPU")),
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "sliced", "channels_last"]

# Absolute slack on top of twice torch's own error, about one ulp at unit scale: inputs are N(0, 1).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make(shape: tuple[int, ...], dtype: torch.dtype, device: str, layout: str = "contiguous", seed: int = 0):
    """Standard-normal tensor of ``shape`` in the given memory layout (values independent of the layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "sliced":  # every other column of a wider tensor: no unit stride anywhere but the batch
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=torch.float64)
        wide[..., ::2] = x
        return wide.to(dtype=dtype, device=device)[..., ::2]
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def assert_parity(fast, torch_same_dtype, ref64, dtype: torch.dtype) -> None:
    """The parity rule (tests/parity.py) with this folder's per-dtype slack."""
    check(fast, torch_same_dtype, ref64, ATOL[dtype], f"kernel ({dtype})")
