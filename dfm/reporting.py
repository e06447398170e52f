"""Where a run's numbers go: TensorBoard, Weights & Biases or nowhere (``report_to``), plus the console.

Every log interval gives one dict of scalars keyed by their tag (``train/loss``, ``eval/fd``, ...; the list
is in the README). :func:`open_writer` returns the backend ``report_to`` names:

- ``tensorboard`` (the default): event files under ``<run>/tb``;
- ``wandb``: a Weights & Biases run named after ``exp_name`` whose id is the run's id, so a resumed run
  continues the same W&B run. wandb is optional and imported only here: asking for it without it installed
  is an error before any work (:func:`check_report_to`);
- ``none``: nothing beyond the console.

The console gets one plain line per log interval on stdout (:func:`format_line`, ``step 50/3000 | loss 1.061 |
...``), greppable in a log file. tqdm's progress bar is drawn only when stdout and stderr are terminals:
redirected to a file, a bar is a carriage-return frame per update (312 of them in a 300-step log).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from dfm.config import ConfigError


class MetricsWriter(Protocol):
    """A metrics backend: scalars by tag at a step."""

    def write(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Scalars as TensorBoard events in ``folder``."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # once per log interval: the events are on disk for a watching TensorBoard

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Scalars logged to a Weights & Biases run (``run_id`` is resumed if it exists)."""

    def __init__(self, wandb, run_dir: Path, name: str, run_id: str, config: dict):
        self.wandb = wandb
        # WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE (e.g. offline) are read by wandb itself
        self.run = wandb.init(name=name, id=run_id, resume="allow", dir=str(run_dir), config=config)

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class NullWriter:
    """``report_to: none``."""

    def write(self, scalars: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _import_wandb():
    try:
        import wandb
    except ImportError:
        return None
    return wandb


def check_report_to(report_to: str) -> None:
    """Refuse ``report_to: wandb`` when wandb does not import (before any work starts)."""
    if report_to == "wandb" and _import_wandb() is None:
        raise ConfigError(
            "config key 'report_to' is wandb but the wandb package is not installed: pip install wandb "
            "(or set report_to=tensorboard)"
        )


def open_writer(report_to: str, run_dir: Path, name: str, run_id: str, config: dict) -> MetricsWriter:
    """The backend ``report_to`` names (see the module docstring)."""
    if report_to == "tensorboard":
        return TensorBoardWriter(Path(run_dir) / "tb")
    if report_to == "wandb":
        check_report_to(report_to)
        return WandbWriter(_import_wandb(), Path(run_dir), name, run_id, config)
    if report_to == "none":
        return NullWriter()
    raise ValueError(f"report_to must be 'tensorboard', 'wandb' or 'none', got {report_to!r}")


def peak_memory_gib(device) -> float:
    """Peak memory since the last call, GiB: the CUDA caching allocator's peak of allocated tensors (reset
    here, so each log interval reports its own), or the process's peak resident set on the host (a
    high-water mark since the start). Neither reads anything from the device."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- the console --------------------------------------------------------------------------------------------

# Short names of the training tags in the plain line; other tags (eval/...) are shown in full.
SHORT = {
    "train/steps_per_s": "steps/s",
    "train/images_per_s": "img/s",
    "train/tflops_per_device": "TFLOP/s",
    "train/peak_memory_gib": "mem_GiB",
}


def _number(value: float) -> str:
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4g}"


def _name(tag: str) -> str:
    return SHORT.get(tag) or (tag.split("/", 1)[1] if tag.startswith("train/") else tag)


def format_line(step: int, max_steps: int, scalars: dict[str, float]) -> str:
    """``step 50/3000 | loss 1.061 | loss_stage0 0.98 | ...``: one greppable line for a log interval, the
    scalars in their order."""
    return " | ".join([f"step {step}/{max_steps}", *(f"{_name(tag)} {_number(v)}" for tag, v in scalars.items())])


class Progress:
    """The console side of the loop (rank 0): a plain line per log interval on stdout, and a tqdm bar on stderr
    only when both are terminals (``dfm train ... > log 2>&1`` gets lines only)."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool | None = None):
        self.enabled = enabled
        if bar is None:
            bar = sys.stdout.isatty() and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step") if enabled and bar else None

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, line: str, postfix: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            print(line, flush=True)
            return
        self.bar.write(line, file=sys.stdout)  # above the bar, which is redrawn below it
        if postfix:
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = [
    "MetricsWriter",
    "NullWriter",
    "Progress",
    "TensorBoardWriter",
    "WandbWriter",
    "check_report_to",
    "format_line",
    "open_writer",
    "peak_memory_gib",
]
