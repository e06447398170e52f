"""Decompose + noise for the training step: the bands are never written, only ``x_t`` and ``v`` per stage.

Design trade-off. The level kernel of :mod:`dfm.kernels.laplacian` already holds each band tile in
registers; here its epilogue noises the tile (:func:`dfm.kernels.noising.noise_epilogue`) instead of
storing it, and the coarsest level noises its low tile as stage 0. For the default two-stage pyramid
that is a single launch reading ``x`` once and writing ``x_t`` and ``v``; an S-stage pyramid takes S-1
launches (one per level, see the laplacian module for why levels are not merged), and only the lows of
the intermediate levels reach memory. With ``seed`` the noise is drawn in-kernel and equals what
:func:`dfm.kernels.noising.noise_stages` draws for the same seed (same philox counters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import MAX_NUMEL
from .laplacian import check_pyramid_input, decompose_ref, down_level
from .noising import check_seed, noise_stages, noise_stages_ref, per_sample_params, stage_counter_bases


def decompose_and_noise_ref(
    x: Tensor, stages: int, t: Tensor, mask: Tensor, eps: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """PyTorch reference: :func:`noise_stages_ref` of :func:`decompose_ref`."""
    return noise_stages_ref(decompose_ref(x, stages), t, mask, eps)


def stage_shapes(x: Tensor, stages: int) -> list[tuple[int, int, int, int]]:
    """(B, C, H_s, W_s) of every stage of ``x``'s pyramid, coarsest first."""
    B, C, H, W = x.shape
    return [(B, C, H >> (stages - 1 - s), W >> (stages - 1 - s)) for s in range(stages)]


def decompose_and_noise(
    x: Tensor, stages: int, t: Tensor, mask: Tensor, eps: list[Tensor] | None = None, seed: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Fused :func:`decompose_and_noise_ref`: ``x_t`` and ``v`` per stage, coarsest first, contiguous.

    Give ``eps`` (one tensor per stage) or ``seed`` (in-kernel philox noise), not both.
    """
    if (eps is None) == (seed is None):
        raise ValueError("give exactly one of eps (a noise tensor per stage) or seed (in-kernel noise)")
    check_pyramid_input(x, stages)
    shapes = stage_shapes(x, stages)
    if eps is not None and (len(eps) != stages or any(tuple(e.shape) != s for e, s in zip(eps, shapes))):
        raise ValueError(f"eps must hold one tensor per stage with shapes {shapes}")
    if stages == 1:
        return noise_stages([x], t, mask, eps, seed)
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"{x.numel()} elements exceed the kernels' int32 indexing ({MAX_NUMEL})")
    t32, keep = per_sample_params(t, mask, x.shape[0], stages)
    philox = eps is None
    counters = stage_counter_bases(shapes) if philox else [0] * stages
    x_t = [torch.empty(s, dtype=x.dtype, device=x.device) for s in shapes]
    v = [torch.empty_like(x_t_s) for x_t_s in x_t]
    common = dict(t_stride=t32.stride(0), seed=check_seed(seed) if philox else 0, philox=philox)
    cur = x
    for level in range(stages - 1):  # level 0 is the finest; its band is stage S-1
        s = stages - 1 - level
        coarsest = s == 1
        epilogue = dict(noise_band=(t32[:, s], keep[:, s], x_t[s], v[s], counters[s]))
        if not philox:
            epilogue["eps_band"] = eps[s]
        if coarsest:  # the low of the last level is stage 0: noise it too instead of storing it
            epilogue["noise_low"] = (t32[:, 0], keep[:, 0], x_t[0], v[0], counters[0])
            if not philox:
                epilogue["eps_low"] = eps[0]
        low = None if coarsest else torch.empty(shapes[s - 1], dtype=x.dtype, device=x.device)
        down_level(cur, low, None, **epilogue, **common)
        cur = low
    return x_t, v
