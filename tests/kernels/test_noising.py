"""Parity of the fused per-stage noising with its reference (``dfm.kernels.reference.noise_stages``)."""

from __future__ import annotations

import pytest
import torch
from dfm.kernels import noising, reference
from kernel_testing import DEVICES, DTYPES, LAYOUTS, assert_parity, make


def stage_shapes(batch: int, channels: int, stages: int, h: int = 3, w: int = 5) -> list[tuple[int, int, int, int]]:
    return [(batch, channels, h << s, w << s) for s in range(stages)]


def draw_t_mask(batch: int, stages: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Times in (0, 1) and a mask with an active prefix per sample, masking some stages when S > 1."""
    g = torch.Generator().manual_seed(7)
    t = torch.rand(batch, stages, generator=g)
    k = torch.arange(batch) % stages  # sample b has stages 0..k_b active
    mask = torch.arange(stages).view(1, -1) <= k.view(-1, 1)
    return t.to(device), mask.to(device)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_noise_stages_parity(stages, dtype, layout, device):
    shapes = stage_shapes(3, 3, stages)
    bands = [make(s, dtype, device, layout, seed=i) for i, s in enumerate(shapes)]
    eps = [make(s, dtype, device, layout, seed=100 + i) for i, s in enumerate(shapes)]
    t, mask = draw_t_mask(3, stages, device)
    x_t, v = noising.noise_stages(bands, t, mask, eps)
    ref64 = reference.noise_stages([b.double() for b in bands], t.double(), mask, [e.double() for e in eps])
    torch_same = reference.noise_stages(bands, t, mask, eps)
    assert all(o.dtype == dtype and o.is_contiguous() for o in x_t + v)
    assert_parity(x_t + v, torch_same[0] + torch_same[1], ref64[0] + ref64[1], dtype)
    for s in range(stages):  # masked stages are exactly zero, whatever t and eps
        assert torch.all(x_t[s][~mask[:, s]] == 0)


def test_argument_errors():
    bands = [torch.zeros(1, 1, 2, 2)]
    t, mask = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="one tensor per stage"):
        noising.noise_stages(bands, t, mask, [torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        noising.noise_stages(bands, torch.zeros(2, 1), mask, [torch.zeros(1, 1, 2, 2)])
