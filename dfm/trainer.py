"""The training loop: one loop for every scale, on a DeepSpeed-style engine.

The loop needs three small things from the launch layer (``dfm.launch.train`` builds them): an engine
(:class:`Engine`: called as the model, ``backward(loss)``, ``step()``, ``module``, ``optimizer``), an EMA
(:class:`EMA`) and the engine's part of a checkpoint (``dfm.checkpoint.EngineState``); it knows nothing of
DeepSpeed itself. The only device-to-host reads happen at log intervals (one vector of sums, see
:class:`StepSums`), sample and evaluation intervals and checkpoints; a plain step queues work and never waits.
The learning rate and the EMA decay of a step are pure functions of the step (``dfm.schedule``), set as
Python numbers: nothing to read back, and nothing to save for an exact resume.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from dfm import checkpoint
from dfm.config import config_text
from dfm.flops import device_name, mfu, training_flops
from dfm.models import model_config_from
from dfm.objective import DFMObjective
from dfm.precision import resolve_precision
from dfm.reporting import MetricsWriter, Progress, format_line, peak_memory_gib
from dfm.schedule import train_ema_decay, train_lr
from dfm.visualize import class_rows, decode_result, grid_scale, sample_model, save_png, stage_preview_grid


class Engine(Protocol):
    """The training engine as the loop uses it (a DeepSpeed engine in practice)."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer  # its param_groups carry the learning rate the next step uses

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


@dataclass(frozen=True)
class StepSums:
    """The layout of the device vector a step returns and a log interval sums, for ``stages`` stages.

    ``[loss, term_0 .. term_{S-1}, active_0 .. active_{S-1}, grad_norm]``: per micro-batch the loss, each
    stage's term of it (they sum to the loss) and the fraction of the micro-batch in which the stage was
    active; per step the global gradient norm before clipping. One vector, so a log step does one all-reduce
    and one host read whatever is logged.
    """

    stages: int

    @property
    def width(self) -> int:
        return 2 + 2 * self.stages

    def scalars(self, values: list[float], micro_batches: int, steps: int) -> dict[str, float]:
        """Interval means, keyed by TensorBoard tag, from the summed ``values`` (host numbers)."""
        s = self.stages
        terms, active = values[1 : 1 + s], values[1 + s : 1 + 2 * s]
        out = {"train/loss": values[0] / micro_batches}
        out.update({f"train/loss_stage{k}": terms[k] / micro_batches for k in range(s)})
        # a stage's MSE over the samples where it was active: its term is that MSE times the active fraction
        out.update({f"train/mse_stage{k}": terms[k] / active[k] for k in range(s) if active[k] > 0})
        out["train/grad_norm"] = values[-1] / steps
        return out


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


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


