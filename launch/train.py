"""``dfm train``: build model, data, DeepSpeed engine and EMA from a config, then run the loop.

Single process:          dfm train --config configs/dfm_digits.yaml
One node, 8 GPUs:        deepspeed --num_gpus 8 launch/train.py --config configs/dfm_sit_xl_256.yaml --data-dir DATA
                         (or torchrun --nproc_per_node 8 launch/train.py ...)
Many nodes:              deepspeed --hostfile launch/hostfile.example --master_addr HOST0 --master_port 29500 \
                             launch/train.py --config C --data-dir DATA    (see launch/scripts/)
Overrides:               dfm train --config C train.max_steps=200 train.lr=3e-4 train.zero_stage=2
Resume:                  add --resume (latest checkpoint) or --ckpt DIR; a different world size is fine
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dfm.config import Config, ConfigError, load_config, save_config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="dfm train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    p.add_argument("--data-dir", help="prepared latent store (sets data.kind=latents, data.data_dir)")
    p.add_argument("--model", help="model name, e.g. DFM-SiT-XL/2 or SiT-B/2")
    p.add_argument("--exp-name", help="run name: outputs go to <output_dir>/<exp_name>")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--ckpt", help="resume from this checkpoint directory instead of the latest")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=500")
    return p.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, extra: list[str]) -> Config:
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown flag(s) {unknown}; config keys are set as key=value")
    overrides = list(args.overrides) + [a for a in extra if "=" in a]
    flags = []
    if args.model:
        flags.append(f"model={args.model}")
    if args.exp_name:
        flags.append(f"exp_name={args.exp_name}")
    if args.data_dir:
        flags += ["data.kind=latents", f"data.data_dir={args.data_dir}"]
    return load_config(args.config, flags + overrides)


def main(argv: list[str] | None = None) -> float | None:
    args, extra = parse_args(argv)
    try:
        cfg = resolve_config(args, extra)
    except ConfigError as err:
        sys.exit(f"dfm train: {err}")
    return run(cfg, resume=args.resume or bool(args.ckpt), ckpt=args.ckpt)


def build_trainer(cfg: Config, resume_from: Path | None = None):
    """Model, EMA, optimizer, DeepSpeed engine, loader and logger for ``cfg`` (already validated).

    ``resume_from``: the checkpoint the trainer will resume, so that the engine is built to read it (as a
    universal checkpoint when it was written at another world size).
    """
    from dfm.launch.engine import batch_layout, build_engine, setup_distributed, training_device

    from dfm import checkpoint
    from dfm.data import build_loader
    from dfm.models import DFMSiT
    from dfm.train import Trainer

    rank, world_size = setup_distributed()
    micro, accum = batch_layout(cfg, world_size)
    device = training_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = DFMSiT.from_config(cfg).to(device)
    universal = resume_from is not None and checkpoint.needs_universal(resume_from, world_size, cfg.train.zero_stage)
    engine, ema = build_engine(cfg, model, world_size, load_universal=universal)
    loader = build_loader(cfg.data, micro, rank, world_size, cfg.seed, device=device, accum_steps=accum)

    config_yaml, writer = "", None
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        config_yaml = (cfg.run_dir / "config.yaml").read_text()
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.run_dir / "tb"))
    return Trainer(cfg, engine, ema, loader, accum, rank=rank, config_yaml=config_yaml, writer=writer)


def run(cfg: Config, resume: bool = False, ckpt: str | None = None) -> float | None:
    """Train ``cfg`` (already validated), optionally resuming; the entry point tests call in-process."""
    from dfm import checkpoint

    resume_from = None
    if resume:
        resume_from = Path(ckpt) if ckpt else checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints")
    trainer = build_trainer(cfg, resume_from)
    if resume:
        found = resume_from is not None and trainer.resume(resume_from)
        if trainer.rank == 0:
            print(f"dfm train: resumed at step {trainer.state.step}" if found else "dfm train: no checkpoint, starting")
    loss = trainer.fit()
    if trainer.writer is not None:
        trainer.writer.close()
    return loss


if __name__ == "__main__":
    # Run as a script by the `deepspeed` launcher or torchrun: `deepspeed launch/train.py --config ...`.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
