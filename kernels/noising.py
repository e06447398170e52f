"""Fused per-stage noising: ``x_t = (1 - t) x + t eps`` (zero where the stage is masked) and ``v = eps - x``.

Design trade-off. The eager reference makes ~6 passes over every band (two scalings, an add, the mask
product, the subtraction, and the read of ``eps``); here each stage is one pass that reads the band and
the noise once and writes ``x_t`` and ``v``. With ``seed`` the noise is drawn in-kernel (philox, Triton's
``tl.randn``) and never touches memory, which removes a third of the traffic; the price is that the noise
is defined by the kernel's counter-based stream, not by a ``torch.Generator``. The counter of element
``(b, c, h, w)`` of stage ``s`` is its index in the concatenation of all stages flattened coarsest first,
so every stage and sample gets its own stream and any launch split (per stage here, per pyramid level in
``dfm.kernels.pyramid_noise``) yields the same noise for the same seed. Arithmetic is fp32 whatever the
storage dtype; results are rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import MAX_NUMEL, NUM_WARPS, TILE_ELEMENTS, store_rounded, tile_shape

# -- reference ----------------------------------------------------------------------------------------


def noise_stages_ref(
    bands: list[Tensor], t: Tensor, mask: Tensor, eps: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """PyTorch reference: per stage ``x_t = ((1 - t) x + t eps) * mask`` and ``v = eps - x``.

    ``t`` and ``mask`` are (B, S); ``bands`` and ``eps`` lists of (B, C, H_s, W_s), coarsest first.
    """
    x_t, v = [], []
    for s, (x, e) in enumerate(zip(bands, eps)):
        t_s = t[:, s].to(x.dtype).view(-1, 1, 1, 1)
        keep = mask[:, s].to(x.dtype).view(-1, 1, 1, 1)
        x_t.append(((1 - t_s) * x + t_s * e) * keep)
        v.append(e - x)
    return x_t, v


# -- kernels ------------------------------------------------------------------------------------------


@triton.jit
def noise_epilogue(x, lin, counter, eps_off, t, keep, XT_ptr, V_ptr, EPS_ptr, seed, mask, PHILOX: tl.constexpr):
    """Write ``x_t`` and ``v`` of fp32 stage values ``x`` at flat output offsets ``lin``.

    ``eps`` is read at ``EPS_ptr + eps_off``, or with ``PHILOX`` drawn from ``seed`` at ``counter``.
    ``t`` and ``keep`` broadcast against ``x`` (one value per sample).
    """
    if PHILOX:
        eps = tl.randn(seed, counter)
    else:
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
    seed,
    counter_base,
    PHILOX: tl.constexpr,
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
    lin = r * W + w
    eps_off = b * seb + c * sec + h * seh + w * sew
    noise_epilogue(x, lin, counter_base + lin, eps_off, t, keep, XT_ptr, V_ptr, EPS_ptr, seed, mask, PHILOX)


@triton.jit
def _philox_normal_kernel(OUT_ptr, n, seed, counter_base, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    store_rounded(OUT_ptr + offs, tl.randn(seed, counter_base + offs), mask)


# -- launchers ----------------------------------------------------------------------------------------


def stage_counter_bases(shapes: list[torch.Size | tuple[int, ...]]) -> list[int]:
    """First philox counter of every stage: the stages' element counts summed, coarsest first."""
    bases, total = [], 0
    for shape in shapes:
        bases.append(total)
        total += int(torch.Size(shape).numel())
    if total > MAX_NUMEL:
        raise ValueError(f"{total} elements over all stages exceed the kernels' int32 indexing ({MAX_NUMEL})")
    return bases


def check_seed(seed: int) -> int:
    """Philox seeds are non-negative integers below 2^63."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    return seed


def per_sample_params(t: Tensor, mask: Tensor, batch: int, stages: int) -> tuple[Tensor, Tensor]:
    """``t`` and the mask as (B, S) fp32 tensors with equal strides, as the kernels read them."""
    if t.shape != (batch, stages) or mask.shape != (batch, stages):
        raise ValueError(
            f"t and mask must be (B, S) = ({batch}, {stages}), got {tuple(t.shape)} and {tuple(mask.shape)}"
        )
    return t.to(torch.float32).contiguous(), mask.to(torch.float32).contiguous()


def noise_stage_(
    x: Tensor,
    t: Tensor,
    keep: Tensor,
    x_t: Tensor,
    v: Tensor,
    eps: Tensor | None = None,
    seed: int = 0,
    counter_base: int = 0,
) -> None:
    """One stage into preallocated contiguous ``x_t`` and ``v``; ``t``/``keep`` are (B,) fp32 views."""
    B, C, H, W = x.shape
    rows = B * C * H
    bh, bw = tile_shape(rows, W)
    grid = (triton.cdiv(rows, bh), triton.cdiv(W, bw))
    e = x if eps is None else eps  # unused pointer when the noise is drawn in-kernel
    _noise_stage_kernel[grid](
        x,
        e,
        t,
        keep,
        x_t,
        v,
        C,
        H,
        W,
        rows,
        *x.stride(),
        *e.stride(),
        t.stride(0),
        seed,
        counter_base,
        PHILOX=eps is None,
        BH=bh,
        BW=bw,
        num_warps=NUM_WARPS,
    )


def noise_stages(
    bands: list[Tensor], t: Tensor, mask: Tensor, eps: list[Tensor] | None = None, seed: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Fused :func:`noise_stages_ref`: one launch per stage; ``eps`` given, or drawn in-kernel from ``seed``.

    Outputs are contiguous, in the bands' dtype. With ``seed`` the noise equals :func:`philox_noise`.
    """
    if (eps is None) == (seed is None):
        raise ValueError("give exactly one of eps (a noise tensor per stage) or seed (in-kernel noise)")
    S = len(bands)
    t32, keep = per_sample_params(t, mask, bands[0].shape[0], S)
    if eps is not None:
        if len(eps) != S or any(e.shape != x.shape for e, x in zip(eps, bands)):
            raise ValueError("eps must hold one tensor per stage with the band's shape")
        bases = [0] * S
    else:
        check_seed(seed)
        bases = stage_counter_bases([x.shape for x in bands])
    x_t = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in bands]
    v = [torch.empty_like(x_t_s) for x_t_s in x_t]
    for s, x in enumerate(bands):
        e = None if eps is None else eps[s]
        noise_stage_(x, t32[:, s], keep[:, s], x_t[s], v[s], e, seed or 0, bases[s])
    return x_t, v


def philox_noise(
    shapes: list[tuple[int, ...]], seed: int, device: torch.device | str = "cuda", dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Materialise the noise that the in-kernel option draws for stages of these (B, C, H_s, W_s) shapes."""
    check_seed(seed)
    out = []
    for shape, base in zip(shapes, stage_counter_bases(shapes)):
        e = torch.empty(shape, dtype=dtype, device=device)
        block = TILE_ELEMENTS
        _philox_normal_kernel[(triton.cdiv(e.numel(), block),)](
            e, e.numel(), seed, base, BLOCK=block, num_warps=NUM_WARPS
        )
        out.append(e)
    return out
