"""Fused per-stage noising: ``x_t = (1 - t) x + t eps`` (zero where the stage is masked) and ``v = eps - x``.

Reference: :func:`dfm.kernels.reference.noise_stages`. Design trade-off. The eager reference makes ~6 passes
over every band (two scalings, an add, the mask product, the subtraction, and the read of ``eps``); here each
stage is one pass that reads the band and the noise once and writes ``x_t`` and ``v``. The noise comes in as
a tensor drawn by the objective from its seeded ``torch.Generator``, so the kernel and the reference see the
same noise. Arithmetic is fp32 whatever the storage dtype; results are rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import NUM_WARPS, store_rounded, tile_shape

# -- kernels ------------------------------------------------------------------------------------------


@triton.jit
def noise_epilogue(x, lin, eps_off, t, keep, XT_ptr, V_ptr, EPS_ptr, mask):
    """Write ``x_t`` and ``v`` of fp32 stage values ``x`` at flat output offsets ``lin``.

    ``eps`` is read at ``EPS_ptr + eps_off``; ``t`` and ``keep`` broadcast against ``x`` (one value per sample).
    """
    eps = tl.load(EPS_ptr + eps_off, mask=mask, other=0.0).to(tl.float32)
    # where() rather than a product with the mask: a masked stage is exactly zero, as the model expects.
    x_t = tl.where(keep != 0, (1.0 - t) * x + t * eps, 0.0)
    store_rounded(XT_ptr + lin, x_t, mask)
    store_rounded(V_ptr + lin, eps - x, mask)


@triton.jit
def _noise_stage_kernel(
    X_ptr,
    EPS_ptr,
    T_ptr,
    KEEP_ptr,
    XT_ptr,
    V_ptr,
    C,
    H,
    W,
    rows,
    sxb,
    sxc,
    sxh,
    sxw,
    seb,
    sec,
    seh,
    sew,
    st,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    # Rows run over (b, c, h) flattened so that one tile can span several small planes.
    r = tl.program_id(0) * BH + tl.arange(0, BH)[:, None]  # (BH, 1)
    w = tl.program_id(1) * BW + tl.arange(0, BW)[None, :]  # (1, BW)
    row_ok = r < rows
    mask = row_ok & (w < W)
    plane = r // H
    h = r % H
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    x = tl.load(X_ptr + b * sxb + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T_ptr + b * st, mask=row_ok, other=0.0)
    keep = tl.load(KEEP_ptr + b * st, mask=row_ok, other=0.0)
    eps_off = b * seb + c * sec + h * seh + w * sew
    noise_epilogue(x, r * W + w, eps_off, t, keep, XT_ptr, V_ptr, EPS_ptr, mask)


# -- launchers ----------------------------------------------------------------------------------------


def per_sample_params(t: Tensor, mask: Tensor, batch: int, stages: int) -> tuple[Tensor, Tensor]:
    """``t`` and the mask as (B, S) fp32 tensors with equal strides, as the kernels read them."""
    if t.shape != (batch, stages) or mask.shape != (batch, stages):
        raise ValueError(
            f"t and mask must be (B, S) = ({batch}, {stages}), got {tuple(t.shape)} and {tuple(mask.shape)}"
        )
    return t.to(torch.float32).contiguous(), mask.to(torch.float32).contiguous()


def check_noise(eps: list[Tensor], shapes: list[tuple[int, ...]]) -> None:
    """One noise tensor per stage, each of its stage's (B, C, H_s, W_s) shape."""
    if len(eps) != len(shapes) or any(tuple(e.shape) != tuple(s) for e, s in zip(eps, shapes)):
        got = [tuple(e.shape) for e in eps]
        raise ValueError(f"eps must hold one tensor per stage with shapes {[tuple(s) for s in shapes]}, got {got}")


def noise_stage_(x: Tensor, t: Tensor, keep: Tensor, x_t: Tensor, v: Tensor, eps: Tensor) -> None:
    """One stage into preallocated contiguous ``x_t`` and ``v``; ``t``/``keep`` are (B,) fp32 views."""
    B, C, H, W = x.shape
    rows = B * C * H
    bh, bw = tile_shape(rows, W)
    grid = (triton.cdiv(rows, bh), triton.cdiv(W, bw))
    _noise_stage_kernel[grid](
        x,
        eps,
        t,
        keep,
        x_t,
        v,
        C,
        H,
        W,
        rows,
        *x.stride(),
        *eps.stride(),
        t.stride(0),
        BH=bh,
        BW=bw,
        num_warps=NUM_WARPS,
    )


def noise_stages(bands: list[Tensor], t: Tensor, mask: Tensor, eps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Fused :func:`dfm.kernels.reference.noise_stages`: one launch per stage; outputs contiguous, bands' dtype."""
    S = len(bands)
    t32, keep = per_sample_params(t, mask, bands[0].shape[0], S)
    check_noise(eps, [x.shape for x in bands])
    x_t = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in bands]
    v = [torch.empty_like(x_t_s) for x_t_s in x_t]
    for s, x in enumerate(bands):
        noise_stage_(x, t32[:, s], keep[:, s], x_t[s], v[s], eps[s])
    return x_t, v
