"""Per-stage noising across providers.

``pytest benchmarks/bench_noising.py --benchmark-enable``; see ``benchmarks/conftest.py``. The
``triton_philox`` provider draws the noise in-kernel from a seed (no noise tensor read); the others
read the same ``eps`` tensors.
"""

from __future__ import annotations

import pytest
from conftest import CASES, DTYPES, HAS_CUDA, PROVIDERS, compiled, nbytes, noising_inputs, run

from dfm import objective

ALL_PROVIDERS = PROVIDERS + [
    pytest.param(
        "triton_philox",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="on CPU Triton only runs in its interpreter"),
    )
]


@pytest.mark.parametrize("provider", ALL_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_noise_stages(benchmark, name, shape, stages, dtype, provider):
    x, bands, eps, t, mask = noising_inputs(shape, stages, dtype)
    if provider.startswith("triton"):
        from dfm.kernels import noising

        if provider == "triton_philox":
            fn = lambda: noising.noise_stages(bands, t, mask, seed=0)
        else:
            fn = lambda: noising.noise_stages(bands, t, mask, eps)
    else:
        noise = compiled(objective.noise_stages) if provider == "compile" else objective.noise_stages
        fn = lambda: noise(bands, t, mask, eps)
    reads = bands if provider == "triton_philox" else bands + eps
    group = f"noise_stages {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, fn, nbytes(reads) + 2 * nbytes(bands))  # write x_t and v
