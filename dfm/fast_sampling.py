"""Fast path of the staged sampler: one compiled step function, captured in CUDA graphs on GPU.

:class:`dfm.sampling.StagedSampler` is the eager reference; this module runs the very same step
(:meth:`StagedSampler.step_from_rows`: CFG, Euler/Heun) and the same previews (:func:`phase_preview`)
faster, without copying any of that logic:

- The static schedule is packed once into a device table ``rows`` of shape (N, 4, S): per step the
  rows ``t``, ``t_next``, ``active`` and ``guided``. A step reads one (4, S) row, so every step has the
  same shapes and the step function compiles once per batch layout.
- CFG doubles the batch only on guided steps. That is a different shape, so there are exactly two
  step variants (``double_batch`` False and True): two compiled graphs, and on CUDA two captured CUDA
  graphs sharing one memory pool, chosen per step from the host-side list ``step_is_guided``.
- ``cudagraph`` mode keeps static buffers: the state ``x`` and the last velocity ``v`` per stage, the
  labels ``y`` and the current row. A step is a device-to-device copy of the row followed by a replay;
  nothing is read back to the host until the caller looks at the result.

:func:`sampler_mode` is the one predicate deciding between ``cudagraph``, ``compile`` and ``eager``.
:class:`ModelSampler` is the one entry that sampling a model from its run config goes through (the grids of
``dfm.visualize``, ``dfm generate`` and the evaluations of ``dfm.generation``): the staged ODE sampler on this
fast path, or the SDE baseline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfm.errors import ArgumentError
from dfm.normalization import FlowSpace
from dfm.sampling import SampleResult, StagedSampler, phase_preview, sample_sde

logger = logging.getLogger(__name__)

SAMPLER_MODES = ("auto", "eager", "compile", "cudagraph")
RECOMPILE_LIMIT = 64  # graphs of the step function: batch layouts x CFG variants


def sampler_mode(device: torch.device | str, requested: str = "auto") -> str:
    """The one predicate: how the staged sampler runs on ``device``.

    ``auto`` is ``cudagraph`` on CUDA (a replay per step removes the per-kernel launch overhead that
    dominates small batches) and ``eager`` elsewhere: on a 2-core AVX2 CPU the compiled DFM-SiT-S/2 step
    (32x32x4, batch 1-4) runs 1.2-1.4x faster than eager but takes over two minutes to compile cold
    (``benchmarks/bench_sampling.py``), which only long sampling runs win back; force ``compile`` for
    those. A forced mode that cannot run raises.
    """
    if requested not in SAMPLER_MODES:
        raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {requested!r}")
    device = torch.device(device)
    if requested == "cudagraph" and device.type != "cuda":
        raise RuntimeError(f"sampler mode 'cudagraph' was forced but the tensors are on {device.type}, not CUDA")
    if requested != "auto":
        return requested
    return "cudagraph" if device.type == "cuda" else "eager"


def schedule_rows(sampler: StagedSampler, device: torch.device | str) -> Tensor:
    """The static tables of ``sampler`` as one (N, 4, S) float32 tensor: ``t``, ``t_next``, ``active``, ``guided``.

    ``t`` and ``t_next`` are rounded to float32 exactly as the eager sampler's tables are.
    """
    schedule = sampler.schedule
    rows = torch.stack(
        [schedule.t.float(), schedule.t_next.float(), schedule.active.float(), sampler.guided.float()], dim=1
    )
    return rows.to(device)


def _layout(noise: list[Tensor], y: Tensor) -> tuple:
    """What a compiled / captured step is specialised on: shapes, dtypes and device of its inputs."""
    return (tuple(tuple(n.shape) for n in noise), noise[0].dtype, tuple(y.shape), y.dtype, noise[0].device)


@dataclass
class _Graphs:
    """Static buffers and the captured step graphs for one batch layout."""

    x: list[Tensor]  # state per stage (float32)
    v: list[Tensor]  # velocity used by the last step, per stage
    y: Tensor
    row: Tensor  # (4, S) row of the schedule table for the current step
    graphs: dict[bool, torch.cuda.CUDAGraph] = field(default_factory=dict)


class FastStagedSampler:
    """Runs a :class:`StagedSampler` compiled, or compiled and replayed from CUDA graphs.

    Args:
        sampler: the eager sampler (model, schedule, method, CFG settings); it stays the reference.
        mode: ``"auto"``, ``"eager"``, ``"compile"`` or ``"cudagraph"`` (see :func:`sampler_mode`).
        compile_mode: ``torch.compile`` mode for the step. ``"reduce-overhead"`` (torch's own CUDA graphs)
            only with ``mode="compile"``: it is the alternative ``benchmarks/bench_sampling.py`` measures the
            graphs captured here against, and it cannot be nested inside them.

    ``sample(noise, y)`` returns what ``sampler.sample(noise, y)`` returns, up to float rounding of the
    compiled kernels. Batch size and stage shapes are static per compiled graph / captured graph; a new
    layout compiles (and captures) once more.
    """

    def __init__(self, sampler: StagedSampler, mode: str = "auto", compile_mode: str | None = None):
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
        if compile_mode == "reduce-overhead" and mode != "compile":
            raise ValueError(
                f"compile_mode='reduce-overhead' captures its own CUDA graphs: use it with mode='compile', not {mode!r}"
            )
        self.sampler = sampler
        self._own_graphs = compile_mode == "reduce-overhead"
        self.mode = mode
        options = {"fullgraph": True, "dynamic": False}
        if compile_mode is not None:
            options["mode"] = compile_mode
        self._compiled_step = torch.compile(self._step, **options)
        self._rows: dict[torch.device, Tensor] = {}
        self._graphs: dict[tuple, _Graphs] = {}  # per batch layout, cudagraph mode
        self._warm: set[tuple] = set()  # batch layouts already compiled, compile mode
        self._pool = None
        # Seconds the last ``sample`` call spent compiling / capturing (about 0 once warmed up).
        self.last_prepare_s = 0.0

    def _step(self, x: list[Tensor], y: Tensor, row: Tensor, double_batch: bool) -> tuple[list[Tensor], list[Tensor]]:
        # The traced function: one step of the reference sampler with the step's row unpacked.
        return self.sampler.step_from_rows(x, y, row[0], row[1], row[2] > 0.5, row[3] > 0.5, double_batch)

    def rows(self, device: torch.device) -> Tensor:
        """The (N, 4, S) schedule table on ``device``, built once."""
        if device not in self._rows:
            self._rows[device] = schedule_rows(self.sampler, device)
        return self._rows[device]

    @torch.no_grad()
    def sample(self, noise: list[Tensor], y: Tensor, previews: bool = True) -> SampleResult:
        """Integrate from ``noise`` (one tensor per stage, coarsest first) with labels ``y``."""
        if len(noise) != self.sampler.schedule.stages:
            raise ValueError(f"schedule has {self.sampler.schedule.stages} stages but got {len(noise)} noise tensors")
        device = noise[0].device
        mode = sampler_mode(device, self.mode)
        self.last_prepare_s = 0.0
        if mode == "eager":
            return self.sampler.sample(noise, y, previews)
        if mode == "cudagraph":
            return self._sample_cudagraph(noise, y, previews)
        return self._sample_compiled(noise, y, previews)

    # -- compiled ---------------------------------------------------------------------------------------
    def warmup(self, noise: list[Tensor], y: Tensor) -> None:
        """Compile (and on CUDA capture) every step variant this schedule uses for this batch layout.

        Each (batch layout, CFG variant) is one graph by design, and torch stops compiling a function
        after ``recompile_limit`` (8) graphs, raising under ``fullgraph``: the limit is lifted to
        ``RECOMPILE_LIMIT`` here, the only place where the step compiles.
        """
        mode = sampler_mode(noise[0].device, self.mode)
        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit), torch.no_grad():
            if mode == "cudagraph":
                self._graphs_for(noise, y)
            elif mode == "compile" and _layout(noise, y) not in self._warm:
                x = [n.float() for n in noise]
                row = self.rows(x[0].device)[0]
                for double_batch in sorted(set(self.sampler.step_is_guided)):
                    self._compiled_step(x, y, row, double_batch)
                self._warm.add(_layout(noise, y))

    def _sample_compiled(self, noise: list[Tensor], y: Tensor, previews: bool) -> SampleResult:
        start = time.perf_counter()
        self.warmup(noise, y)
        self.last_prepare_s = time.perf_counter() - start
        x = [n.float() for n in noise]
        rows = self.rows(x[0].device)
        ends = set(self.sampler.schedule.phase_ends())
        shown = []  # one preview per finished phase
        for i, double_batch in enumerate(self.sampler.step_is_guided):
            if self._own_graphs:  # torch's graphs overwrite their outputs on the next replay: keep a copy
                torch.compiler.cudagraph_mark_step_begin()
                x, v = (list(map(torch.clone, out)) for out in self._compiled_step(x, y, rows[i], double_batch))
            else:
                x, v = self._compiled_step(x, y, rows[i], double_batch)
            if previews and i in ends:
                shown.append(phase_preview(x, v, rows[i, 1], len(shown), self.sampler.flow))
        return self.sampler.result(x, shown)

    # -- CUDA graphs ------------------------------------------------------------------------------------
    def _graphs_for(self, noise: list[Tensor], y: Tensor) -> _Graphs:
        key = _layout(noise, y)
        if key in self._graphs:
            return self._graphs[key]
        device = noise[0].device
        rows = self.rows(device)
        bufs = _Graphs(
            x=[n.float().clone() for n in noise],
            v=[torch.zeros_like(n, dtype=torch.float32) for n in noise],
            y=y.clone(),
            row=rows[0].clone(),
        )
        variants = sorted(set(self.sampler.step_is_guided))
        # Warm up on a side stream (compiles the step and lets lazy initialisation such as cuBLAS
        # workspaces happen outside the capture), as torch.cuda.graphs recommends.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for double_batch in variants:
                for _ in range(2):
                    self._graph_body(bufs, double_batch)
        torch.cuda.current_stream(device).wait_stream(side)
        for double_batch in variants:
            graph = torch.cuda.CUDAGraph()
            # Both variants share one pool: all their outputs land in the static buffers, so the
            # temporaries of one graph are dead when the other replays.
            with torch.cuda.graph(graph, pool=self._pool):
                self._graph_body(bufs, double_batch)
            self._pool = graph.pool()
            bufs.graphs[double_batch] = graph
        self._graphs[key] = bufs
        return bufs

    def _graph_body(self, bufs: _Graphs, double_batch: bool) -> None:
        # What a replay does: one compiled step from the static state, written back into it.
        x_next, v = self._compiled_step(bufs.x, bufs.y, bufs.row, double_batch)
        for s in range(len(bufs.x)):
            bufs.x[s].copy_(x_next[s])
            bufs.v[s].copy_(v[s])

    def _sample_cudagraph(self, noise: list[Tensor], y: Tensor, previews: bool) -> SampleResult:
        start = time.perf_counter()
        self.warmup(noise, y)
        bufs = self._graphs_for(noise, y)
        self.last_prepare_s = time.perf_counter() - start
        for buf, n in zip(bufs.x, noise):
            buf.copy_(n)
        bufs.y.copy_(y)
        rows = self.rows(noise[0].device)
        ends = set(self.sampler.schedule.phase_ends())
        shown = []  # one preview per finished phase
        for i, double_batch in enumerate(self.sampler.step_is_guided):
            bufs.row.copy_(rows[i])
            bufs.graphs[double_batch].replay()
            if previews and i in ends:
                shown.append(phase_preview(bufs.x, bufs.v, rows[i, 1], len(shown), self.sampler.flow))
        x = [buf.clone() for buf in bufs.x]  # the buffers are overwritten by the next call
        return self.sampler.result(x, shown)


class ModelSampler:
    """Samples ``model`` as run config ``cfg``'s ``sample`` section says: the staged ODE sampler
    (:class:`dfm.sampling.StagedSampler`, run by :class:`FastStagedSampler` unless ``mode`` is ``"eager"``) or,
    with ``sample.mode: sde``, the Euler-Maruyama baseline (:func:`dfm.sampling.sample_sde`). Built once per
    model and config; the flow space (``dfm.normalization.FlowSpace``) comes from the config.
    """

    def __init__(self, model, cfg, mode: str = "eager"):
        self.check(cfg)
        self.model, self.num_steps = model, cfg.sample.num_steps
        self.staged = StagedSampler.from_config(model, cfg) if cfg.sample.mode == "ode" else None
        self.flow = self.staged.flow if self.staged is not None else FlowSpace.from_config(cfg)
        # "eager" skips the wrapper: it would run the very same eager sampler
        self.fast = FastStagedSampler(self.staged, mode) if self.staged is not None and mode != "eager" else None

    @staticmethod
    def check(cfg) -> None:
        """Refuse a ``sample`` section no sampler here can run (an :class:`~dfm.errors.ArgumentError` naming the
        key in ``sample``): the one check, made when a config is loaded (``dfm.config``) and when a sampler is
        built. The staged schedule is checked in either mode, so a config may switch modes."""
        StagedSampler.from_config(None, cfg)
        if cfg.sample.mode == "sde" and cfg.stages != 1:
            raise ArgumentError("mode", ": the SDE sampler is for single-stage (SiT) models only")
        if cfg.sample.mode == "sde" and cfg.sample.cfg_scale != 1.0:
            raise ArgumentError("cfg_scale", ": classifier-free guidance is not implemented for the SDE sampler")

    @torch.no_grad()
    def sample(
        self,
        noise: list[Tensor],
        y: Tensor,
        previews: bool = True,
        generator: torch.Generator | None = None,
        step_noise=None,
    ) -> SampleResult:
        """Integrate from ``noise`` (one tensor per stage, coarsest first) with labels ``y``. The SDE also draws
        noise at every step: from ``step_noise()`` when given, else from ``generator``; its previews are the
        result itself (one stage)."""
        if self.staged is None:
            x = sample_sde(self.model, noise[0], y, self.num_steps, generator=generator, step_noise=step_noise,
                           flow=self.flow)  # fmt: skip
            return SampleResult(bands=[x], x=x, previews=[x])
        if self.fast is None:
            return self.staged.sample(noise, y, previews)
        return self.fast.sample(noise, y, previews)


__all__ = ["FastStagedSampler", "ModelSampler", "SAMPLER_MODES", "sampler_mode", "schedule_rows"]
