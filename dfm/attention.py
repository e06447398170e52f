"""Scaled dot-product attention used by the transformer blocks, with its backends behind one predicate.

The model calls :func:`attention` on (B, heads, N, head_dim) tensors and never changes when a backend is
added. :func:`select_backend` is the one predicate that picks the kernel from the tensors' device, dtype
and head dim (and an optional forced choice):

- ``flash_attn3`` / ``flash_attn2``: the flash-attn packages, when importable and the tensors qualify
  (CUDA, fp16/bf16, a head dim with its own kernel; FA3 only on Hopper, FA2 from Ampere on).
  FlashAttention pads a head dim up to the next kernel size (32, 64, 96, ...): the XL models' head dim
  72 runs the 96 kernel and wastes a third of the attention matmul work, so ``auto`` prefers flash-attn
  only for head dims that are exact kernel sizes (64 for S/B/L) and leaves 72 to SDPA until a GPU
  measurement says otherwise (``benchmarks/bench_attention.py`` times every backend at 64 and 72).
- ``sdpa``: ``F.scaled_dot_product_attention``, which itself picks flash / memory-efficient / cuDNN on
  CUDA and its fused C++ kernel (or math) on CPU. On a 2-core AVX2 CPU the fused CPU kernel is 1.8-2.4x
  faster than the math kernel for (B, 6, 256, 64) fp32, so ``auto`` keeps SDPA on CPU too.
- ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``: SDPA restricted to one kernel.
- ``math``: :func:`attention_math`, the explicit softmax reference in plain PyTorch.

Force a backend with the environment variable ``DFM_ATTENTION_BACKEND`` or :func:`set_attention_backend`
(also a context manager through :func:`forced_backend`). A forced backend that cannot run on the given
tensors raises; ``auto`` never raises and logs its choice once per (device, dtype, head dim).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dfm.files import env_switch, log_once

# Optional imports set the name to None. A flash-attn wheel built against another torch can fail with
# an OSError or RuntimeError as well as an ImportError, hence the broad except.
try:
    from flash_attn import flash_attn_func as flash_attn2_func
except Exception:
    flash_attn2_func = None
try:
    from flash_attn_interface import flash_attn_func as flash_attn3_func
except Exception:
    flash_attn3_func = None

logger = logging.getLogger(__name__)

ENV_VAR = "DFM_ATTENTION_BACKEND"
SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
BACKENDS = ("auto", "flash_attn3", "flash_attn2", "sdpa", *SDPA_KERNELS, "math")
# Head dims with a kernel of their own in both FA2 and FA3; anything else is padded up to one of these.
FLASH_KERNEL_HEAD_DIMS = (64, 96, 128, 192, 256)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class _State:
    requested: str = "auto"


_state = _State()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_attention_backend(name: str) -> None:
    """Force an attention backend for every later call (``"auto"`` restores the automatic choice)."""
    _state.requested = _check_name(name)


def requested_backend() -> str:
    """The backend asked for: ``set_attention_backend``, else ``$DFM_ATTENTION_BACKEND``, else ``auto``."""
    return _state.requested


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Context manager forcing ``name`` inside the block and restoring the previous choice after it."""
    previous = _state.requested
    set_attention_backend(name)
    try:
        yield
    finally:
        _state.requested = previous


def _flash_unavailable(version: int, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn ``version`` cannot run on these tensors, or None when it can."""
    func = flash_attn3_func if version == 3 else flash_attn2_func
    if func is None:
        return f"flash-attn {version} is not installed"
    if device.type != "cuda":
        return f"flash-attn needs CUDA tensors, got {device.type}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16, got {dtype}"
    if head_dim % 8 != 0 or head_dim > 256:
        return f"flash-attn needs a head dim that is a multiple of 8 up to 256, got {head_dim}"
    major = torch.cuda.get_device_capability(device)[0]
    if version == 3 and major != 9:
        return "flash-attn 3 runs on Hopper GPUs (compute capability 9.x) only"
    if version == 2 and major < 8:
        return "flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0)"
    return None


def _choose(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    """(backend, reason) for tensors of this device, dtype and head dim; raises for an impossible forced one."""
    if requested in ("flash_attn3", "flash_attn2"):
        why_not = _flash_unavailable(3 if requested == "flash_attn3" else 2, device, dtype, head_dim)
        if why_not is not None:
            raise RuntimeError(f"attention backend {requested!r} was forced but {why_not}")
        return requested, "forced"
    if requested in ("sdpa_efficient", "sdpa_cudnn") and device.type != "cuda":
        raise RuntimeError(f"attention backend {requested!r} was forced but SDPA has that kernel on CUDA only")
    if requested != "auto":
        return requested, "forced"
    reasons = []
    for version in (3, 2):
        why_not = _flash_unavailable(version, device, dtype, head_dim)
        if why_not is None and head_dim not in FLASH_KERNEL_HEAD_DIMS:
            why_not = f"head dim {head_dim} would be padded to a larger flash-attn kernel"
        if why_not is None:
            return f"flash_attn{version}", "fastest available"
        reasons.append(why_not)
    return "sdpa", "; ".join(reasons)


@torch._dynamo.assume_constant_result
def _choose_and_log(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    # Under torch.compile this runs once at trace time (its result is baked into the graph), so the
    # choice is logged without a graph break; ``requested`` is an argument so that changing the forced
    # backend still triggers a recompile.
    backend, reason = _choose(requested, device, dtype, head_dim)
    log_once(
        logger,
        (backend, device.type, dtype, head_dim),
        "attention backend %s for %s %s head_dim %d (%s)",
        *(backend, device.type, dtype, head_dim, reason),
    )
    return backend


def backend_for(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend :func:`attention` uses for tensors of this device, dtype and head dim (logged once)."""
    return _choose_and_log(_state.requested, torch.device(device), dtype, int(head_dim))


def select_backend(q: Tensor) -> str:
    """The one predicate: which backend runs ``attention(q, k, v)`` for these (B, heads, N, head_dim) tensors."""
    head_dim = q.shape[-1]
    if isinstance(head_dim, int):  # static shapes (always, for the model's head dim)
        return _choose_and_log(_state.requested, q.device, q.dtype, head_dim)
    return _choose(_state.requested, q.device, q.dtype, head_dim)[0]  # symbolic under dynamic shapes: no log


def attention_math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference softmax attention ``softmax(q k^T / sqrt(d)) v`` in the inputs' dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
    return scores.softmax(dim=-1) @ v


def _flash_attn(func, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # flash-attn wants (B, N, heads, head_dim) with a unit last stride: for the (B, N, 3, heads, head_dim)
    # qkv projection that is the original layout, so these transposes are views, not copies.
    out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if isinstance(out, tuple):  # some flash-attn 3 releases also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, q/k/v shaped (B, heads, N, head_dim); returns the same shape."""
    backend = select_backend(q)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "flash_attn3":
        return _flash_attn(flash_attn3_func, q, k, v)
    if backend == "flash_attn2":
        return _flash_attn(flash_attn2_func, q, k, v)
    if backend == "math":
        return attention_math(q, k, v)
    with sdpa_kernel(SDPA_KERNELS[backend]):
        return F.scaled_dot_product_attention(q, k, v)


# The environment's choice, checked like every switch (a typo names the variable); set_attention_backend overrides it.
set_attention_backend(env_switch(ENV_VAR, {name: name for name in BACKENDS}, "auto"))
