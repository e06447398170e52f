"""FLOP accounting: published DiT numbers, torch's FlopCounterMode on a small model, peaks and MFU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfm.attention import forced_backend
from dfm.flops import (
    device_name,
    flops_breakdown,
    forward_flops,
    mfu,
    peak_bf16_flops,
    sampling_flops,
    training_flops,
)
from dfm.models import build_model, model_config
from dfm.sampling import StagedSampler, staged_schedule

# DiT paper (Peebles & Xie, Table 4) forward GFLOPs at 256 px (32x32x4 latents), counted as
# multiply-adds: ours count 2 FLOPs per multiply-add and leave the same elementwise work out.
DIT_GMACS = {"SiT-S/2": 6.06, "SiT-B/2": 23.01, "SiT-L/2": 80.71, "SiT-XL/2": 118.64, "SiT-XL/4": 29.05}


@pytest.mark.parametrize("name", list(DIT_GMACS))
def test_matches_published_dit_flops(name):
    assert forward_flops(name) / 2e9 == pytest.approx(DIT_GMACS[name], rel=2e-3)


def test_hand_count_of_a_small_dfm_config():
    cfg = model_config("DFM-SiT-S/2", depth=2, input_size=16, num_classes=10)
    T, D, C = 8 * 8, 384, 4  # 16 / 2 = 8 tokens a side; patch sizes [1, 2] for the two stages
    block = 2 * D * 6 * D + 2 * T * D * 3 * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D  # adaLN, qkv, proj, MLP
    expected = {
        "x_embed": 2 * T * C * D * (1 + 4),
        "t_embed": 2 * 2 * (256 * D + D * D),
        "blocks": 2 * block,
        "attention": 2 * 2 * (T * T * D) * 2,  # q k^T and attn v, 2 blocks
        "heads": 2 * (2 * D * 2 * D) + 2 * T * D * C * (1 + 4),
    }
    assert flops_breakdown(cfg) == expected
    assert training_flops(cfg) == 3 * sum(expected.values())


@pytest.mark.parametrize("name, size", [("DFM-SiT-S/2", 16), ("SiT-S/2", 8), ("DFM-SiT-S/4", 16)])
def test_forward_and_backward_match_flop_counter(name, size):
    torch.manual_seed(0)
    model = build_model(name, depth=2, input_size=size, num_classes=10)
    batch = 2
    x = [torch.randn(batch, *shape) for shape in model.input_shapes()]
    t = torch.rand(batch, model.stages)
    y = torch.tensor([1, 2])
    mask = torch.ones(batch, model.stages, dtype=torch.bool)
    # The math backend runs attention as two batched matmuls, which the counter sees on any device.
    with forced_backend("math"):
        with FlopCounterMode(display=False) as forward_counter:
            v = model(x, t, y, mask)
        loss = sum(v_s.square().sum() for v_s in v)
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    assert forward_counter.get_total_flops() == batch * forward_flops(model.config)
    # Backward is 2x forward except for input gradients nobody asks for: the patch embeddings' inputs
    # and the timestep MLPs' sinusoid features do not require grad.
    cfg = model.config
    skipped = flops_breakdown(cfg)["x_embed"] + cfg.stages * 2 * 256 * cfg.hidden_size
    assert backward_counter.get_total_flops() == batch * (2 * forward_flops(cfg) - skipped)


@pytest.mark.parametrize("name", ["DFM-SiT-S/2", "DFM-SiT-XL/2"])
def test_training_is_three_forwards_to_a_fraction_of_a_percent(name):
    cfg = model_config(name)  # 32x32x4 latents
    skipped = flops_breakdown(cfg)["x_embed"] + cfg.stages * 2 * 256 * cfg.hidden_size  # see the test above
    assert skipped < 1e-3 * training_flops(cfg)


def test_dfm_costs_about_the_same_as_sit():
    # Same token grid: the extra per-stage embedder and head add a few hundredths of a percent.
    ratio = forward_flops("DFM-SiT-XL/2") / forward_flops("SiT-XL/2")
    assert 1.0 < ratio < 1.001


def test_sampling_flops_counts_cfg_doubling_and_heun():
    cfg = model_config("DFM-SiT-S/2", depth=2, input_size=16, num_classes=10)
    schedule = staged_schedule([4, 2], [0.3])
    sampler = StagedSampler(lambda *a: None, schedule, cfg_scale=2.0, guidance_high=0.7, null_class=10)
    guided = sum(sampler.step_is_guided)
    assert 0 < guided < schedule.num_steps
    f = forward_flops(cfg)
    assert sampling_flops(cfg, sampler.step_is_guided) == (schedule.num_steps + guided) * f
    assert sampling_flops(cfg, sampler.step_is_guided, method="heun") == 2 * (schedule.num_steps + guided) * f


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
    ],
)
def test_peak_table(name, tflops):
    assert peak_bf16_flops(name) == tflops * 1e12


def test_mfu_and_unknown_cards():
    assert peak_bf16_flops("Intel(R) Xeon(R) CPU") is None
    assert mfu(1e12, 100.0, "NVIDIA A100-SXM4-40GB") == pytest.approx(1e14 / 312e12)
    assert mfu(1e12, 100.0, "some CPU") is None
    assert isinstance(device_name("cpu"), str) and device_name("cpu")
