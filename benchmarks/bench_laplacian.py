"""Laplacian pyramid decomposition and recomposition: eager vs torch.compile vs the fused Triton kernels.

``pytest benchmarks/bench_laplacian.py --benchmark-enable``; see ``benchmarks/conftest.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, DEVICE, DTYPES, PROVIDERS, compiled, nbytes, run

from dfm import pyramid


def implementation(provider: str, op: str):
    if provider == "triton":
        from dfm.kernels import laplacian

        return getattr(laplacian, op)
    fn = getattr(pyramid, op)
    return compiled(fn) if provider == "compile" else fn


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_decompose(benchmark, name, shape, stages, dtype, provider):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    decompose = implementation(provider, "decompose")
    bands = pyramid.decompose(x, stages)
    group = f"decompose {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, lambda: decompose(x, stages), nbytes([x, *bands]))  # read x, write bands


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_recompose(benchmark, name, shape, stages, dtype, provider):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    bands = pyramid.decompose(x, stages)
    recompose = implementation(provider, "recompose")
    group = f"recompose {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, lambda: recompose(bands), nbytes([x, *bands]))  # read bands, write x
