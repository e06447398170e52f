"""The training loop: one loop for every scale, on a DeepSpeed-style engine.

The engine is anything with ``backward(loss)``, ``step()``, ``module`` and ``save_checkpoint`` (a
DeepSpeed engine in practice; ``dfm.launch.train`` builds it). The only device-to-host reads happen at
log intervals (loss), sample intervals and checkpoints; a plain step queues work and never waits.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dfm import checkpoint
from dfm.objective import DFMObjective
from dfm.visualize import class_rows, sample_model, save_png, stage_preview_grid


@dataclass
class TrainState:
    """What a resume needs besides the engine and EMA (saved per rank)."""

    step: int = 0
    loader: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """An fp32, frozen copy of the model holding the exponential moving average of its weights."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter, in one fused foreach call."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(torch.float32) for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def objective_from_config(cfg) -> DFMObjective:
    return DFMObjective(
        stages=cfg.stages,
        stage_weights=cfg.dfm.stage_weights,
        num_classes=cfg.data.num_classes,
        per_sample_stage=cfg.dfm.per_sample_stage,
        t_sampler=cfg.dfm.t_sampler,
        class_dropout=cfg.dfm.class_dropout,
    )


def rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible seed per rank for noise and time draws."""
    return seed * 100_003 + rank


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class Trainer:
    """Owns the run's moving parts; :meth:`fit` is the loop."""

    def __init__(self, cfg, engine, ema, loader, accum_steps: int, rank: int = 0, config_yaml: str = "", writer=None):
        self.cfg, self.engine, self.ema, self.loader = cfg, engine, ema, loader
        self.accum_steps, self.rank, self.config_yaml, self.writer = accum_steps, rank, config_yaml, writer
        self.device = next(engine.module.parameters()).device
        self.dtype = next(engine.module.parameters()).dtype
        self.objective = objective_from_config(cfg)
        self.generator = torch.Generator(self.device).manual_seed(rank_seed(cfg.seed, rank))
        self.state = TrainState()
        self.ckpt_root = cfg.run_dir / "checkpoints"

    # -- resume / checkpoint --------------------------------------------------------------------------
    def resume(self, ckpt_dir: Path | None = None) -> bool:
        """Continue from ``ckpt_dir`` (default: the latest checkpoint of the run); False if none."""
        ckpt_dir = ckpt_dir or checkpoint.latest_checkpoint(self.ckpt_root)
        if ckpt_dir is None:
            return False
        ckpt_dir = Path(ckpt_dir)
        self.engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        self.ema.load_state_dict(checkpoint.load_ema_weights(ckpt_dir))
        state = checkpoint.load_trainer_state(ckpt_dir, self.rank)
        if state is None:
            raise FileNotFoundError(f"{ckpt_dir} has no trainer state for rank {self.rank}")
        self.state = TrainState(**state)
        self.loader.load_state_dict(self.state.loader)
        checkpoint.set_rng_state(self.state.rng, self.generator)
        return True

    def save(self) -> Path:
        self.state.loader = self.loader.state_dict()
        self.state.rng = checkpoint.rng_state(self.generator)
        return checkpoint.save_checkpoint(
            self.ckpt_root,
            self.state.step,
            self.engine,
            self.ema,
            vars(self.state),
            self.config_yaml,
            keep=self.cfg.train.keep_ckpts,
        )

    def write_samples(self) -> Path | None:
        """EMA sample grid (a row per class, per-stage previews side by side) as a PNG (rank 0)."""
        if self.rank != 0:
            return None
        g = torch.Generator(self.device).manual_seed(self.cfg.seed)  # same noise every time: comparable grids
        y = class_rows(self.cfg.data.num_classes, self.cfg.sample.per_class, self.device)
        result = sample_model(self.ema, self.cfg, y, generator=g)
        grid = stage_preview_grid(result, rows=min(self.cfg.data.num_classes, 10), scale=2)
        return save_png(grid, self.cfg.run_dir / "samples" / f"{self.state.step:07d}.png")

    # -- the loop -------------------------------------------------------------------------------------
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
            for _ in range(self.accum_steps):
                x, y = next(data)
                x = x.to(self.device, self.dtype, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                loss, _ = self.objective(self.engine, x, y, generator=self.generator)
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
                loss_sum += loss.detach()
            update_ema(self.ema, self.engine.module, t_cfg.ema_decay)
            self.state.step += 1
            bar.update(1)
            step = self.state.step
            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                n = (step - logged_at) * self.accum_steps
                last_loss = _all_reduce_mean(loss_sum / n).item()  # the one host sync, at log steps only
                loss_sum.zero_()
                rate = (step - logged_at) / (time.perf_counter() - tic)
                tic, logged_at = time.perf_counter(), step
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", last_loss, step)
                    self.writer.add_scalar("train/steps_per_s", rate, step)
            if step % t_cfg.sample_every == 0 or step == t_cfg.max_steps:
                self.write_samples()
            if step % t_cfg.ckpt_every == 0 or step == t_cfg.max_steps:
                self.save()
        bar.close()
        return last_loss
