"""Fused Laplacian pyramid (decomposition and recomposition) in Triton.

References: :func:`dfm.kernels.reference.decompose` and :func:`~dfm.kernels.reference.recompose`.

Design trade-off. For even sizes the x1/2 bilinear resize (``align_corners=False``, no antialias) is
exactly a 2x2 mean and the x2 resize a separable stencil with per-axis weights (1/4, 3/4) and PyTorch's
edge clamping, so ``band = x - up(down(x))`` at a fine pixel needs the 3x3 neighbourhood of its low
pixel: a one-pixel halo of the low level. One program owns a tile of low pixels, forms the 2x2 means of
the tile and of its halo straight from ``x`` (the halo re-reads hit L1/L2, DRAM sees ``x`` once) and
writes the low tile and the 2x-sized band tile. Each pyramid level is one launch that reads its input
once, where the eager path (down, up, subtract) reads it twice and also writes and re-reads a
full-size upsampled temporary. All levels in one launch would need a grid-wide barrier between levels,
or every program recomputing each coarser level from ``x`` (a 4^l-pixel mean per level-l value): not
worth it for the 1-3 launches of a 2-4 stage pyramid. Lows are rounded to the storage dtype before they are upsampled,
exactly where PyTorch rounds them, so the bands absorb that rounding and ``recompose`` inverts the
kernel's bands as closely as it inverts the reference's. Arithmetic is fp32.

Recomposition is the mirror image: per level one launch computes ``up(cur) + band`` from the 3x3
neighbourhood of each coarse pixel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import MAX_NUMEL, reference
from .common import STENCIL_TILE, STENCIL_WARPS, rounded, store_rounded, tile_shape
from .noising import noise_epilogue

# -- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _fine_rows(X_ptr, base, ii, cols, sxh, sxw, mask):
    """Fine rows 2 ii and 2 ii + 1 of x (fp32) at ``cols``: low rows ``ii`` (BH, 1), ``cols`` (1, 2 BW)."""
    top = tl.load(X_ptr + base + (2 * ii) * sxh + cols * sxw, mask=mask, other=0.0).to(tl.float32)
    bot = tl.load(X_ptr + base + (2 * ii + 1) * sxh + cols * sxw, mask=mask, other=0.0).to(tl.float32)
    return top, bot


@triton.jit
def _pair_mean(top, bot, BH: tl.constexpr, BW: tl.constexpr):
    """2x2 means (BH, BW) of two fine rows (BH, 2 BW) whose columns come in pairs."""
    t0, t1 = tl.split(tl.reshape(top, (BH, BW, 2)))
    b0, b1 = tl.split(tl.reshape(bot, (BH, BW, 2)))
    # Summed in PyTorch's order; the scaling by 1/4 is exact.
    return (((t0 + t1) + b0) + b1) * 0.25


@triton.jit
def _mean2x2(X_ptr, base, ii, cols, sxh, sxw, mask, DTYPE: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Low pixels at rows ``ii`` over column pairs ``cols``, rounded to the storage dtype."""
    top, bot = _fine_rows(X_ptr, base, ii, cols, sxh, sxw, mask)
    return rounded(_pair_mean(top, bot, BH, BW), DTYPE)


@triton.jit
def _level_tile(rows, C, Hl, Wl, BH: tl.constexpr, BW: tl.constexpr):
    """This program's tile of a level: low rows ``r`` (BH, 1) run over (b, c, i) flattened, so one tile can
    span several small planes; low columns ``j`` (1, BW) and the fine columns ``k`` (1, 2 BW) over them;
    the masks of the low and fine pixels that exist; and each row's ``i``, ``b``, ``c``."""
    r = tl.program_id(0) * BH + tl.arange(0, BH)[:, None]
    j = tl.program_id(1) * BW + tl.arange(0, BW)[None, :]
    k = tl.program_id(1) * (2 * BW) + tl.arange(0, 2 * BW)[None, :]
    row_ok = r < rows
    plane = r // Hl
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    return r, j, k, row_ok, row_ok & (j < Wl), row_ok & (k < 2 * Wl), r % Hl, b, c


