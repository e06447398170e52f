"""Learning-rate schedules and EMA warmup: their values, the config keys, and that the optimizer uses them."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch

from dfm.config import ConfigError, LRSchedule, load_config
from dfm.schedule import LR_SCHEDULES, ema_decay_at, lr_at

ROOT = Path(__file__).resolve().parent.parent
LR, MAX_STEPS, WARMUP, LR_MIN = 1e-3, 110, 10, 1e-5


def test_schedule_choices_match_the_config_key():
    assert typing.get_args(LRSchedule) == LR_SCHEDULES


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_warmup_is_linear_and_reaches_lr(schedule):
    lrs = [lr_at(i, LR, MAX_STEPS, WARMUP, schedule, LR_MIN) for i in range(WARMUP)]
    assert lrs == pytest.approx([LR * (i + 1) / WARMUP for i in range(WARMUP)], rel=1e-12)
    assert lrs[0] > 0  # the first step already moves the weights
    assert lr_at(WARMUP, LR, MAX_STEPS, WARMUP, schedule, LR_MIN) == pytest.approx(LR, rel=1e-12)


def test_decays_after_warmup():
    at = lambda i, s: lr_at(i, LR, MAX_STEPS, WARMUP, s, LR_MIN)  # noqa: E731
    half = WARMUP + (MAX_STEPS - WARMUP) // 2  # 60: half of the 100 post-warmup steps
    assert all(at(i, "constant") == LR for i in range(WARMUP, MAX_STEPS + 5))
    assert at(half, "cosine") == pytest.approx((LR + LR_MIN) / 2, rel=1e-12)
    assert at(half, "linear") == pytest.approx((LR + LR_MIN) / 2, rel=1e-12)
    quarter = WARMUP + (MAX_STEPS - WARMUP) // 4
    assert at(quarter, "cosine") == pytest.approx(LR_MIN + (LR - LR_MIN) * (1 + math.cos(math.pi / 4)) / 2)
    assert at(quarter, "linear") == pytest.approx(LR_MIN + (LR - LR_MIN) * 0.75)
    for schedule in ("cosine", "linear"):
        values = [at(i, schedule) for i in range(WARMUP, MAX_STEPS + 3)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # monotone down to lr_min, and held there
        assert values[-1] == values[-3] == pytest.approx(LR_MIN) and at(MAX_STEPS - 1, schedule) > LR_MIN
    with pytest.raises(ValueError, match="lr schedule"):
        lr_at(0, LR, MAX_STEPS, schedule="step")


def test_no_warmup_starts_at_lr():
    assert lr_at(0, LR, MAX_STEPS) == LR and lr_at(0, LR, MAX_STEPS, 0, "cosine") == LR


def test_ema_warmup_values():
    assert [ema_decay_at(i, 0.9999) for i in (0, 10, 10**6)] == [0.9999] * 3  # power 0: the reference's fixed decay
    assert ema_decay_at(0, 0.9999, 0.75) == 0.0  # the first update copies the weights
    decays = [ema_decay_at(i, 0.9999, 0.75) for i in range(0, 300_000, 1000)]
    assert all(a <= b for a, b in zip(decays, decays[1:])) and max(decays) == 0.9999  # grows, capped at ema_decay
    # the milestones the module docstring quotes (k-diffusion's / diffusers' warmup, inv_gamma = 1)
    assert ema_decay_at(10_000, 1.0, 0.75) == pytest.approx(0.999, abs=1e-6)
    assert ema_decay_at(215_443, 1.0, 0.75) == pytest.approx(0.9999, abs=1e-8)
    assert ema_decay_at(31_622, 1.0, 2 / 3) == pytest.approx(0.999, abs=1e-6)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr_schedule=step", "config key 'train.lr_schedule' must be one of ['constant', 'cosine', 'linear']"),
        ("train.lr_warmup_steps=-1", "config key 'train.lr_warmup_steps' must be >= 0"),
        ("train.lr_min=1.0", "config key 'train.lr_min' must lie in [0, train.lr"),
        ("train.ema_warmup_power=-0.5", "config key 'train.ema_warmup_power' must be >= 0"),
        ("train.threads=0", "config key 'train.threads' must be >= 1"),
        ("train.eval_every=-1", "config key 'train.eval_every' must be >= 0"),
        ("train.eval_samples=1", "config key 'train.eval_samples' must be >= 2"),
        ("train.eval_ref=ref.npz", "'train.eval_inception_weights' and 'train.eval_ref' go together"),
        ("report_to=mlflow", "config key 'report_to' must be one of ['tensorboard', 'wandb', 'none']"),
    ],
)
def test_new_keys_are_checked(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "dfm_digits.yaml", [override])
    assert needle in str(err.value)


TINY = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8",
        "sample.num_steps_per_scale=[2,1]", "sample.per_class=1", "train.grad_clip=0"]  # fmt: skip


@pytest.mark.parametrize("stage", [0, 2])
def test_the_optimizer_steps_with_the_scheduled_lr(tmp_path, stage):
    """Adam's first update of an element is lr * g / (|g| + eps): the largest weight change of step 0 is the
    learning rate the step used, at every ZeRO stage (DeepSpeed's optimizer wrappers share the param groups)."""
    from dfm.launch.train import build_trainer

    cfg = load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [
        f"output_dir={tmp_path}", f"train.zero_stage={stage}", "train.lr=1e-3", "train.lr_warmup_steps=4",
        "train.lr_schedule=linear", "train.max_steps=8", "train.ema_warmup_power=0.75"])  # fmt: skip
    trainer = build_trainer(cfg)
    data = iter(trainer.loader)
    for step in range(3):
        before = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        trainer.train_step(data)
        change = max((p.detach() - before[k]).abs().max().item() for k, p in trainer.engine.module.named_parameters())
        if step == 0:
            assert change == pytest.approx(1e-3 / 4, rel=1e-3)  # lr * (0 + 1) / warmup
            ema = trainer.ema.state_dict()  # decay 0 at step 0: the EMA is a copy of the weights
            for k, p in trainer.engine.module.named_parameters():
                assert torch.equal(ema[k], p.detach()), k
        assert trainer.lr == pytest.approx(1e-3 * (step + 1) / 4)
        assert trainer.ema_decay == pytest.approx(ema_decay_at(step, cfg.train.ema_decay, 0.75))
        assert any(not torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
    assert [g["lr"] for g in trainer.engine.optimizer.param_groups] == [pytest.approx(3e-3 / 4)]
