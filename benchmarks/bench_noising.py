"""Per-stage noising across providers: the eager reference, its torch.compile, the fused Triton kernel.

``pytest benchmarks/bench_noising.py --benchmark-enable``; see ``benchmarks/conftest.py``. Every provider
reads the same ``eps`` tensors.
"""

from __future__ import annotations

import pytest
from conftest import CASES, DTYPES, PROVIDERS, compiled, nbytes, noising_inputs, run
from dfm.kernels import reference


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,stages", CASES, ids=[c[0] for c in CASES])
def test_noise_stages(benchmark, name, shape, stages, dtype, provider):
    x, bands, eps, t, mask = noising_inputs(shape, stages, dtype)
    if provider == "triton":
        from dfm.kernels import noising

        noise = noising.noise_stages
    else:
        noise = compiled(reference.noise_stages) if provider == "compile" else reference.noise_stages
    group = f"noise_stages {name} S={stages} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    run(benchmark, group, provider, lambda: noise(bands, t, mask, eps), nbytes(bands + eps) + 2 * nbytes(bands))
