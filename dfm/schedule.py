"""Learning-rate schedule and EMA warmup: pure functions of the step, so that a resumed run continues exactly.

Both take the 0-based index ``i`` of the optimizer step about to be taken (``i = TrainState.step`` before the
step), nothing else that changes during a run: a resume restores the step and gets the same values, with no
scheduler state to save.

Learning rate (:func:`lr_at`). A linear warmup over ``warmup`` steps, ``lr * (i + 1) / warmup`` (the first
step already moves, the last warmup step reaches ``lr``), then one of

- ``constant``: ``lr`` -- the reference recipe (AdamW at 1e-4, no warmup, no decay);
- ``cosine``: ``lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2``;
- ``linear``: ``lr_min + (lr - lr_min) * (1 - p)``;

with ``p = (i - warmup) / (max_steps - warmup)`` the fraction of the post-warmup steps done. The decays end
at ``max_steps``: resuming with another ``train.max_steps`` bends the rest of the schedule.

EMA warmup (:func:`ema_decay_at`). ``decay_i = min(ema_decay, 1 - (1 + i) ** -power)``: the warmup of
k-diffusion's ``EMAWarmup`` and diffusers' ``EMAModel(use_ema_warmup=True)`` with ``inv_gamma = 1`` (after
Karras et al.). Why: the EMA starts as a copy of the initial weights, and a fixed decay of 0.9999 still holds
``0.9999 ** 3000 = 74 %`` of them after 3,000 steps, so the EMA of a short run or the start of a fine-tune is
mostly its starting point. With the warmup the first update copies the weights (``decay_0 = 0``) and the
averaging window grows with the step until it reaches ``ema_decay``: with power 3/4 the decay is 0.999 at 10k
steps and 0.9999 at 215k; with 2/3, 0.999 at 31.6k and 0.9999 at 1M. ``power = 0`` keeps the fixed decay.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_at(
    step: int, lr: float, max_steps: int, warmup: int = 0, schedule: str = "constant", lr_min: float = 0.0
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a run of ``max_steps`` steps; see the module docstring."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    factor = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr_min + (lr - lr_min) * factor


def ema_decay_at(step: int, decay: float, power: float = 0.0) -> float:
    """EMA decay of the update after optimizer step ``step`` (0-based); ``power = 0``: the fixed ``decay``."""
    if power <= 0:
        return decay
    return min(decay, 1.0 - (1.0 + step) ** -power)


def train_lr(step: int, train_cfg) -> float:
    """:func:`lr_at` with the ``train`` section of a run config."""
    t = train_cfg
    return lr_at(step, t.lr, t.max_steps, t.lr_warmup_steps, t.lr_schedule, t.lr_min)


def train_ema_decay(step: int, train_cfg) -> float:
    """:func:`ema_decay_at` with the ``train`` section of a run config."""
    return ema_decay_at(step, train_cfg.ema_decay, train_cfg.ema_warmup_power)


__all__ = ["LR_SCHEDULES", "ema_decay_at", "lr_at", "train_ema_decay", "train_lr"]
