"""The one precision decision (``dfm.precision``): what ``auto`` means and what autocast changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dfm.launch.train import build_trainer

from dfm.config import load_config
from dfm.precision import autocast, resolve_precision


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_autocast_lowers_matmuls_only():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
        # elementwise work, the pyramid's resize and LayerNorm stay in their fp32 inputs' dtype
        assert (a * b + 1).dtype == torch.float32
        assert torch.nn.functional.interpolate(a[None, None], scale_factor=2, mode="bilinear").dtype == torch.float32
        assert torch.nn.functional.layer_norm(a, (4,)).dtype == torch.float32


# -- training under autocast: the real trainer (tests/test_host_sync.py shows its step syncs nothing) ----------

TINY = [
    "arch.depth=2",
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "train.global_batch_size=8",
    "train.max_steps=100",
    "train.log_every=100",
    "train.sample_every=1000",
    "train.ckpt_every=1000",
    "train.ema_decay=0.5",  # a fast EMA, so that a few steps move it far from the initial weights
    "dfm.per_sample_stage=true",  # every step trains both stages
]
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of it


def trainer(tmp_path, precision):
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(
        root / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", f"train.precision={precision}"]
    )
    return build_trainer(cfg)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_engine_runs_the_model_under_autocast(tmp_path, precision, dtype):
    """bf16 reaches the model through the engine's own forward (an autocast around the call would not: on CUDA
    DeepSpeed's forward switches an outer autocast off), while the weights stay fp32."""
    run = trainer(tmp_path, precision)
    x, y = next(iter(run.loader))
    draw = run.objective.draw(_bands(run, x), y)
    v = run.engine(draw.eps, draw.t, draw.y, draw.mask)
    assert all(v_s.dtype == dtype for v_s in v)
    assert all(p.dtype == torch.float32 for p in run.engine.module.parameters())


def _bands(run, x):
    from dfm import ops

    return ops.band_placeholders(x, run.objective.stages)


def test_ema_update_records_no_autograd_history(tmp_path):
    run = trainer(tmp_path, "fp32")
    data = iter(run.loader)
    for _ in range(2):
        run.train_step(data)
    assert all(not p.requires_grad and p.grad_fn is None for p in run.ema.module().parameters())


def test_ema_follows_the_fp32_master_weights_under_autocast(tmp_path):
    run = trainer(tmp_path, "bf16")
    data, decay = iter(run.loader), run.cfg.train.ema_decay
    names = [n for n, _ in run.engine.module.named_parameters()]
    ema64 = {n: p.detach().double().clone() for n, p in run.engine.module.named_parameters()}
    ema_bf16 = {n: v.clone() for n, v in ema64.items()}  # what an EMA of bf16 working weights would hold
    for _ in range(4):
        run.train_step(data)
        for n, p in run.engine.module.named_parameters():
            assert p.dtype == torch.float32
            ema64[n] = decay * ema64[n] + (1 - decay) * p.detach().double()
            ema_bf16[n] = decay * ema_bf16[n] + (1 - decay) * p.detach().bfloat16().double()
    ema = run.ema.state_dict()
    err = max((ema[n].double() - ema64[n]).abs().max().item() for n in names)
    scale = max(ema64[n].abs().max().item() for n in names)
    assert err <= 4 * 2.0**-24 * scale  # fp32 rounding of four lerps
    bf16_gap = max((ema_bf16[n] - ema64[n]).abs().max().item() for n in names)
    assert bf16_gap > 100 * err  # an EMA of bf16-rounded weights would fail the bound above


def test_bf16_autocast_loss_tracks_fp32(tmp_path):
    """The same 8 steps (same initial weights, batches and draws) in fp32 and under bf16 autocast.

    Autocast rounds the inputs of each matmul to bf16 (a relative error of at most 2^-8 per element) and
    the loss averages the resulting velocity errors over B x C x H x W elements: a quarter of the unit
    roundoff bounds the relative loss difference (measured: at most 0.04 of it over 8 steps)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run = trainer(tmp_path / precision, precision)
        data = iter(run.loader)
        losses[precision] = torch.stack([run.train_step(data)[0] for _ in range(8)])  # StepSums: the loss first
    rel = ((losses["bf16"] - losses["fp32"]).abs() / losses["fp32"]).max().item()
    assert rel <= BF16_UNIT_ROUNDOFF / 4, rel
    assert rel > 0  # autocast was in effect: bf16 matmuls did round