@triton.jit
def _up2x(l_pp, l_pc, l_pn, l_cp, l_cc, l_cn, l_np, l_nc, l_nn, i, j, BH: tl.constexpr, BW: tl.constexpr):
    """x2 bilinear upsampling of the low tile from its 3x3 neighbourhood (p = previous, c = centre, n = next).

    Returns the two fine rows 2i and 2i+1, each (BH, 2 BW) with columns interleaved. Columns are
    interpolated first, then rows, as PyTorch does; at the first row/column the previous neighbour gets
    weight 0 (PyTorch clamps the source coordinate to 0), at the last the next neighbour is clamped.
    """
    w_cp = tl.where(j > 0, 0.25, 0.0)
    w_rp = tl.where(i > 0, 0.25, 0.0)
    even_p = w_cp * l_pp + (1.0 - w_cp) * l_pc  # column 2j of low row i-1
    odd_p = 0.75 * l_pc + 0.25 * l_pn  # column 2j+1
    even_c = w_cp * l_cp + (1.0 - w_cp) * l_cc
    odd_c = 0.75 * l_cc + 0.25 * l_cn
    even_n = w_cp * l_np + (1.0 - w_cp) * l_nc
    odd_n = 0.75 * l_nc + 0.25 * l_nn
    row0 = tl.join(w_rp * even_p + (1.0 - w_rp) * even_c, w_rp * odd_p + (1.0 - w_rp) * odd_c)
    row1 = tl.join(0.75 * even_c + 0.25 * even_n, 0.75 * odd_c + 0.25 * odd_n)
    return tl.reshape(row0, (BH, 2 * BW)), tl.reshape(row1, (BH, 2 * BW))


