"""Staged sampling (spec §5) and the single-stage SiT baselines (Euler/Heun ODE, Euler-Maruyama SDE).

The whole schedule is a static table built once: per step ``t`` and ``t_next`` (N, S) and the active
stages (N, S). In phase s, stage s moves linearly from 1 to its threshold (the last stage to 0), later
stages wait at t = 1 (masked, not updated) and earlier stages follow the product rule
``t_j = tau_{j+1} * t_{j+1}``, which is monotone for any number of stages. Euler steps are
``x[s] += (t_next[s] - t[s]) * v_hat[s]``; a stage that does not move has ``t_next == t`` and is left
exactly as it was. The state stays in float32 whatever dtype the model runs in.

Sampling a model from its run config goes through one entry, ``dfm.fast_sampling.ModelSampler``: these
samplers, on the fast path where it applies.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dfm import ops
from dfm.errors import ArgumentError
from dfm.normalization import FlowSpace

Method = Literal["euler", "heun"]
METHODS: tuple[str, ...] = typing.get_args(Method)


@dataclass
class Schedule:
    """Static staged schedule: ``t``, ``t_next`` (N, S) float64 and ``active`` (N, S) bool."""

    t: Tensor
    t_next: Tensor
    active: Tensor
    steps_per_stage: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return self.t.shape[0]

    @property
    def stages(self) -> int:
        return self.t.shape[1]

    def phase_ends(self) -> list[int]:
        """Index of the last step of every phase."""
        ends, total = [], 0
        for n in self.steps_per_stage:
            total += n
            ends.append(total - 1)
        return ends


def validate_schedule_args(steps_per_stage: list[int], thresholds: list[float]) -> None:
    """Raise ValueError naming the offending argument."""
    if len(steps_per_stage) < 1:
        raise ArgumentError("num_steps_per_scale", "must have one entry per stage (at least one)")
    if any(int(n) != n or n < 1 for n in steps_per_stage):
        raise ArgumentError("num_steps_per_scale", f"entries must be positive integers, got {list(steps_per_stage)}")
    if len(thresholds) != len(steps_per_stage) - 1:
        raise ArgumentError(
            "stage_sampling_thresholds",
            f"needs one entry per stage boundary ({len(steps_per_stage) - 1}), got {len(thresholds)}: "
            f"{list(thresholds)}",
        )
    if any(not 0.0 < tau < 1.0 for tau in thresholds):
        raise ArgumentError("stage_sampling_thresholds", f"must lie strictly between 0 and 1, got {list(thresholds)}")
    if any(b >= a for a, b in zip(thresholds, thresholds[1:])):
        raise ArgumentError("stage_sampling_thresholds", f"must be strictly decreasing, got {list(thresholds)}")


def staged_schedule(steps_per_stage: list[int], thresholds: list[float]) -> Schedule:
    """The staged schedule for ``num_steps_per_scale`` and ``stage_sampling_thresholds`` (spec §5)."""
    validate_schedule_args(steps_per_stage, thresholds)
    S = len(steps_per_stage)
    ends = [float(tau) for tau in thresholds] + [0.0]  # where each stage's own phase leaves it
    ts, t_nexts, actives = [], [], []
    for s, n in enumerate(steps_per_stage):
        lead = torch.linspace(1.0, ends[s], n + 1, dtype=torch.float64)  # stage s, n + 1 knots
        knots = torch.ones(n + 1, S, dtype=torch.float64)
        knots[:, s] = lead
        for j in range(s - 1, -1, -1):  # product rule for the stages already under way
            knots[:, j] = ends[j] * knots[:, j + 1]
        ts.append(knots[:-1])
        t_nexts.append(knots[1:])
        active = torch.zeros(n, S, dtype=torch.bool)
        active[:, : s + 1] = True
        actives.append(active)
    return Schedule(torch.cat(ts), torch.cat(t_nexts), torch.cat(actives), tuple(int(n) for n in steps_per_stage))


def guided_table(schedule: Schedule, cfg_scale: float, guidance_low: float, guidance_high: float) -> Tensor:
    """(N, S) bool: stage s is guided at step i iff active, cfg_scale != 1 and t in [low, high]."""
    if cfg_scale == 1.0:
        return torch.zeros_like(schedule.active)
    return schedule.active & (schedule.t >= guidance_low) & (schedule.t <= guidance_high)


@dataclass
class SampleResult:
    bands: list[Tensor]  # final per-stage tensors, coarsest first
    x: Tensor  # recomposed output (B, C, H, W)
    previews: list[Tensor]  # after phase s: denoised estimate of stages 0..s recomposed, full size


class StagedSampler:
    """Euler or Heun integration of a (DFM-)SiT along a static staged schedule, with CFG.

    Args:
        model: callable ``model(x_list, t (B, S), y (B,), mask (B, S)) -> list of velocities``.
        schedule: from :func:`staged_schedule`.
        method: ``"euler"`` or ``"heun"``.
        cfg_scale: guidance weight w; ``v = v_uncond + w (v_cond - v_uncond)`` on guided stages.
        guidance_low, guidance_high: a stage is guided only while its own t lies in this interval.
        null_class: label of the unconditional branch (``num_classes``).
        flow: the space the model's flow runs in (``dfm.normalization.FlowSpace``); the state is integrated
            in that space and mapped back before the stages are recomposed (results and previews). None: the
            bands as they are (the reference).
    """

    def __init__(
        self,
        model,
        schedule: Schedule,
        method: str = "euler",
        cfg_scale: float = 1.0,
        guidance_low: float = 0.0,
        guidance_high: float = 1.0,
        null_class: int = 1000,
        flow: FlowSpace | None = None,
    ):
        if method not in METHODS:
            raise ArgumentError("method", f"must be {' or '.join(map(repr, METHODS))}, got {method!r}")
        if not math.isfinite(cfg_scale):
            raise ArgumentError("cfg_scale", f"must be a finite number, got {cfg_scale!r}")
        if not guidance_low <= guidance_high:  # an interval no step reaches is allowed: it guides nothing
            raise ArgumentError("guidance_low", f"({guidance_low}) must not exceed guidance_high ({guidance_high})")
        self.model = model
        self.schedule = schedule
        self.method = method
        self.cfg_scale = float(cfg_scale)
        self.null_class = null_class
        self.flow = (flow or FlowSpace()).check_stages(schedule.stages)
        self.guided = guided_table(schedule, cfg_scale, guidance_low, guidance_high)
        # Host-side copy of which steps double the batch: decided once, never read back from the device.
        self.step_is_guided = self.guided.any(dim=1).tolist()

    @classmethod
    def from_config(cls, model, cfg) -> StagedSampler:
        """The staged sampler that run config ``cfg``'s ``sample`` section describes, for ``model``.

        A ``ValueError`` names the argument first (``num_steps_per_scale ...``), which is the key in ``sample``.
        """
        steps = cfg.steps_per_stage()
        if len(steps) != cfg.stages:
            raise ArgumentError("num_steps_per_scale", f"has {len(steps)} entries for {cfg.stages} stages: {steps}")
        return cls(
            model,
            staged_schedule(steps, cfg.thresholds()),
            method=cfg.sample.method,
            cfg_scale=cfg.sample.cfg_scale,
            guidance_low=cfg.sample.guidance_low,
            guidance_high=cfg.sample.guidance_high,
            null_class=cfg.data.num_classes,
            # validation builds a sampler without a model before a run has measured its statistics
            flow=FlowSpace.from_config(cfg) if model is not None else None,
        )

    def velocity(
        self, x: list[Tensor], t: Tensor, y: Tensor, mask: Tensor, guided: Tensor, double_batch: bool
    ) -> list[Tensor]:
        """Model velocity at (x, t) for a batch; ``double_batch`` runs the batch twice, the second half with null
        labels, and mixes the two by classifier-free guidance on the ``guided`` stages.

        ``t`` (S,), ``mask`` (S,) and ``guided`` (S,) are the step's rows of the static tables.
        """
        B = y.shape[0]
        dtype = x[0].dtype
        if not double_batch:
            return self.model(x, t.expand(B, -1), y, mask.expand(B, -1))
        x2 = [torch.cat([x_s, x_s]) for x_s in x]
        y2 = torch.cat([y, torch.full_like(y, self.null_class)])
        v2 = self.model(x2, t.expand(2 * B, -1), y2, mask.expand(2 * B, -1))
        out = []
        for s, v_s in enumerate(v2):
            v_cond, v_uncond = v_s[:B].to(dtype), v_s[B:].to(dtype)
            v_guided = v_uncond + self.cfg_scale * (v_cond - v_uncond)
            out.append(torch.where(guided[s], v_guided, v_cond))
        return out

    def step_at(self, x: list[Tensor], y: Tensor, i: int) -> tuple[list[Tensor], list[Tensor]]:
        """Step ``i`` of the schedule; returns the new state and the velocity used (for previews)."""
        tables = self._tables(x[0].device)
        t, t_next, mask, guided = tables["t"][i], tables["t_next"][i], tables["active"][i], tables["guided"][i]
        return self.step_from_rows(x, y, t, t_next, mask, guided, self.step_is_guided[i])

    def step_from_rows(
        self, x: list[Tensor], y: Tensor, t: Tensor, t_next: Tensor, mask: Tensor, guided: Tensor, double_batch: bool
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One step from the step's rows of the static tables (each (S,)); ``double_batch``: a guided step
        (:meth:`velocity`).

        A pure function of its tensor arguments with fixed shapes, which is what the compiled and
        CUDA-graph samplers (``dfm.fast_sampling``) trace. Velocities are used in float32, or in the
        state's dtype when that is wider (a float64 reference run).
        """
        wide = torch.promote_types(x[0].dtype, torch.float32)
        v = [v_s.to(wide) for v_s in self.velocity(x, t, y, mask, guided, double_batch)]
        dt = t_next - t
        x_next = [x_s + dt[s] * v[s] for s, x_s in enumerate(x)]
        if self.method == "heun":
            v2 = [v_s.to(wide) for v_s in self.velocity(x_next, t_next, y, mask, guided, double_batch)]
            v = [(a + b) / 2 for a, b in zip(v, v2)]
            x_next = [x_s + dt[s] * v[s] for s, x_s in enumerate(x)]
        return x_next, v

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        cache = getattr(self, "_table_cache", None)
        if cache is None or cache["t"].device != device:
            cache = {
                "t": self.schedule.t.float().to(device),
                "t_next": self.schedule.t_next.float().to(device),
                "active": self.schedule.active.to(device),
                "guided": self.guided.to(device),
            }
            self._table_cache = cache
        return cache

    @torch.no_grad()
    def sample(self, noise: list[Tensor], y: Tensor, previews: bool = True) -> SampleResult:
        """Integrate from ``noise`` (one white-noise tensor per stage, coarsest first) with labels ``y``."""
        if len(noise) != self.schedule.stages:
            raise ValueError(f"schedule has {self.schedule.stages} stages but got {len(noise)} noise tensors")
        x = [n.float() for n in noise]
        t_next = self._tables(x[0].device)["t_next"]
        ends = set(self.schedule.phase_ends())
        shown = []  # one preview per finished phase
        for i in range(self.schedule.num_steps):
            x, v = self.step_at(x, y, i)
            if previews and i in ends:
                shown.append(phase_preview(x, v, t_next[i], len(shown), self.flow))
        return self.result(x, shown)

    def result(self, x: list[Tensor], previews: list[Tensor]) -> SampleResult:
        """The final flow-space state ``x`` as data-space bands and their recomposition."""
        bands = self.flow.to_data(x)
        return SampleResult(bands=bands, x=ops.recompose(bands), previews=previews)


