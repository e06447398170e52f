"""The training loop: one loop for every scale, on a DeepSpeed-style engine.

The loop needs three small things from the launch layer (``dfm.launch.train`` builds them): an engine
(:class:`Engine`: called as the model, ``backward(loss)``, ``step()``, ``module``), an EMA (:class:`EMA`)
and the engine's part of a checkpoint (``dfm.checkpoint.EngineState``); it knows nothing of DeepSpeed
itself. The only device-to-host reads happen at log intervals (loss), sample intervals and checkpoints;
a plain step queues work and never waits.

Randomness follows the data, not the process: micro-batch ``slot = rank * accum_steps + micro`` of global
step ``step`` holds the same samples (``dfm.data.InMemoryLoader``) and draws its stage, times, noise and
label dropout from a generator seeded with ``draw_seed(seed, step, slot, slots)``. Every micro-batch of a
run has its own seed, so two ranks never draw the same noise; and a run is the same -- up to the order of
floating-point sums -- for any world size with the same micro batch, which is also what makes a resume at
another world size continue the same run.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from dfm import checkpoint
from dfm.objective import DFMObjective
from dfm.precision import resolve_precision
from dfm.visualize import class_rows, sample_model, save_png, stage_preview_grid


class Engine(Protocol):
    """The training engine as the loop uses it (a DeepSpeed engine in practice)."""

    module: torch.nn.Module

    def __call__(self, *args, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


class EMA(Protocol):
    """An exponential moving average of the weights (``dfm.launch.ema``)."""

    def update_(self, model: torch.nn.Module, decay: float) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None: ...

    def module(self) -> torch.nn.Module | None: ...


@dataclass
class TrainState:
    """What a resume needs besides the engine and EMA (saved per rank as JSON)."""

    step: int = 0
    loader: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


def draw_seed(seed: int, step: int, slot: int, slots: int) -> int:
    """Seed of the draws of micro-batch ``slot`` (of ``slots`` per global batch) in global step ``step``.

    Distinct for every (step, slot) of a run, also modulo 2**32 (the part of a seed torch's CPU generator
    keeps) while ``step * slots < 2**32``.
    """
    return ((seed * 1_000_000_007 + step) * slots + slot) % 2**63


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class Trainer:
    """Owns the run's moving parts; :meth:`fit` is the loop."""

    def __init__(
        self,
        cfg,
        engine: Engine,
        ema: EMA,
        loader,
        accum_steps: int,
        engine_state: checkpoint.EngineState,
        rank: int = 0,
        config_yaml: str = "",
        writer=None,
    ):
        self.cfg, self.engine, self.ema, self.loader = cfg, engine, ema, loader
        self.accum_steps, self.engine_state, self.rank = accum_steps, engine_state, rank
        self.config_yaml, self.writer = config_yaml, writer
        self.device = next(engine.module.parameters()).device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.objective = DFMObjective.from_config(cfg)
        self.generator = torch.Generator(self.device)  # reseeded for every micro-batch: seed_draws()
        self.state = TrainState()
        self.run_id = uuid.uuid4().hex  # a resume takes the id of the run it continues
        self.ckpt_root = cfg.run_dir / "checkpoints"

    # -- resume / checkpoint --------------------------------------------------------------------------
    def resume(self, ckpt_dir: Path) -> None:
        """Continue from ``ckpt_dir`` (verified by the caller: ``dfm.checkpoint.find_resumable``)."""
        ckpt_dir = Path(ckpt_dir)
        self.run_id = checkpoint.read_manifest(ckpt_dir)["run_id"]
        self.engine_state.load(ckpt_dir)
        self.ema.load_state_dict(checkpoint.load_ema_weights(ckpt_dir))
        state = checkpoint.load_trainer_state(ckpt_dir, self.rank)
        own = state is not None
        if not own:  # a rank the saving run did not have: step and data position are the same on every rank
            state = checkpoint.load_trainer_state(ckpt_dir, 0)
        if state is None:
            raise checkpoint.CheckpointError(
                f"{ckpt_dir} has no trainer state ({checkpoint.trainer_file(ckpt_dir, 0)})"
            )
        self.state = TrainState(step=int(state["step"]), loader=state["loader"], rng=state["rng"])
        self.loader.load_state_dict(self.state.loader)
        if own:  # the process-global RNGs; the training draws are reseeded per micro-batch anyway
            checkpoint.set_rng_state(self.state.rng)

    def save(self) -> Path:
        t = self.cfg.train
        self.state.loader = self.loader.state_dict()
        self.state.rng = checkpoint.rng_state()
        request = checkpoint.SaveRequest(
            step=self.state.step,
            run_id=self.run_id,
            trainer_state=vars(self.state),
            config_yaml=self.config_yaml,
            layout={"world_size": self.world_size, "zero_stage": t.zero_stage, "offload": t.offload},
            keep=t.keep_ckpts,
        )
        return checkpoint.save_checkpoint(self.ckpt_root, request, self.engine_state, self.ema)

    def seed_draws(self, step: int, micro: int) -> torch.Generator:
        """Seed the objective's generator for micro-batch ``micro`` of this rank in global step ``step``."""
        slots = self.world_size * self.accum_steps
        return self.generator.manual_seed(draw_seed(self.cfg.seed, step, self.rank * self.accum_steps + micro, slots))

    def write_samples(self) -> Path | None:
        """EMA sample grid (a row per class, per-stage previews side by side) as a PNG (rank 0)."""
        ema = self.ema.module()  # a collective under ZeRO-3: the partitions are gathered to rank 0
        if self.rank != 0:
            return None
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)  # same noise every time: comparable grids
        y = class_rows(self.cfg.data.num_classes, self.cfg.sample.per_class, self.device)
        result = sample_model(ema, self.cfg, y, generator=g)
        grid = stage_preview_grid(result, rows=min(self.cfg.data.num_classes, 10), scale=2)
        return save_png(grid, self.cfg.run_dir / "samples" / f"{self.state.step:07d}.png")

    # -- the loop -------------------------------------------------------------------------------------
    def train_step(self, data) -> torch.Tensor:
        """One optimizer step over ``accum_steps`` micro-batches of ``data``, then the EMA; returns the
        micro-batch losses summed on device (no host sync)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            x, y = next(data)
            x = x.to(self.device, torch.float32, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # under bf16 the engine's forward runs in autocast (its torch_autocast section); the pyramid,
            # noising, targets and loss around it stay fp32
            loss, _ = self.objective(self.engine, x, y, generator=self.seed_draws(self.state.step, micro))
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            loss_sum += loss.detach()
        self.ema.update_(self.engine.module, self.cfg.train.ema_decay)
        self.state.step += 1
        return loss_sum

    def log_metrics(self, loss_sum: torch.Tensor, steps: int, seconds: float) -> float:
        """Log the mean loss of the last ``steps`` steps (the one host read, at log steps only); returns it.

        A non-finite loss stops the run here, before it can be saved (``dfm.checkpoint`` refuses to save
        non-finite weights too): the last checkpoints stay the good ones.
        """
        loss = _all_reduce_mean(loss_sum / (steps * self.accum_steps)).item()
        if not math.isfinite(loss):
            raise checkpoint.NonFiniteError(
                f"step {self.state.step}: the training loss is {loss}; stopping before anything is saved "
                f"(resume from the last checkpoint with a lower train.lr, or check the data)"
            )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.state.step)
            self.writer.add_scalar("train/steps_per_s", steps / seconds, self.state.step)
        return loss

    def fit(self) -> float | None:
        """Train until ``train.max_steps``; returns the last logged loss."""
        t_cfg = self.cfg.train
        data = iter(self.loader)
        loss_sum = torch.zeros((), device=self.device)  # accumulated on device; read only at log steps
        last_loss, tic, logged_at = None, time.perf_counter(), self.state.step
        bar = tqdm(
            total=t_cfg.max_steps, initial=self.state.step, disable=self.rank != 0, dynamic_ncols=True, unit="step"
        )
        while self.state.step < t_cfg.max_steps:
            loss_sum += self.train_step(data)
            bar.update(1)
            step = self.state.step
            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                last_loss = self.log_metrics(loss_sum, step - logged_at, time.perf_counter() - tic)
                loss_sum.zero_()
                tic, logged_at = time.perf_counter(), step
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if step % t_cfg.sample_every == 0 or step == t_cfg.max_steps:
                self.write_samples()
            if step % t_cfg.ckpt_every == 0 or step == t_cfg.max_steps:
                self.save()
        bar.close()
        return last_loss
