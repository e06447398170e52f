"""Decompose + noise for the training step: the bands are never written, only ``x_t`` and ``v`` per stage.

Reference: :func:`dfm.kernels.reference.decompose_and_noise`. Design trade-off. The level kernel of
:mod:`dfm.kernels.laplacian` already holds each band tile in registers; here its epilogue noises the tile
(:func:`dfm.kernels.noising.noise_epilogue`) instead of storing it, and the coarsest level noises its low tile
as stage 0. For the default two-stage pyramid that is a single launch reading ``x`` and the noise once and
writing ``x_t`` and ``v``; an S-stage pyramid takes S-1 launches (one per level, see the laplacian module for
why levels are not merged), and only the lows of the intermediate levels reach memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .laplacian import check_input, down_level
from .noising import check_noise, noise_stages, per_sample_params
from .reference import stage_shapes


def decompose_and_noise(
    x: Tensor, stages: int, t: Tensor, mask: Tensor, eps: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Fused :func:`dfm.kernels.reference.decompose_and_noise`: ``x_t`` and ``v`` per stage, coarsest first."""
    check_input(x, stages)
    B, C = x.shape[:2]
    shapes = [(B, C, h, w) for h, w in stage_shapes(x.shape[-2], x.shape[-1], stages)]
    check_noise(eps, shapes)
    if stages == 1:
        return noise_stages([x], t, mask, eps)
    t32, keep = per_sample_params(t, mask, B, stages)
    x_t = [torch.empty(s, dtype=x.dtype, device=x.device) for s in shapes]
    v = [torch.empty_like(x_t_s) for x_t_s in x_t]
    cur = x
    for level in range(stages - 1):  # level 0 is the finest; its band is stage S-1
        s = stages - 1 - level
        epilogue = dict(noise_band=(t32[:, s], keep[:, s], x_t[s], v[s]), eps_band=eps[s])
        if s == 1:  # the low of the last level is stage 0: noise it too instead of storing it
            epilogue.update(noise_low=(t32[:, 0], keep[:, 0], x_t[0], v[0]), eps_low=eps[0])
        low = None if s == 1 else torch.empty(shapes[s - 1], dtype=x.dtype, device=x.device)
        down_level(cur, low, None, **epilogue, t_stride=t32.stride(0))
        cur = low
    return x_t, v
