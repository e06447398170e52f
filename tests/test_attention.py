"""Every attention backend available on this machine vs the math reference, and the backend predicate."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from parity import assert_parity

from dfm import attention as attn
from dfm.attention import attention, attention_math, backend_for, forced_backend, select_backend

CUDA = torch.cuda.is_available()


def _runs(backend: str, device: str, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> bool:
    """Whether ``backend`` takes q, k, v of ``shape`` (B, heads, N, head_dim)."""
    try:
        with forced_backend(backend):
            q = torch.randn(shape, device=device, dtype=dtype)
            attention(q, q, q)
        return True
    except RuntimeError:
        return False


def _available(device: str, dtype: torch.dtype, head_dim: int) -> list[str]:
    return [b for b in attn.BACKENDS if b not in ("auto", "math") and _runs(b, device, dtype, (1, 1, 4, head_dim))]


def _qkv(shape, dtype, device, layout, seed=0):
    """q, k, v of ``shape`` (B, heads, N, head_dim); ``qkv_view`` slices them from one projection like the model."""
    B, H, N, D = shape
    g = torch.Generator(device=device).manual_seed(seed)
    if layout == "qkv_view":
        qkv = torch.randn(B, N, 3, H, D, generator=g, device=device).to(dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return [torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(3)]


CASES = [  # (B, heads, N, head_dim): a single token, odd token counts, the S/B head dim 64 and XL's 72
    (1, 1, 1, 64),
    (2, 6, 17, 64),
    (3, 2, 64, 72),
    (1, 4, 33, 32),
]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def _params():
    devices = ["cpu"] + (["cuda"] if CUDA else [])
    for device in devices:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
        for dtype in dtypes:
            for backend in _available(device, dtype, 64):
                yield pytest.param(device, dtype, backend, id=f"{device}-{str(dtype)[6:]}-{backend}")


@pytest.mark.parametrize("device, dtype, backend", list(_params()))
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "qkv_view"])
def test_backend_matches_math_reference(device, dtype, backend, shape, layout):
    if not _runs(backend, device, dtype, (1, 1, 4, shape[-1])):
        pytest.skip(f"{backend} does not take head dim {shape[-1]} on {device}")
    if backend == "sdpa_cudnn" and shape[2] == 1:  # the one length it refuses: a backend that takes the head
        pytest.skip("cuDNN's SDPA refuses a key/value length of 1")  # dim must take every other shape here
    q, k, v = _qkv(shape, dtype, device, layout)
    for t in (q, k, v):
        t.requires_grad_(True)
    with forced_backend(backend):
        out = attention(q, k, v)
    ref_same = attention_math(q, k, v)  # torch's own error in this dtype
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref64 = attention_math(q64, k64, v64)
    assert out.shape == shape and out.dtype == dtype

    def check(fast, same, ref, what):
        assert_parity(fast, same, ref, ATOL[dtype], f"{what} of {backend} (torch: the math backend)")

    check(out, ref_same, ref64, "output")
    # Gradients through the backend (the training path) against the same reference.
    grad_out = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(7), device=device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    grads_same = torch.autograd.grad(ref_same, (q, k, v), grad_out.to(dtype))
    grads64 = torch.autograd.grad(ref64, (q64, k64, v64), grad_out.double())
    for name, g, gs, g64 in zip("qkv", grads, grads_same, grads64):
        check(g, gs, g64, f"d{name}")


def test_auto_on_cpu_is_sdpa_and_forcing_changes_the_choice():
    q = torch.randn(1, 2, 8, 64)
    assert attn.requested_backend() == "auto"
    assert select_backend(q) == "sdpa"
    with forced_backend("math"):
        assert select_backend(q) == "math" and attn.requested_backend() == "math"
        with forced_backend("sdpa_flash"):
            assert select_backend(q) == "sdpa_flash"
        assert select_backend(q) == "math"
    assert attn.requested_backend() == "auto"


@pytest.mark.parametrize("backend", ["flash_attn2", "flash_attn3", "sdpa_efficient", "sdpa_cudnn"])
def test_forced_backend_that_cannot_run_raises(backend):
    q = torch.randn(1, 2, 8, 64)  # fp32 on CPU: none of these kernels takes it
    with forced_backend(backend), pytest.raises(RuntimeError, match=backend):
        attention(q, q, q)


def test_forced_flash_attn_names_the_reason():
    q = torch.randn(1, 2, 8, 64)
    with forced_backend("flash_attn2"), pytest.raises(RuntimeError) as info:
        select_backend(q)
    expected = "not installed" if attn.flash_attn2_func is None else "CUDA"
    assert expected in str(info.value)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="flash_attn2"):  # the message lists the valid names
        attn.set_attention_backend("flash")
    assert attn.requested_backend() == "auto"


def test_environment_variable_forces_the_backend():
    code = "from dfm import attention as a; import torch; q = torch.randn(1, 1, 4, 8); print(a.select_backend(q))"
    env = {**os.environ, attn.ENV_VAR: "math"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "math"


def test_choice_is_logged_once(caplog):
    q = torch.randn(1, 2, 5, 40, dtype=torch.float64)  # a (dtype, head dim) no other test uses
    with caplog.at_level(logging.INFO, logger="dfm.attention"):
        for _ in range(3):
            attention(q, q, q)
        assert backend_for("cpu", torch.float64, 40) == "sdpa"
    records = [r for r in caplog.records if r.name == "dfm.attention" and "head_dim 40" in r.getMessage()]
    assert len(records) == 1
    assert "sdpa" in records[0].getMessage() and "flash-attn" in records[0].getMessage()  # says why not flash


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_auto_choice_follows_the_head_dim_rule():
    for head_dim in (64, 72):
        choice = backend_for("cuda", torch.bfloat16, head_dim)
        flash = attn.flash_attn2_func is not None or attn.flash_attn3_func is not None
        if flash and head_dim in attn.FLASH_KERNEL_HEAD_DIMS:
            assert choice.startswith("flash_attn")
        else:
            assert choice == "sdpa"
    assert backend_for("cuda", torch.float32, 64) == "sdpa"
