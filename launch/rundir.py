"""The run folder ``<output_dir>/<exp_name>``: one process per run, never two runs mixed, resumed safely.

Rank 0 decides everything here before anything in the folder changes, and the other ranks follow its
decision (an error stops every rank together):

- a lock (``dfm.files.FolderLock``) held for the run's lifetime: a second ``dfm train`` on the same folder
  stops at once, naming the holder;
- a fresh run refuses a folder that already holds a run's outputs (checkpoints, TensorBoard events, sample
  grids) unless ``--resume`` continues it or ``--overwrite`` clears it (only once the new run is built);
  ``--resume`` of a folder with nothing to resume is refused rather than started at step 0;
- a resume takes the newest intact checkpoint (``dfm.checkpoint.find_resumable``: a corrupt one is rejected
  by name and the previous one used), and checks that the config builds the same model as the checkpoint's
  (naming every key that differs) before the folder's ``config.yaml`` is rewritten;
- the folder must be writable, checked at start rather than at the first save;
- nothing in the folder is written until the run has started (config loaded, engine built, checkpoint
  resumed): a refused or failed start leaves it byte for byte as it was, and removes it again if it had to
  create it. Then :func:`record_launch` appends to ``run.json`` what ``config.yaml`` cannot say: the command
  line, the git commit of the code, the world size, the absolute data path, the checkpoint resumed and the
  software versions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dfm import checkpoint, distributed
from dfm.config import Config, ConfigError, config_from_dict
from dfm.files import FolderLock, write_json_atomic

RUN_RECORD = "run.json"
OUTPUTS = ("checkpoints", "tb", "samples", "wandb", "eval", "config.yaml", RUN_RECORD, "stage_stats.json")
# Keys that define the model or the engine layout: a checkpoint cannot be resumed under other values.
MODEL_KEYS = ("model", "arch", "data.resolution", "data.channels", "data.num_classes", "dfm.stages_count",
              "dfm.normalize_stages", "dfm.stage_rms")  # fmt: skip


def _lookup(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values.get(part, {}) if isinstance(values, dict) else {}
    return values


def _flatten(prefix: str, value) -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(_flatten(f"{prefix}.{k}", v))
    return out


def check_resume_config(cfg: Config, ckpt_dir: Path) -> None:
    """Refuse to resume ``ckpt_dir`` with a config that builds another model, naming the differing keys."""
    saved_file = ckpt_dir / checkpoint.CONFIG_FILE
    try:
        saved_cfg = config_from_dict(yaml.safe_load(saved_file.read_text()))
    except (ConfigError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_file}: {' '.join(str(err).split())}") from None
    saved = saved_cfg.to_dict()
    saved["dfm"]["stages_count"] = saved_cfg.stages  # compare the resolved stage counts
    mine = cfg.to_dict()
    mine["dfm"]["stages_count"] = cfg.stages
    diffs = []
    for key in MODEL_KEYS:
        a, b = _flatten(key, _lookup(saved, key)), _flatten(key, _lookup(mine, key))
        diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume {ckpt_dir} with this config, which builds another model ({'; '.join(diffs)}); "
            f"use the run's own config ({saved_file}) or another --exp-name"
        )


def has_outputs(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in OUTPUTS)


def prepare(cfg: Config, resume: bool, ckpt: str | None, overwrite: bool) -> Path | None:
    """Rank 0's checks and choice of the checkpoint to resume (None: start at step 0); see the module docstring.

    Nothing is removed here: ``--overwrite`` clears the old outputs (:func:`clear_outputs`) only once the new
    run's engine is built, so a start refused on the way leaves the old run whole."""
    run_dir = cfg.run_dir
    if resume:
        if ckpt:
            found = Path(ckpt)
            checkpoint.verify(found)
            if not own_checkpoint(run_dir, found) and has_outputs(run_dir) and not overwrite:  # would mix two runs
                raise ConfigError(
                    f"--ckpt {found} is not a checkpoint of {run_dir}, which already holds a run: pass --overwrite "
                    "to replace that run, or another --exp-name"
                )
        else:
            found = checkpoint.find_resumable(run_dir / "checkpoints", report=print)  # verified
        if found is not None:
            check_resume_config(cfg, found)
        elif has_outputs(run_dir):
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint to resume; use --overwrite to start afresh")
        else:  # most often a misspelled exp_name or output_dir: starting at step 0 would hide it
            raise ConfigError(
                f"--resume: nothing to resume in {run_dir} (no checkpoints); check exp_name and output_dir, or "
                "drop --resume to start a new run"
            )
    else:
        found = None
        if has_outputs(run_dir) and not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run: add --resume to continue it, --overwrite to replace it, or pass "
                "another --exp-name"
            )
    check_writable(run_dir)
    return found


def own_checkpoint(run_dir: Path, ckpt: Path | None) -> bool:
    """Whether ``ckpt`` is one of ``run_dir``'s own checkpoints (a --ckpt may name another run's)."""
    return ckpt is not None and Path(ckpt).resolve().parent == (run_dir / "checkpoints").resolve()


def clear_outputs(run_dir: Path) -> None:
    """``--overwrite``, once the new run is built: remove the previous run's outputs (never other files).

    The outputs are first renamed into one hidden folder (a rename per output: a crash leaves a split run only
    between two renames, not part-way through deleting a checkpoint tree), then that folder is deleted."""
    trash = run_dir / f".overwritten-{os.getpid()}"
    trash.mkdir()
    for name in OUTPUTS:
        if (run_dir / name).exists() or (run_dir / name).is_symlink():
            os.replace(run_dir / name, trash / name)
    shutil.rmtree(trash)


def check_writable(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{run_dir} is not writable ({err.strerror}): checkpoints could not be saved") from None


def open_run(cfg: Config, resume: bool, ckpt: str | None, overwrite: bool):
    """Lock the run folder (rank 0) and :func:`prepare` it; returns ``(lock or None, checkpoint to resume)``."""
    held: list[FolderLock] = []

    def decide():
        try:
            held.append(FolderLock(cfg.run_dir, "training run").acquire())
        except OSError as err:  # the lock file is the first thing written: a folder we cannot write
            raise ConfigError(f"{cfg.run_dir} is not writable ({err.strerror or err}): nothing was started") from None
        return prepare(cfg, resume, ckpt, overwrite)

    try:
        found = distributed.agree(decide)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return (held[0] if held else None), found


def git_commit(path: str | Path) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``path`` (None outside one)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def launch_record(cfg: Config, world_size: int, **extra) -> dict:
    """What one start of ``dfm train`` ran: command, code, world size, data, versions (see :func:`record_launch`)."""
    import deepspeed
    import torch

    import dfm

    data = str(Path(cfg.data.data_dir).resolve()) if cfg.data.data_dir else None
    package = Path(dfm.__file__).resolve().parent  # resolved: a linked package view still names its checkout
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "code": {"package": str(package), **git_commit(package)},
        "world_size": world_size,
        "data": {"kind": cfg.data.kind, "data_dir": data},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
        },
        **extra,
    }


def record_launch(run_dir: Path, record: dict) -> Path:
    """Append ``record`` to ``<run>/run.json`` (``{"launches": [...]}``, one entry per start or resume)."""
    path = Path(run_dir) / RUN_RECORD
    launches = json.loads(path.read_text()).get("launches", []) if path.is_file() else []
    write_json_atomic(path, {"launches": [*launches, record]})
    return path


__all__ = [
    "check_resume_config",
    "check_writable",
    "clear_outputs",
    "git_commit",
    "has_outputs",
    "launch_record",
    "open_run",
    "prepare",
    "record_launch",
]
