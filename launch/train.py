"""``dfm train``: build model, data, DeepSpeed engine and EMA from a config, then run the loop.

Single process:          dfm train --config configs/dfm_digits.yaml
One node, 8 GPUs:        deepspeed --num_gpus 8 launch/train.py --config configs/dfm_sit_xl_256.yaml --data-dir DATA
                         (or torchrun --nproc_per_node 8 launch/train.py ...)
Many nodes:              deepspeed --hostfile launch/hostfile.example --master_addr HOST0 --master_port 29500 \
                             launch/train.py --config C --data-dir DATA    (see launch/scripts/)
Overrides:               dfm train --config C train.max_steps=200 train.lr=3e-4 train.zero_stage=2
Resume:                  add --resume (latest checkpoint) or --ckpt DIR; a different world size is fine
Fine-tune:               dfm train --ckpt IMPORTED_OR_EXPORTED --data-dir DATA --exp-name E [--config C]
                         starts at step 0 from the weights of a model without trainer state (a directory
                         written by dfm import, or an exported .safetensors), with its saved config as the
                         base config; add --resume to continue such a run once it has checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfm.config import Config, ConfigError, load_config, save_config

if TYPE_CHECKING:
    from dfm.models import DFMSiT


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="dfm train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("--data-dir", help="prepared latent store (sets data.kind=latents, data.data_dir)")
    p.add_argument("--model", help="model name, e.g. DFM-SiT-XL/2 or SiT-B/2")
    p.add_argument("--exp-name", help="run name: outputs go to <output_dir>/<exp_name>")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest intact checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear a run folder that already holds a run, and start")
    p.add_argument("--ckpt", help="resume from this checkpoint directory, or fine-tune from an imported/exported model")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=500")
    return p.parse_known_args(argv)


def finetune_source(ckpt: str | None) -> Path | None:
    """``--ckpt`` when it names a model to start from rather than a run to resume: a directory with weights and
    a config but no checkpoint manifest (``dfm import``), or an exported ``.safetensors``."""
    if not ckpt:
        return None
    from dfm import checkpoint

    path = Path(ckpt)
    if path.is_dir():
        resumable = (path / checkpoint.MANIFEST).is_file()  # what every save writes last
        return path if (path / checkpoint.EMA_FILE).is_file() and not resumable else None
    return path if path.suffix == ".safetensors" and path.is_file() else None


def _saved_config_file(weights: Path) -> Path:
    found = weights / "config.yaml" if weights.is_dir() else weights.with_suffix(".yaml")
    if not found.is_file():
        raise ConfigError(f"no config.yaml beside {weights}; pass --config")
    return found


def resolve_config(args: argparse.Namespace, extra: list[str], init: Path | None = None) -> Config:
    """The run config: ``--config`` (or, when fine-tuning from ``init``, the config saved with it) <- flags."""
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown flag(s) {unknown}; config keys are set as key=value")
    overrides = list(args.overrides) + [a for a in extra if "=" in a]
    flags = []  # values quoted (JSON strings are YAML strings): --exp-name 0001 or off stays a name
    if args.model:
        flags.append(f"model={json.dumps(args.model)}")
    if args.exp_name:
        flags.append(f"exp_name={json.dumps(args.exp_name)}")
    if args.data_dir:
        flags += ["data.kind=latents", f"data.data_dir={json.dumps(str(args.data_dir))}"]
    base = args.config if args.config or init is None else _saved_config_file(init)
    return load_config(base, flags + overrides)


def finetune_start(cfg: Config, init: Path, resume: bool) -> DFMSiT | None:
    """The model to fine-tune from ``init`` (loaded and checked against ``cfg`` before any work), or None when
    ``resume`` continues a fine-tuning run that already has checkpoints."""
    from dfm import checkpoint
    from dfm.pretrained import load_pretrained

    latest = checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints")
    if latest is not None:
        if resume:
            return None
        raise ConfigError(
            f"{cfg.run_dir} already has checkpoints (latest {latest.name}): add --resume to continue it, or pass "
            "another --exp-name to fine-tune afresh"
        )
    return load_pretrained(init, cfg=cfg, ema=True)  # the one set of weights an imported or exported model holds


def main(argv: list[str] | None = None) -> float | None:
    args, extra = parse_args(argv)
    init = finetune_source(args.ckpt)
    start = None
    try:
        cfg = resolve_config(args, extra, init)
        if init is not None:
            start = finetune_start(cfg, init, args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm train: {err}")
    if start is not None:
        print(f"dfm train: fine-tuning the weights of {init} from step 0")
        return run(cfg, init=start, overwrite=args.overwrite)
    resume = args.resume or (bool(args.ckpt) and init is None)
    return run(cfg, resume=resume, ckpt=None if init else args.ckpt, overwrite=args.overwrite)


def build_trainer(cfg: Config, resume_from: Path | None = None, init: DFMSiT | None = None):
    """Model, EMA, optimizer, DeepSpeed engine, loader and logger for ``cfg`` (already validated).

    ``resume_from``: the checkpoint the trainer will resume, so that the engine is built to read it (as a
    universal checkpoint when it was written at another world size). ``init``: a model (built for ``cfg``)
    whose weights training starts from instead of a fresh initialisation; the EMA starts from them too.
    """
    from dfm.launch.checkpoint import DeepSpeedState, needs_universal
    from dfm.launch.engine import batch_layout, build_engine, setup_distributed, training_device

    from dfm.data import build_loader
    from dfm.models import DFMSiT
    from dfm.train import Trainer

    rank, world_size = setup_distributed()
    micro, accum = batch_layout(cfg, world_size)
    device = training_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = (init.train() if init is not None else DFMSiT.from_config(cfg)).to(device)
    universal = resume_from is not None and needs_universal(
        resume_from, world_size, cfg.train.zero_stage, cfg.train.offload
    )
    engine, ema = build_engine(cfg, model, world_size, load_universal=universal)
    loader = build_loader(cfg.data, micro, rank, world_size, cfg.seed, device=device, accum_steps=accum)

    config_yaml, writer = "", None
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        config_yaml = (cfg.run_dir / "config.yaml").read_text()
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.run_dir / "tb"))
    state = DeepSpeedState(engine, cfg.train.zero_stage)
    return Trainer(cfg, engine, ema, loader, accum, state, rank=rank, config_yaml=config_yaml, writer=writer)


def run(
    cfg: Config, resume: bool = False, ckpt: str | None = None, init: DFMSiT | None = None, overwrite: bool = False
) -> float | None:
    """Train ``cfg`` (already validated), optionally resuming or starting from the weights of ``init``; the
    entry point tests call in-process. The run folder is locked and checked first (``dfm.launch.rundir``)."""
    from dfm.launch.engine import setup_distributed
    from dfm.launch.rundir import open_run

    rank, _ = setup_distributed()
    lock, resume_from = open_run(cfg, resume, ckpt, overwrite)
    try:
        trainer = build_trainer(cfg, resume_from, init=init)
        if resume_from is not None:
            trainer.resume(resume_from)
        if rank == 0 and resume:
            found = (
                f"resumed at step {trainer.state.step} from {resume_from}" if resume_from else "no checkpoint, starting"
            )
            print(f"dfm train: {found}")
        loss = trainer.fit()
        if trainer.writer is not None:
            trainer.writer.close()
        return loss
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    # Run as a script by the `deepspeed` launcher or torchrun: `deepspeed launch/train.py --config ...`.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from dfm.launch.cli import run_command

    sys.exit(run_command("train", sys.argv[1:]))
