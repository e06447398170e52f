"""The eager PyTorch reference of every kernel in this folder: the one definition of each operation.

``dfm.ops`` falls back to these functions wherever a kernel cannot run, the objective and the sampler run
them on CPU, and the kernel tests compare every kernel against them. They live in one Triton-free module,
rather than each in its kernel's file as elsewhere, for two reasons: the reference must import where Triton
does not, and importing a kernel file defines its ``@triton.jit`` functions, which must wait until a test
harness has chosen Triton's interpreter (see ``dfm.ops``).

Laplacian pyramid (spec section 2): stage 0 is the coarsest low-pass image, stage s >= 1 the band-pass
residual at resolution H / 2^(S-1-s). ``down`` and ``up`` are bilinear x1/2 and x2 resizes
(``align_corners=False``, no antialias); for even sizes ``down`` is the 2x2 mean and ``up`` a 4-tap stencil
with edge clamping, which is what the kernels compute. Noising (spec section 3): per stage
``x_t = (1 - t) x + t eps`` (zero where the stage is masked) and the velocity target ``v = eps - x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

# -- pyramid ---------------------------------------------------------------------------------------------


def down(x: Tensor) -> Tensor:
    """Bilinear x1/2 resize of a (B, C, H, W) tensor (H, W even)."""
    return F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def up(x: Tensor) -> Tensor:
    """Bilinear x2 resize of a (B, C, H, W) tensor."""
    return F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False)


def check_patch(patch_size: int, stages: int) -> None:
    """Raise ValueError unless the finest patch serves every stage: a multiple of 2^(S-1), so that the
    coarsest stage's patch ``patch_size / 2^(S-1)`` is an integer >= 1 and all stages share one token grid."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    factor = 2 ** (stages - 1)
    if patch_size < 1 or patch_size % factor != 0:
        raise ValueError(
            f"patch size {patch_size} cannot serve {stages} stages: the finest patch must be a multiple of "
            f"2^(stages-1) = {factor} so that the coarsest stage gets an integer patch"
        )


def check_divisible(height: int, width: int, stages: int, patch_size: int | None = None) -> None:
    """Raise ValueError unless a ``stages``-level pyramid fits (H, W), with finest patch ``patch_size``.

    The pyramid alone needs H, W divisible by 2^(S-1); with a patch size (see :func:`check_patch`) they must
    be divisible by ``patch_size``.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    factor = 2 ** (stages - 1)
    need = factor
    if patch_size is not None:
        check_patch(patch_size, stages)
        need = patch_size
    if height < 1 or width < 1 or height % need or width % need:
        raise ValueError(
            f"resolution {height}x{width} is not divisible by {need} "
            f"(stages={stages} needs 2^(stages-1)={factor}" + (f", patch size {patch_size})" if patch_size else ")")
        )


def check_input(x: Tensor, stages: int) -> None:
    """Raise ValueError unless ``x`` is a (B, C, H, W) tensor whose sides a ``stages``-level pyramid divides."""
    if x.dim() != 4:
        raise ValueError(f"decompose expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    check_divisible(x.shape[-2], x.shape[-1], stages)


def stage_shapes(height: int, width: int, stages: int) -> list[tuple[int, int]]:
    """Spatial size (H_s, W_s) of every stage, coarsest first."""
    check_divisible(height, width, stages)
    return [(height >> (stages - 1 - s), width >> (stages - 1 - s)) for s in range(stages)]


def level(cur: Tensor) -> tuple[Tensor, Tensor]:
    """One level of the pyramid: ``(low, band) = (down(cur), cur - up(down(cur)))``."""
    low = down(cur)
    return low, cur - up(low)


def up_add(cur: Tensor, band: Tensor) -> Tensor:
    """One level of the recomposition: ``up(cur) + band``."""
    return up(cur) + band


def decompose(x: Tensor, stages: int, level: Callable[[Tensor], tuple[Tensor, Tensor]] = level) -> list[Tensor]:
    """Split ``x`` (B, C, H, W) into ``stages`` bands, coarsest first.

    ``bands[0]`` is ``x`` bilinearly halved ``stages - 1`` times; ``bands[s]`` for s >= 1 is the detail lost
    between resolution H / 2^(S-s) and H / 2^(S-1-s). ``recompose(decompose(x, S)) == x`` up to rounding.
    ``level`` computes one level (the fused kernel passes its own; the algorithm stays this one).
    """
    check_input(x, stages)
    bands, cur = [], x
    for _ in range(stages - 1):
        cur, band = level(cur)
        bands.append(band)
    bands.append(cur)
    return bands[::-1]


def recompose(bands: list[Tensor], up_add: Callable[[Tensor, Tensor], Tensor] = up_add) -> Tensor:
    """Inverse of :func:`decompose`: ``cur = bands[0]; cur = up(cur) + band`` for the finer bands."""
    cur = bands[0]
    for band in bands[1:]:
        if band.shape[-2:] != (cur.shape[-2] * 2, cur.shape[-1] * 2) or band.shape[:2] != cur.shape[:2]:
            raise ValueError(
                f"band of shape {tuple(band.shape)} does not follow a level of shape {tuple(cur.shape)} (expected 2x)"
            )
        cur = up_add(cur, band)
    return cur


# -- noising ---------------------------------------------------------------------------------------------


def noise_stages(bands: list[Tensor], t: Tensor, mask: Tensor, eps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Model inputs and velocity targets per stage: ``x_t`` (zero where masked) and ``v = eps - x``.

    ``t`` and ``mask`` are (B, S); ``bands`` and ``eps`` lists of (B, C, H_s, W_s), coarsest first.
    """
    x_t, v = [], []
    for s, (x, e) in enumerate(zip(bands, eps)):
        t_s = t[:, s].to(x.dtype).view(-1, 1, 1, 1)
        keep = mask[:, s].to(x.dtype).view(-1, 1, 1, 1)
        x_t.append(((1 - t_s) * x + t_s * e) * keep)
        v.append(e - x)
    return x_t, v


def decompose_and_noise(
    x: Tensor, stages: int, t: Tensor, mask: Tensor, eps: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`noise_stages` of :func:`decompose`: the training step's pyramid and noising in one call."""
    return noise_stages(decompose(x, stages), t, mask, eps)


__all__ = [
    "check_divisible",
    "decompose",
    "decompose_and_noise",
    "down",
    "noise_stages",
    "recompose",
    "stage_shapes",
    "up",
]
