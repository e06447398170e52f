"""Laplacian pyramid used by DFM (spec §2).

Stage 0 is the coarsest low-pass image, stage s >= 1 the band-pass residual at resolution
H / 2^(S-1-s). ``down`` and ``up`` are exact bilinear x1/2 and x2 resizes (``align_corners=False``,
no antialias); for even sizes ``down`` is a 2x2 average and ``up`` a 4-tap stencil with edge clamping,
which is what the fused kernels in ``dfm.kernels.laplacian`` reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def down(x: Tensor) -> Tensor:
    """Bilinear x1/2 resize of a (B, C, H, W) tensor (H, W even)."""
    return F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def up(x: Tensor) -> Tensor:
    """Bilinear x2 resize of a (B, C, H, W) tensor."""
    return F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False)


def check_divisible(height: int, width: int, stages: int, patch_size: int | None = None) -> None:
    """Raise ValueError unless an ``stages``-level pyramid fits (H, W), with finest patch ``patch_size``.

    The pyramid alone needs H, W divisible by 2^(S-1). With a patch size, every stage must tile into
    the same token grid: the finest patch must be a multiple of 2^(S-1) (so the coarsest stage's patch
    ``patch_size / 2^(S-1)`` is an integer >= 1) and H, W must be divisible by ``patch_size``.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    factor = 2 ** (stages - 1)
    need = factor
    if patch_size is not None:
        if patch_size < 1 or patch_size % factor != 0:
            raise ValueError(
                f"patch size {patch_size} cannot serve {stages} stages: the finest patch must be a multiple of "
                f"2^(stages-1) = {factor} so that the coarsest stage gets an integer patch"
            )
        need = patch_size
    if height % need != 0 or width % need != 0:
        raise ValueError(
            f"resolution {height}x{width} is not divisible by {need} "
            f"(stages={stages} needs 2^(stages-1)={factor}" + (f", patch size {patch_size})" if patch_size else ")")
        )


def decompose(x: Tensor, stages: int) -> list[Tensor]:
    """Split ``x`` (B, C, H, W) into ``stages`` bands, coarsest first.

    ``bands[0]`` is ``x`` bilinearly halved ``stages - 1`` times; ``bands[s]`` for s >= 1 is the detail
    lost between resolution H / 2^(S-s) and H / 2^(S-1-s). ``recompose(decompose(x, S)) == x`` up to
    float rounding.
    """
    if x.dim() != 4:
        raise ValueError(f"decompose expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    check_divisible(x.shape[-2], x.shape[-1], stages)
    bands = []
    cur = x
    for _ in range(stages - 1):
        low = down(cur)
        bands.append(cur - up(low))
        cur = low
    bands.append(cur)
    return bands[::-1]


def recompose(bands: list[Tensor]) -> Tensor:
    """Inverse of :func:`decompose`: ``cur = bands[0]; cur = up(cur) + band`` for the finer bands."""
    cur = bands[0]
    for band in bands[1:]:
        if band.shape[-2:] != (cur.shape[-2] * 2, cur.shape[-1] * 2):
            raise ValueError(
                f"band of shape {tuple(band.shape)} does not follow a level of shape {tuple(cur.shape)} (expected 2x)"
            )
        cur = up(cur) + band
    return cur


def preview(bands: list[Tensor], upto: int, full_size: bool = False) -> Tensor:
    """The image made of stages ``0..upto``; with ``full_size`` upsampled to the finest band's resolution."""
    if not 0 <= upto < len(bands):
        raise ValueError(f"upto must lie in [0, {len(bands) - 1}], got {upto}")
    cur = recompose(bands[: upto + 1])
    if full_size:
        for _ in range(len(bands) - 1 - upto):
            cur = up(cur)
    return cur


def stage_shapes(height: int, width: int, stages: int) -> list[tuple[int, int]]:
    """Spatial size of every stage, coarsest first."""
    check_divisible(height, width, stages)
    return [(height >> (stages - 1 - s), width >> (stages - 1 - s)) for s in range(stages)]


@torch.no_grad()
def band_std(x: Tensor, stages: int) -> Tensor:
    """Per-stage standard deviation of a batch, shape (S,): how far each band is from unit scale."""
    return torch.stack([b.float().std() for b in decompose(x, stages)])
