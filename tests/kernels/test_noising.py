"""Parity of the fused per-stage noising with its reference, and the statistics of the in-kernel noise."""

from __future__ import annotations

import pytest
import torch
from dfm.kernels import noising
from kernel_testing import DEVICES, DTYPES, LAYOUTS, assert_parity, make

from dfm import objective


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
    ref64 = noising.noise_stages_ref([b.double() for b in bands], t.double(), mask, [e.double() for e in eps])
    torch_same = noising.noise_stages_ref(bands, t, mask, eps)
    assert all(o.dtype == dtype and o.is_contiguous() for o in x_t + v)
    assert_parity(x_t + v, torch_same[0] + torch_same[1], ref64[0] + ref64[1], dtype)
    for s in range(stages):  # masked stages are exactly zero, whatever t and eps
        assert torch.all(x_t[s][~mask[:, s]] == 0)


def test_reference_is_the_objectives_noise_stages():
    shapes = stage_shapes(4, 3, 3)
    bands = [make(s, torch.float32, "cpu", seed=i) for i, s in enumerate(shapes)]
    eps = [make(s, torch.float32, "cpu", seed=9 + i) for i, s in enumerate(shapes)]
    t, mask = draw_t_mask(4, 3, "cpu")
    got_x_t, got_v = noising.noise_stages_ref(bands, t, mask, eps)
    want_x_t, want_v = objective.noise_stages(bands, t, mask, eps)
    for got, want in zip(got_x_t + got_v, want_x_t + want_v):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_the_materialised_philox_noise(device):
    """x_t and v drawn in-kernel equal the reference fed :func:`philox_noise` of the same seed."""
    shapes = stage_shapes(2, 3, 3)
    bands = [make(s, torch.float32, device, "sliced", seed=i) for i, s in enumerate(shapes)]
    t, mask = draw_t_mask(2, 3, device)
    x_t, v = noising.noise_stages(bands, t, mask, seed=1234)
    eps = noising.philox_noise(shapes, 1234, device=device)
    want_x_t, want_v = noising.noise_stages_ref(bands, t, mask, eps)
    for got, want in zip(x_t + v, want_x_t + want_v):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_determinism_per_seed(device):
    shapes = stage_shapes(2, 2, 2)
    bands = [make(s, torch.float32, device, seed=i) for i, s in enumerate(shapes)]
    t, mask = draw_t_mask(2, 2, device)
    first = noising.noise_stages(bands, t, mask, seed=7)
    again = noising.noise_stages(bands, t, mask, seed=7)
    other = noising.noise_stages(bands, t, mask, seed=8)
    for a, b, c in zip(first[1], again[1], other[1]):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_standard_normal_and_independent(device):
    # Two samples, two stages of 4 x 48 x 64 and 4 x 96 x 128: 12k and 49k draws per sample and stage.
    shapes = [(2, 4, 48, 64), (2, 4, 96, 128)]
    zeros = [torch.zeros(s, device=device) for s in shapes]
    t, mask = draw_t_mask(2, 2, device)
    eps = noising.noise_stages(zeros, t, mask, seed=2024)[1]  # v = eps - 0: the in-kernel noise itself
    flat = torch.cat([e.flatten() for e in eps]).double().cpu()
    n = flat.numel()
    # Moments of N(0, 1), each within 5 standard errors: mean 0, variance 1, skew 0, kurtosis 3.
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(flat.pow(3).mean().item()) < 5 * (15 / n) ** 0.5
    assert abs(flat.pow(4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    # Tail mass beyond 2 sigma: 4.55 %.
    tail = (flat.abs() > 2).double().mean().item()
    assert abs(tail - 0.0455) < 5 * (0.0455 * 0.9545 / n) ** 0.5

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    # Independence: across samples, across stages (the coarse stage vs the same count of fine draws,
    # both aligned at the start of their streams and shifted by one), across channels.
    coarse, fine = eps[0], eps[1]
    m = coarse[0].numel()
    pairs = [
        (coarse[0], coarse[1]),
        (fine[0], fine[1]),
        (coarse[0].flatten(), fine[0].flatten()[:m]),
        (coarse[0].flatten()[1:], fine[0].flatten()[: m - 1]),
        (coarse[:, 0], coarse[:, 1]),
    ]
    for a, b in pairs:
        assert abs(corr(a, b)) < 5 / a.numel() ** 0.5
    # Different seeds give unrelated noise.
    other = noising.noise_stages(zeros, t, mask, seed=2025)[1]
    assert abs(corr(eps[1], other[1])) < 5 / eps[1].numel() ** 0.5


def test_argument_errors():
    bands = [torch.zeros(1, 1, 2, 2)]
    t, mask = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one"):
        noising.noise_stages(bands, t, mask)
    with pytest.raises(ValueError, match="exactly one"):
        noising.noise_stages(bands, t, mask, [torch.zeros(1, 1, 2, 2)], seed=1)
    with pytest.raises(ValueError, match="seed"):
        noising.noise_stages(bands, t, mask, seed=-1)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        noising.noise_stages(bands, torch.zeros(2, 1), mask, seed=1)