class Trainer:
    """Owns the run's moving parts; :meth:`fit` is the loop.

    ``read_grad_norm``: a function returning the last step's global gradient norm (a device tensor; None if
    unknown), from the optimizer that clipped. ``decoder``: turns latents into images for the sample grids
    (``dfm.vae``; None for pixels, or when no VAE is known). ``evaluator``: scores the EMA every
    ``train.eval_every`` steps (``dfm.evaluation.training``). ``writer``: the metrics backend, set once the
    run's outputs are open.
    """

    def __init__(
        self,
        cfg,
        engine: Engine,
        ema: EMA,
        loader,
        accum_steps: int,
        engine_state: checkpoint.EngineState,
        rank: int = 0,
        read_grad_norm: Callable[[], Tensor | None] | None = None,
        decoder=None,
        evaluator=None,
    ):
        self.cfg, self.engine, self.ema, self.loader = cfg, engine, ema, loader
        self.accum_steps, self.engine_state, self.rank = accum_steps, engine_state, rank
        self.read_grad_norm, self.decoder, self.evaluator = read_grad_norm, decoder, evaluator
        self.evaluates = evaluator is not None  # the same on every rank (they all join the EMA's gather)
        self.writer: MetricsWriter | None = None
        self.config_yaml = config_text(cfg)
        self.device = next(engine.module.parameters()).device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.objective = DFMObjective.from_config(cfg)
        self.sums = StepSums(self.objective.stages)
        self.flops_per_image = training_flops(model_config_from(cfg))
        self.device_name = device_name(self.device)
        self.generator = torch.Generator(self.device)  # reseeded for every micro-batch: seed_draws()
        self.state = TrainState()
        self.lr, self.ema_decay = train_lr(0, cfg.train), train_ema_decay(0, cfg.train)
        self.run_id = uuid.uuid4().hex  # a resume takes the id of the run it continues
        self.ckpt_root = cfg.run_dir / "checkpoints"
        self.progress = Progress(cfg.train.max_steps, 0, enabled=False)

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
        """EMA sample grid (a row per class, per-stage previews side by side) as a PNG (rank 0), decoded to
        images through the VAE for a latent run that has one."""
        ema = self.ema.module()  # a collective under ZeRO-3: the partitions are gathered to rank 0
        if self.rank != 0:
            return None
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)  # same noise every time: comparable grids
        y = class_rows(self.cfg.data.num_classes, self.cfg.sample.per_class, self.device)
        result = decode_result(sample_model(ema, self.cfg, y, generator=g), self.decoder)
        scale = grid_scale(result.x.shape[-1])
        grid = stage_preview_grid(result, rows=min(self.cfg.data.num_classes, 10), scale=scale)
        return save_png(grid, self.cfg.run_dir / "samples" / f"{self.state.step:07d}.png")

    def evaluate(self) -> dict[str, float]:
        """Score the EMA with ``evaluator`` (rank 0) and log the scalars (``eval/...``); see ``train.eval_every``."""
        ema = self.ema.module()  # collective under ZeRO-3, like write_samples
        if self.rank != 0 or self.evaluator is None:
            return {}
        tic = time.perf_counter()
        scalars = self.evaluator(ema)
        scalars["eval/seconds"] = time.perf_counter() - tic
        self.report(scalars)
        return scalars

    # -- the loop -------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next optimizer step (a Python number in the param groups: no sync)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr

    def train_step(self, data) -> Tensor:
        """One optimizer step over ``accum_steps`` micro-batches of ``data``, then the EMA; returns this step's
        sums (:class:`StepSums`) on device, with no host sync."""
        step = self.state.step
        self.set_lr(train_lr(step, self.cfg.train))
        sums = torch.zeros(self.sums.width, device=self.device)
        for micro in range(self.accum_steps):
            x, y = next(data)
            x = x.to(self.device, torch.float32, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # under bf16 the engine's forward runs in autocast (its torch_autocast section); the pyramid,
            # noising, targets and loss around it stay fp32
            terms, draw = self.objective.stage_losses(self.engine, x, y, generator=self.seed_draws(step, micro))
            loss = terms.sum()
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            sums[:-1] += torch.cat([loss.detach().view(1), terms.detach(), draw.mask.float().mean(0)])
        norm = self.read_grad_norm() if self.read_grad_norm is not None else None
        if norm is not None:
            sums[-1] += norm
        self.ema_decay = train_ema_decay(step, self.cfg.train)
        self.ema.update_(self.engine.module, self.ema_decay)
        self.state.step += 1
        return sums

    def interval_scalars(self, values: list[float], steps: int, seconds: float) -> dict[str, float]:
        """Everything logged for an interval of ``steps`` steps that took ``seconds``, keyed by tag."""
        scalars = self.sums.scalars(values, steps * self.accum_steps, steps)
        if self.read_grad_norm is None:
            del scalars["train/grad_norm"]
        images_per_s = steps * self.cfg.train.global_batch_size / seconds
        per_device = images_per_s / self.world_size
        scalars.update({
            "train/lr": self.lr,
            "train/ema_decay": self.ema_decay,
            "train/steps_per_s": steps / seconds,
            "train/images_per_s": images_per_s,
            "train/tflops_per_device": self.flops_per_image * per_device / 1e12,
            "train/peak_memory_gib": peak_memory_gib(self.device),
        })  # fmt: skip
        utilisation = mfu(self.flops_per_image, per_device, self.device_name)
        if utilisation is not None:  # a GPU with a known bf16 peak (dfm.flops)
            scalars["train/mfu"] = utilisation
        return scalars

    def log_metrics(self, sums: Tensor, steps: int, seconds: float) -> dict[str, float]:
        """Log the means of the last ``steps`` steps (one all-reduce and one host read, at log steps only).

        A non-finite loss stops the run here, before it can be saved (``dfm.checkpoint`` refuses to save
        non-finite weights too): the last checkpoints stay the good ones.
        """
        values = _all_reduce_mean(sums.clone()).tolist()
        scalars = self.interval_scalars(values, steps, seconds)
        loss = scalars["train/loss"]
        if not math.isfinite(loss):
            raise checkpoint.NonFiniteError(
                f"step {self.state.step}: the training loss is {loss}; stopping before anything is saved "
                f"(resume from the last checkpoint with a lower train.lr, or check the data)"
            )
        self.report(scalars, postfix={"loss": f"{loss:.4f}"})
        return scalars

    def report(self, scalars: dict[str, float], postfix: dict | None = None) -> None:
        """Scalars to the metrics backend and a plain line to the console (rank 0)."""
        if self.rank != 0:
            return
        if self.writer is not None:
            self.writer.write(scalars, self.state.step)
        self.progress.log(format_line(self.state.step, self.cfg.train.max_steps, scalars), postfix)

    def sample_evaluate_save(self, step: int) -> None:
        """The sample grid, evaluation and checkpoint due at ``step`` (each on its own interval)."""
        t = self.cfg.train
        if _due(step, t.sample_every, t.max_steps):
            self.write_samples()
        if self.evaluates and _due(step, t.eval_every, t.max_steps):
            self.evaluate()
        if _due(step, t.ckpt_every, t.max_steps):
            self.save()

    def fit(self) -> float | None:
        """Train until ``train.max_steps``; returns the last logged loss."""
        t = self.cfg.train
        data = iter(self.loader)
        sums = torch.zeros(self.sums.width, device=self.device)  # accumulated on device; read at log steps
        last, tic, logged_at = None, time.perf_counter(), self.state.step
        self.progress = Progress(t.max_steps, self.state.step, enabled=self.rank == 0)
        while self.state.step < t.max_steps:
            sums += self.train_step(data)
            self.progress.update()
            step = self.state.step
            if _due(step, t.log_every, t.max_steps):
                last = self.log_metrics(sums, step - logged_at, time.perf_counter() - tic)["train/loss"]
                sums.zero_()
                tic, logged_at = time.perf_counter(), step
            paused = time.perf_counter()
            self.sample_evaluate_save(step)
            tic += time.perf_counter() - paused  # the interval's steps/s count training time only
        self.progress.close()
        return last
