"""Decompose + noise, the training step's data path: eager vs torch.compile vs the fused Triton pass.

``pytest benchmarks/bench_pyramid_noise.py --benchmark-enable``; see ``benchmarks/conftest.py``. The
``triton_philox`` provider draws the noise in-kernel from a seed (no noise tensor read); the others
read the same ``eps`` tensors.
"""

from __future__ import annotations

import pytest
from conftest import CASES, DTYPES, HAS_CUDA, PROVIDERS, compiled, nbytes, noising_inputs, run

from dfm import objective, pyramid

ALL_PROVIDERS = PROVIDERS + [
    pytest.param(
        "triton_philox",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="on CPU Triton only runs in its interpreter"),
    )
]


def decompose_and_noise_eager(x, stages, t, mask, eps):
    return objective.noise_stages(pyramid.decompose(x, stages), t, mask, eps)


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_decompose_and_noise(benchmark, name, shape, stages, dtype, provider):
    x, bands, eps, t, mask = noising_inputs(shape, stages, dtype)
    if provider.startswith("triton"):
        from dfm.kernels import pyramid_noise

        if provider == "triton_philox":
            fn = lambda: pyramid_noise.decompose_and_noise(x, stages, t, mask, seed=0)
        else:
            fn = lambda: pyramid_noise.decompose_and_noise(x, stages, t, mask, eps)
    else:
        step = compiled(decompose_and_noise_eager) if provider == "compile" else decompose_and_noise_eager
        fn = lambda: step(x, stages, t, mask, eps)
    reads = [x] if provider == "triton_philox" else [x, *eps]
    group = f"decompose_and_noise {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, fn, nbytes(reads) + 2 * nbytes(bands))  # write x_t and v