def phase_preview(x: list[Tensor], v: list[Tensor], t_next: Tensor, s: int, flow: FlowSpace | None = None) -> Tensor:
    """Full-size preview at the end of phase ``s`` from the state ``x`` and the velocity ``v`` just used.

    The denoised estimate ``x_hat = x_t - t v`` of stages 0..s (stage s is still at its threshold),
    recomposed with the untouched later stages; ``t_next`` is the step's (S,) row of the table; ``flow`` the
    space the state lives in (``dfm.normalization.FlowSpace``), mapped back before recomposing.
    """
    est = [x[j] - t_next[j] * v[j] for j in range(s + 1)]
    return (flow or FlowSpace()).preview(est + x[s + 1 :], s)


def stage_noise(
    batch: int, shapes: list[tuple[int, int, int]], generator: torch.Generator | None = None, device=None
) -> list[Tensor]:
    """Independent white noise per stage, shapes (C, H_s, W_s) coarsest first."""
    return [torch.randn((batch, *shape), generator=generator, device=device) for shape in shapes]


@torch.no_grad()
def sample_sde(
    model,
    noise: Tensor,
    y: Tensor,
    num_steps: int = 250,
    diffusion_norm: float = 1.0,
    generator: torch.Generator | None = None,
    step_noise: Callable[[], Tensor] | None = None,
    flow: FlowSpace | None = None,
) -> Tensor:
    """Euler-Maruyama sampling of a single-stage model (the SiT SDE baseline).

    The reverse-time SDE with the ODE's marginals is ``dx = [v - g^2/2 * score] dt + g dW`` with
    ``score = -(x + (1 - t) v) / t`` (from ``x_t = (1-t) x_0 + t eps``) and ``g^2 = diffusion_norm * t``
    (SiT's "sigma" diffusion form). The last step adds no noise, so the output is the mean estimate.
    ``step_noise`` returns the N(0, I) draw of a step (shape of ``noise``) instead of ``generator``: how
    ``dfm.generation`` keeps each sample's noise a function of its own index, whatever batch it is in.
    ``flow``: the space the model's flow runs in (``dfm.normalization.FlowSpace``), mapped back on the result
    as :class:`StagedSampler` does; None: the data as it is.
    """
    if num_steps < 1:
        raise ArgumentError("num_steps", f"must be >= 1, got {num_steps}")
    B = y.shape[0]
    x = noise.float()
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    mask = torch.ones(B, 1, dtype=torch.bool, device=x.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        t_b = torch.full((B, 1), t, device=x.device)
        v = model([x], t_b, y, mask)[0].float()
        g2 = diffusion_norm * t
        score = -(x + (1 - t) * v) / t
        dt = t_next - t  # negative
        x = x + (v - 0.5 * g2 * score) * dt
        if t_next > 0:
            if step_noise is not None:
                z = step_noise().to(x.device, x.dtype)
            else:
                z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + (g2 * -dt) ** 0.5 * z
    return (flow or FlowSpace()).to_data([x])[0]
