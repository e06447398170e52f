"""The DFM training objective (spec §3); with one stage it is exactly SiT flow matching.

Time runs from data to noise: ``x_t = (1 - t) x + t eps`` and the velocity target is ``v = eps - x``.
Per step a main stage ``k`` is drawn; stages ``s < k`` get low-noise times ``sigmoid(n - 2)``, stage
``k`` the main sampler, stages ``s > k`` are masked (``t = 1``, input zeroed, no loss).

The random draw (:class:`StageDraw`) is separate from the arithmetic so that a fused kernel can be
fed the very same noise, and nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dfm import ops
from dfm.errors import ArgumentError
from dfm.normalization import FlowSpace

TSampler = Literal["logit_normal", "uniform"]
T_SAMPLERS: tuple[str, ...] = typing.get_args(TSampler)


@dataclass
class StageDraw:
    """Everything random about one training step."""

    t: Tensor  # (B, S) per-sample per-stage time in [0, 1]
    mask: Tensor  # (B, S) bool, True where the stage is active (s <= k)
    eps: list[Tensor]  # per-stage white noise, same shapes as the bands
    y: Tensor  # (B,) labels after class dropout (null class = num_classes)


def _stage_terms(v_hat: list[Tensor], v: list[Tensor], mask: Tensor) -> Tensor:
    """Each stage's term of the loss, shape (S,): ``mean_B [s active] mean_{C,H,W} (v_hat[s] - v[s])^2``.

    The loss is their sum; a masked sample adds exactly zero to its stage's term, so the terms are the stages'
    shares of the logged loss.
    """
    terms = []
    for s, (pred, target) in enumerate(zip(v_hat, v)):
        # where() on the difference, before squaring, rather than a product: a masked head gets an exactly-zero
        # loss and gradient even if it outputs inf (masking after the square would backpropagate 0 * inf = nan).
        diff = torch.where(mask[:, s].view(-1, 1, 1, 1), pred.float() - target.float(), 0.0)
        terms.append(diff.square().mean(dim=(1, 2, 3)).mean())
    return torch.stack(terms)


class DFMObjective:
    """Draws stages, times, noise and class dropout, and computes the masked per-stage loss.

    :meth:`stage_losses` is the one loss entry: per-stage terms whose sum is the loss
    ``mean_B sum_{s active} mean_{C,H,W} (v_hat[s] - v[s])^2``.

    Args:
        stages: number of pyramid stages S (1 = plain SiT flow matching).
        stage_weights: probability of each stage being the main stage ``k`` (normalised here).
        num_classes: label count; the null (CFG) label is ``num_classes``.
        per_sample_stage: draw ``k`` per sample instead of once per batch (the reference).
        t_sampler: ``"logit_normal"`` (``sigmoid(N(mean, std))``) or ``"uniform"`` for the main stage.
        earlier_shift: earlier stages use ``sigmoid(n + earlier_shift)`` (reference: -2, low noise).
        class_dropout: probability of replacing a label by the null class.
        flow: the space the flow runs in (``dfm.normalization.FlowSpace``: per-stage scale); None or the
            identity (the reference) keeps the bands as they are.
    """

    def __init__(
        self,
        stages: int,
        stage_weights: list[float] | None = None,
        num_classes: int = 1000,
        per_sample_stage: bool = False,
        t_sampler: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        earlier_shift: float = -2.0,
        class_dropout: float = 0.1,
        flow: FlowSpace | None = None,
    ):
        if stage_weights is None:
            stage_weights = [1.0] if stages == 1 else [0.9, 0.1] if stages == 2 else [1.0 / stages] * stages
        if len(stage_weights) != stages:
            raise ArgumentError("stage_weights", f"has {len(stage_weights)} entries for {stages} stages")
        if not all(math.isfinite(w) and w >= 0 for w in stage_weights) or sum(stage_weights) <= 0:
            raise ArgumentError(
                "stage_weights", f"must be finite and non-negative with a positive sum, got {stage_weights}"
            )
        if t_sampler not in T_SAMPLERS:
            raise ArgumentError("t_sampler", f"must be one of {T_SAMPLERS}, got {t_sampler!r}")
        if not 0.0 <= class_dropout < 1.0:  # NaN fails this too
            raise ArgumentError("class_dropout", f"must lie in [0, 1), got {class_dropout}")
        flow = (flow or FlowSpace()).check_stages(stages)
        self.stages = stages
        total = float(sum(stage_weights))
        self.stage_weights = [w / total for w in stage_weights]
        self.num_classes = num_classes
        self.per_sample_stage = per_sample_stage
        self.t_sampler = t_sampler
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.earlier_shift = earlier_shift
        self.class_dropout = class_dropout
        self.flow = flow

    @classmethod
    def from_config(cls, cfg) -> DFMObjective:
        """The objective of run config ``cfg``: its ``dfm`` section, stage count and class count.

        A ``ValueError`` names the argument first (``stage_weights ...``), which is the key in ``dfm``.
        """
        return cls(
            stages=cfg.stages,
            stage_weights=cfg.dfm.stage_weights,
            num_classes=cfg.data.num_classes,
            per_sample_stage=cfg.dfm.per_sample_stage,
            t_sampler=cfg.dfm.t_sampler,
            earlier_shift=-cfg.dfm.earlier_stage_location,
            class_dropout=cfg.dfm.class_dropout,
            # not FlowSpace.from_config: validation builds the objective before a run has measured its statistics
            flow=FlowSpace(cfg.dfm.stage_rms if cfg.dfm.normalize_stages else None),
        )

    # -- random draws ---------------------------------------------------------------------------------
    def sample_main_stage(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Main stage ``k`` per sample, shape (B,): one draw shared by the batch unless per-sample.

        Inverse CDF against the cumulative weights held as Python numbers, because both obvious routes
        synchronise on CUDA: ``torch.tensor(weights, device=...)`` copies from pageable host memory and
        waits for the stream, and ``torch.multinomial`` checks its probabilities with ``.item()`` when
        drawing one sample.
        """
        n = batch if self.per_sample_stage else 1
        u = torch.rand(n, device=device, generator=generator)
        k = torch.zeros(n, dtype=torch.long, device=device)
        for s in range(1, self.stages):
            if sum(self.stage_weights[s:]) == 0:  # only zero-weight stages left: never step into them
                break
            k = k + (u >= sum(self.stage_weights[:s])).long()  # k = number of cumulative weights <= u
        return k.expand(batch) if n == 1 else k

    def sample_t(self, k: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-stage times and active mask, both (B, S), for main stages ``k`` (B,)."""
        batch, device = k.shape[0], k.device
        stage = torch.arange(self.stages, device=device).view(1, -1)  # (1, S)
        k = k.view(-1, 1)  # (B, 1)
        n = torch.randn(batch, self.stages, device=device, generator=generator)
        if self.t_sampler == "logit_normal":
            t_main = torch.sigmoid(self.logit_mean + self.logit_std * n)
        else:
            t_main = torch.rand(batch, self.stages, device=device, generator=generator)
        t_earlier = torch.sigmoid(n + self.earlier_shift)
        t = torch.where(stage == k, t_main, torch.where(stage < k, t_earlier, torch.ones_like(t_main)))
        return t, stage <= k

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability ``class_dropout``."""
        if self.class_dropout == 0:
            return y
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def draw(self, bands: list[Tensor], y: Tensor, generator: torch.Generator | None = None) -> StageDraw:
        """All randomness of a step for these bands and labels."""
        batch, device = y.shape[0], y.device
        k = self.sample_main_stage(batch, device, generator)
        t, mask = self.sample_t(k, generator)
        eps = [torch.randn(b.shape, device=b.device, dtype=b.dtype, generator=generator) for b in bands]
        return StageDraw(t=t, mask=mask, eps=eps, y=self.drop_labels(y, generator))

    # -- the step -------------------------------------------------------------------------------------
    def stage_losses(
        self, model, x: Tensor, y: Tensor, generator: torch.Generator | None = None, draw: StageDraw | None = None
    ) -> tuple[Tensor, StageDraw]:
        """Per-stage loss terms (S,) of ``model`` on images/latents ``x`` (B, C, H, W) with labels ``y``, and the
        draw; the loss is ``terms.sum()``. ``draw`` replaces the random draw (a test, or a fused kernel fed the
        same noise); otherwise it comes from ``generator``."""
        if draw is None:
            # The draw needs only the bands' shapes, and decomposing draws nothing, so drawing first lets
            # the decomposition fuse with the noising (dfm.ops: Triton on CUDA, the eager reference otherwise).
            draw = self.draw(ops.band_placeholders(x, self.stages), y, generator)
        if self.flow.is_identity:
            x_t, v = ops.decompose_and_noise(x, self.stages, draw.t, draw.mask, draw.eps)
        else:  # the bands are scaled between decomposition and noising, so the fused kernel does not apply
            bands = self.flow.to_flow(ops.decompose(x, self.stages))
            x_t, v = ops.noise_stages(bands, draw.t, draw.mask, draw.eps)
        v_hat = model(x_t, draw.t, draw.y, draw.mask)
        return _stage_terms(v_hat, v, draw.mask), draw
