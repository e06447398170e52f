"""Decompose + noise, the training step's data path: eager vs torch.compile vs the fused Triton pass.

``pytest benchmarks/bench_pyramid_noise.py --benchmark-enable``; see ``benchmarks/conftest.py``. Every
provider reads the same ``eps`` tensors.
"""

from __future__ import annotations

import pytest
from conftest import CASES, DTYPES, PROVIDERS, compiled, nbytes, noising_inputs, run
from dfm.kernels import reference


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_decompose_and_noise(benchmark, name, shape, stages, dtype, provider):
    x, bands, eps, t, mask = noising_inputs(shape, stages, dtype)
    if provider == "triton":
        from dfm.kernels import pyramid_noise

        step = pyramid_noise.decompose_and_noise
    else:
        eager = reference.decompose_and_noise
        step = compiled(eager) if provider == "compile" else eager
    group = f"decompose_and_noise {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, lambda: step(x, stages, t, mask, eps), nbytes([x, *eps]) + 2 * nbytes(bands))
