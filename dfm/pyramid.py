"""Laplacian pyramid used by DFM (spec section 2), and the previews of a partly generated pyramid.

Stage 0 is the coarsest low-pass image, stage s >= 1 the band-pass residual at resolution H / 2^(S-1-s).
The operations themselves (``down``, ``up``, ``decompose``, ``recompose``, ``stage_shapes``,
``check_divisible``) have one eager definition, :mod:`dfm.kernels.reference`, beside the fused kernels that
``dfm.ops`` dispatches to; this module exposes them under the names the rest of the library uses.
"""

from __future__ import annotations

from torch import Tensor

from dfm.kernels.reference import check_divisible, check_patch, decompose, down, recompose, stage_shapes, up


def preview(bands: list[Tensor], upto: int, full_size: bool = False) -> Tensor:
    """The image made of stages ``0..upto``; with ``full_size`` upsampled to the finest band's resolution."""
    if not 0 <= upto < len(bands):
        raise ValueError(f"upto must lie in [0, {len(bands) - 1}], got {upto}")
    cur = recompose(bands[: upto + 1])
    if full_size:
        for _ in range(len(bands) - 1 - upto):
            cur = up(cur)
    return cur


__all__ = ["check_divisible", "check_patch", "decompose", "down", "preview", "recompose", "stage_shapes", "up"]
