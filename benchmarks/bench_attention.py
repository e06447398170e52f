"""Attention backends (``dfm.attention``), forward + backward, at the models' shapes.

``pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-json=attention.json``, then
``python benchmarks/render.py attention.json``. The ``eager`` provider is the explicit-softmax math
reference; every other provider is a backend forced through ``dfm.attention.forced_backend``, and a
backend that cannot take the case is skipped. Head dim 64 is DFM-SiT-S/B/L, 72 is XL: the case behind
``FLASH_KERNEL_HEAD_DIMS`` (flash-attn pads 72 to its 96 kernel), to be measured on a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from dfm import flops
from dfm.attention import BACKENDS, attention, forced_backend

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32  # bf16 is emulated on CPU
BATCH = 32 if HAS_CUDA else 2
TOKENS = 256  # 32x32x4 latents with patch 2
CASES = [("S/B", 6 if not HAS_CUDA else 12, 64), ("XL", 16, 72)]  # (name, heads, head_dim)
PROVIDERS = ["eager"] + [b for b in BACKENDS if b not in ("auto", "math")]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, heads, head_dim", CASES, ids=[c[0] for c in CASES])
def test_attention(benchmark, name, heads, head_dim, provider):
    shape = (BATCH, heads, TOKENS, head_dim)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    backend = "math" if provider == "eager" else provider

    def step():
        with forced_backend(backend):
            out = attention(q, k, v)
        out.backward(grad)
        synchronize()

    try:
        start = time.perf_counter()
        step()
    except RuntimeError as err:
        pytest.skip(f"{provider} cannot run this case here: {str(err).splitlines()[0]}")
    benchmark.extra_info.update(
        provider=provider,
        first_call_s=round(time.perf_counter() - start, 4),
        device=flops.device_name(DEVICE),
        torch=torch.__version__,
    )
    benchmark.group = f"attention fwd+bwd {name} {'x'.join(map(str, shape))} {str(DTYPE)[6:]}"
    benchmark.pedantic(step, rounds=20 if HAS_CUDA else 5, iterations=1)
    if benchmark.stats is not None and HAS_CUDA:
        # 4 N^2 d per head forward, 2.5x that backward (flash-attn's accounting: 5 matmuls, one recomputed).
        work = 3.5 * 4 * BATCH * heads * TOKENS * TOKENS * head_dim
        benchmark.extra_info["tflops"] = round(work / benchmark.stats.stats.median / 1e12, 1)
