"""Decompose + noise in one pass per level (the training path): parity, and an unchanged loss."""

from __future__ import annotations

import pytest
import torch
from dfm.kernels import laplacian, noising, pyramid_noise, reference
from kernel_testing import DEVICES, DTYPES, LAYOUTS, assert_parity, make, max_err

from dfm import ops
from dfm.models import build_model
from dfm.objective import DFMObjective

CASES = [(1, (2, 3, 3, 5)), (2, (1, 3, 2, 2)), (2, (3, 5, 6, 10)), (3, (3, 3, 12, 4)), (4, (2, 3, 8, 24))]


def draw_t_mask(batch: int, stages: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(batch, stages, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(stages).view(1, -1) <= (torch.arange(batch) % stages).view(-1, 1)
    return t.to(device), mask.to(device)


@pytest.mark.parametrize("stages,shape", CASES, ids=[f"S{s}-{'x'.join(map(str, sh))}" for s, sh in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_decompose_and_noise_parity(stages, shape, dtype, layout, device):
    x = make(shape, dtype, device, layout)
    shapes = [(shape[0], shape[1], h, w) for h, w in reference.stage_shapes(shape[2], shape[3], stages)]
    eps = [make(s, dtype, device, layout, seed=50 + i) for i, s in enumerate(shapes)]
    t, mask = draw_t_mask(shape[0], stages, device)
    x_t, v = pyramid_noise.decompose_and_noise(x, stages, t, mask, eps)
    assert [tuple(o.shape) for o in x_t] == shapes and all(o.dtype == dtype for o in x_t + v)
    ref64 = reference.decompose_and_noise(x.double(), stages, t.double(), mask, [e.double() for e in eps])
    torch_same = reference.decompose_and_noise(x, stages, t, mask, eps)
    assert_parity(x_t + v, torch_same[0] + torch_same[1], ref64[0] + ref64[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_decompose_then_noise(dtype, device):
    """Same bands, same arithmetic: the fused pass equals the two-pass kernels bit for bit."""
    x = make((2, 3, 8, 12), dtype, device, "channels_last")
    t, mask = draw_t_mask(2, 3, device)
    bands = laplacian.decompose(x, 3)
    eps = [make(tuple(b.shape), dtype, device, seed=i) for i, b in enumerate(bands)]
    fused = pyramid_noise.decompose_and_noise(x, 3, t, mask, eps)
    two_pass = noising.noise_stages(bands, t, mask, eps)
    for a, b in zip(fused[0] + fused[1], two_pass[0] + two_pass[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_training_loss_unchanged_with_kernels(stages, device):
    """DFMObjective goes through dfm.ops: with the kernels on, the same seed gives the same draw and loss."""
    torch.manual_seed(0)
    model = build_model(
        "DFM-SiT-S/4", stages=stages, input_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5
    )
    with torch.no_grad():  # random heads, so that the loss depends on every stage's input
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(device)
    objective = DFMObjective(stages, num_classes=5, per_sample_stage=True)
    x = make((4, 3, 8, 8), torch.float32, device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    results = {}
    for mode in ("off", "on"):
        with ops.triton_mode_as(mode):
            generator = torch.Generator(device=device).manual_seed(11)
            terms, draw = objective.stage_losses(model, x, y, generator=generator)
            loss = terms.sum()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
        results[mode] = loss.detach(), draw, grads
    (loss_off, draw_off, grads_off), (loss_on, draw_on, grads_on) = results["off"], results["on"]
    assert torch.equal(draw_on.t, draw_off.t) and torch.equal(draw_on.mask, draw_off.mask)
    assert all(torch.equal(a, b) for a, b in zip(draw_on.eps, draw_off.eps))
    # fp32 model inputs agree to a few ulps (see the parity tests); the loss to float rounding.
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    assert max_err(grads_on, grads_off) <= 1e-5 * max(g.abs().max().item() for g in grads_off)


def test_placeholders_match_the_bands():
    x = make((2, 3, 12, 8), torch.float32, "cpu")
    placeholders = ops.band_placeholders(x, 3)
    bands = reference.decompose(x, 3)
    assert [(p.shape, p.dtype, p.device) for p in placeholders] == [(b.shape, b.dtype, b.device) for b in bands]
    with pytest.raises(ValueError, match="not divisible"):
        ops.band_placeholders(make((1, 1, 6, 8), torch.float32, "cpu"), 3)