@triton.jit
def _down_level_kernel(
    X_ptr,
    LOW_ptr,
    BAND_ptr,
    C,
    Hl,
    Wl,
    rows,
    sxb,
    sxc,
    sxh,
    sxw,
    # noising epilogue of the band (stage s of this level) ...
    EPS_B_ptr,
    sebb,
    sebc,
    sebh,
    sebw,
    T_B_ptr,
    KEEP_B_ptr,
    XT_B_ptr,
    V_B_ptr,
    # ... and of the low (stage 0, on the coarsest level)
    EPS_L_ptr,
    selb,
    selc,
    selh,
    selw,
    T_L_ptr,
    KEEP_L_ptr,
    XT_L_ptr,
    V_L_ptr,
    st,
    STORE_LOW: tl.constexpr,
    STORE_BAND: tl.constexpr,
    NOISE_BAND: tl.constexpr,
    NOISE_LOW: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """One pyramid level: from x (B, C, 2 Hl, 2 Wl) the low (B, C, Hl, Wl) and the band x - up(low).

    Each output is stored (contiguous) or noised on the fly into x_t and v, as the flags say.
    """
    DTYPE: tl.constexpr = X_ptr.dtype.element_ty
    r, j, k, row_ok, mask_l, mask_f, i, b, c = _level_tile(rows, C, Hl, Wl, BH, BW)
    base = b * sxb + c * sxc
    # Halo indices, clamped into the image: every load is in bounds, edge weights do the rest.
    i_p = tl.maximum(i - 1, 0)
    i_n = tl.minimum(i + 1, Hl - 1)
    jk = k // 2
    k_p = 2 * tl.maximum(jk - 1, 0) + k % 2
    k_n = 2 * tl.minimum(jk + 1, Wl - 1) + k % 2

    x_top, x_bot = _fine_rows(X_ptr, base, i, k, sxh, sxw, mask_f)
    l_cc = rounded(_pair_mean(x_top, x_bot, BH, BW), DTYPE)
    l_pp = _mean2x2(X_ptr, base, i_p, k_p, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_pc = _mean2x2(X_ptr, base, i_p, k, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_pn = _mean2x2(X_ptr, base, i_p, k_n, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_cp = _mean2x2(X_ptr, base, i, k_p, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_cn = _mean2x2(X_ptr, base, i, k_n, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_np = _mean2x2(X_ptr, base, i_n, k_p, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_nc = _mean2x2(X_ptr, base, i_n, k, sxh, sxw, mask_f, DTYPE, BH, BW)
    l_nn = _mean2x2(X_ptr, base, i_n, k_n, sxh, sxw, mask_f, DTYPE, BH, BW)
    up0, up1 = _up2x(l_pp, l_pc, l_pn, l_cp, l_cc, l_cn, l_np, l_nc, l_nn, i, j, BH, BW)
    band0 = rounded(x_top - up0, DTYPE)  # fine row 2i
    band1 = rounded(x_bot - up1, DTYPE)  # fine row 2i+1

    lin_l = r * Wl + j  # flat index in the contiguous low
    lin_0 = (2 * r) * (2 * Wl) + k  # flat index of fine row 2i in the contiguous band
    lin_1 = lin_0 + 2 * Wl
    if STORE_LOW:
        store_rounded(LOW_ptr + lin_l, l_cc, mask_l)
    if STORE_BAND:
        store_rounded(BAND_ptr + lin_0, band0, mask_f)
        store_rounded(BAND_ptr + lin_1, band1, mask_f)
    if NOISE_BAND:
        t = tl.load(T_B_ptr + b * st, mask=row_ok, other=0.0)
        keep = tl.load(KEEP_B_ptr + b * st, mask=row_ok, other=0.0)
        e0 = b * sebb + c * sebc + (2 * i) * sebh + k * sebw
        noise_epilogue(band0, lin_0, e0, t, keep, XT_B_ptr, V_B_ptr, EPS_B_ptr, mask_f)
        noise_epilogue(band1, lin_1, e0 + sebh, t, keep, XT_B_ptr, V_B_ptr, EPS_B_ptr, mask_f)
    if NOISE_LOW:
        t = tl.load(T_L_ptr + b * st, mask=row_ok, other=0.0)
        keep = tl.load(KEEP_L_ptr + b * st, mask=row_ok, other=0.0)
        e = b * selb + c * selc + i * selh + j * selw
        noise_epilogue(l_cc, lin_l, e, t, keep, XT_L_ptr, V_L_ptr, EPS_L_ptr, mask_l)


@triton.jit
def _up_add_kernel(
    LOW_ptr,
    BAND_ptr,
    OUT_ptr,
    C,
    Hl,
    Wl,
    rows,
    slb,
    slc,
    slh,
    slw,
    sbb,
    sbc,
    sbh,
    sbw,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """One recomposition level: ``out = up(low) + band`` with out, band (B, C, 2 Hl, 2 Wl), out contiguous."""
    r, j, k, row_ok, mask_l, mask_f, i, b, c = _level_tile(rows, C, Hl, Wl, BH, BW)
    lb = LOW_ptr + b * slb + c * slc
    row_p = tl.maximum(i - 1, 0) * slh
    row_c = i * slh
    row_n = tl.minimum(i + 1, Hl - 1) * slh
    col_p = tl.maximum(j - 1, 0) * slw
    col_c = j * slw
    col_n = tl.minimum(j + 1, Wl - 1) * slw
    l_pp = tl.load(lb + row_p + col_p, mask=mask_l, other=0.0).to(tl.float32)
    l_pc = tl.load(lb + row_p + col_c, mask=mask_l, other=0.0).to(tl.float32)
    l_pn = tl.load(lb + row_p + col_n, mask=mask_l, other=0.0).to(tl.float32)
    l_cp = tl.load(lb + row_c + col_p, mask=mask_l, other=0.0).to(tl.float32)
    l_cc = tl.load(lb + row_c + col_c, mask=mask_l, other=0.0).to(tl.float32)
    l_cn = tl.load(lb + row_c + col_n, mask=mask_l, other=0.0).to(tl.float32)
    l_np = tl.load(lb + row_n + col_p, mask=mask_l, other=0.0).to(tl.float32)
    l_nc = tl.load(lb + row_n + col_c, mask=mask_l, other=0.0).to(tl.float32)
    l_nn = tl.load(lb + row_n + col_n, mask=mask_l, other=0.0).to(tl.float32)
    up0, up1 = _up2x(l_pp, l_pc, l_pn, l_cp, l_cc, l_cn, l_np, l_nc, l_nn, i, j, BH, BW)
    bb = BAND_ptr + b * sbb + c * sbc + (2 * i) * sbh + k * sbw
    band0 = tl.load(bb, mask=mask_f, other=0.0).to(tl.float32)
    band1 = tl.load(bb + sbh, mask=mask_f, other=0.0).to(tl.float32)
    lin_0 = (2 * r) * (2 * Wl) + k
    store_rounded(OUT_ptr + lin_0, up0 + band0, mask_f)
    store_rounded(OUT_ptr + lin_0 + 2 * Wl, up1 + band1, mask_f)


# -- launchers ----------------------------------------------------------------------------------------


def level_grid(rows: int, cols: int) -> tuple[tuple[int, int], int, int]:
    """Grid and (BH, BW) tile of low pixels for a level with ``rows`` = B*C*Hl and ``cols`` = Wl."""
    bh, bw = tile_shape(rows, cols, STENCIL_TILE)
    return (triton.cdiv(rows, bh), triton.cdiv(cols, bw)), bh, bw


def down_level(
    cur: Tensor,
    low: Tensor | None,
    band: Tensor | None,
    noise_band: tuple | None = None,
    noise_low: tuple | None = None,
    eps_band: Tensor | None = None,
    eps_low: Tensor | None = None,
    t_stride: int = 0,
) -> None:
    """Launch one decomposition level of ``cur`` (B, C, H, W) into contiguous ``low`` and ``band``.

    ``noise_band`` / ``noise_low``, each ``(t, keep, x_t, v)``, noise that output on the fly with the noise
    ``eps_band`` / ``eps_low`` instead of storing it (used by :mod:`dfm.kernels.pyramid_noise`). ``None``
    outputs are neither stored nor noised.
    """
    B, C, H, W = cur.shape
    Hl, Wl = H // 2, W // 2
    rows = B * C * Hl
    grid, bh, bw = level_grid(rows, Wl)
    dummy = cur  # pointer for the arguments that the flags switch off
    e_b = dummy if eps_band is None else eps_band
    e_l = dummy if eps_low is None else eps_low
    _down_level_kernel[grid](
        cur,
        dummy if low is None else low,
        dummy if band is None else band,
        C,
        Hl,
        Wl,
        rows,
        *cur.stride(),
        e_b,
        *e_b.stride(),
        *(noise_band or (dummy, dummy, dummy, dummy)),
        e_l,
        *e_l.stride(),
        *(noise_low or (dummy, dummy, dummy, dummy)),
        t_stride,
        STORE_LOW=low is not None,
        STORE_BAND=band is not None,
        NOISE_BAND=noise_band is not None,
        NOISE_LOW=noise_low is not None,
        BH=bh,
        BW=bw,
        num_warps=STENCIL_WARPS,
    )


def check_input(x: Tensor, stages: int) -> None:
    """A (B, C, H, W) tensor whose sides the pyramid divides and whose size the kernels can index."""
    reference.check_input(x, stages)
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{x.numel()} elements exceed the kernels' int32 indexing ({MAX_NUMEL})")


def _fused_level(cur: Tensor) -> tuple[Tensor, Tensor]:
    B, C, H, W = cur.shape
    low = torch.empty((B, C, H // 2, W // 2), dtype=cur.dtype, device=cur.device)
    band = torch.empty((B, C, H, W), dtype=cur.dtype, device=cur.device)
    down_level(cur, low, band)
    return low, band


def _fused_up_add(cur: Tensor, band: Tensor) -> Tensor:
    B, C, Hl, Wl = cur.shape
    if band.dtype != cur.dtype:
        raise ValueError(f"bands must share one dtype, got {cur.dtype} and {band.dtype}")
    if band.numel() > MAX_NUMEL:
        raise ValueError(f"{band.numel()} elements exceed the kernels' int32 indexing ({MAX_NUMEL})")
    out = torch.empty(band.shape, dtype=band.dtype, device=band.device)
    rows = B * C * Hl
    grid, bh, bw = level_grid(rows, Wl)
    _up_add_kernel[grid](
        cur, band, out, C, Hl, Wl, rows, *cur.stride(), *band.stride(), BH=bh, BW=bw, num_warps=STENCIL_WARPS
    )
    return out


def decompose(x: Tensor, stages: int) -> list[Tensor]:
    """Fused :func:`dfm.kernels.reference.decompose`: one launch per level; bands contiguous, in ``x``'s dtype.

    With one stage the pyramid is ``[x]`` itself, as in the reference.
    """
    check_input(x, stages)
    return reference.decompose(x, stages, level=_fused_level)


def recompose(bands: list[Tensor]) -> Tensor:
    """Fused :func:`dfm.kernels.reference.recompose`: one ``up(cur) + band`` launch per level, contiguous output."""
    return reference.recompose(bands, up_add=_fused_up_add)
