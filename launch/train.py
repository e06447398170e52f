"""``dfm train``: build model, data, DeepSpeed engine and EMA from a config, then run the loop.

Single process:          dfm train --config configs/dfm_digits.yaml
One node, 8 GPUs:        deepspeed --num_gpus 8 launch/train.py --config configs/dfm_sit_xl_256.yaml --data-dir DATA
                         (or torchrun --nproc_per_node 8 launch/train.py ...)
Many nodes:              deepspeed --hostfile launch/hostfile.example --master_addr HOST0 --master_port 29500 \
                             launch/train.py --config C --data-dir DATA    (see launch/scripts/)
Overrides:               dfm train --config C train.max_steps=200 train.lr=3e-4 train.zero_stage=2
Resume:                  add --resume (latest checkpoint) or --ckpt DIR; a different world size is fine
                         (a folder that holds a run needs --resume, or --overwrite to replace it once the
                         new run is built; --resume of a folder with nothing to resume is refused)
Fine-tune:               dfm train --ckpt IMPORTED_OR_EXPORTED --data-dir DATA --exp-name E [--config C]
                         starts at step 0 from the weights of a model without trainer state (a directory
                         written by dfm import, or an exported .safetensors), with its saved config as the
                         base config; add --resume to continue such a run once it has checkpoints

Before anything is built the config, the latent store (its shape and classes), the metrics backend and the
run folder are checked; the folder is written to only once the engine is built and any checkpoint resumed
(dfm.launch.rundir), so a refused or failed start leaves it as it was.
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
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run a folder holds (cleared once the new one is built)"
    )
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


def finetune_start(cfg: Config, init: Path, resume: bool, overwrite: bool = False) -> DFMSiT | None:
    """The model to fine-tune from ``init`` (loaded and checked against ``cfg`` before any work), or None when
    ``resume`` continues a fine-tuning run that already has checkpoints."""
    from dfm import checkpoint
    from dfm.pretrained import load_pretrained

    latest = checkpoint.latest_checkpoint(cfg.run_dir / "checkpoints")
    if latest is not None and not overwrite:
        if resume:
            return None
        raise ConfigError(
            f"{cfg.run_dir} already has checkpoints (latest {latest.name}): add --resume to continue it, --overwrite "
            "to fine-tune afresh in its place, or pass another --exp-name"
        )
    check_same_architecture(cfg, init)
    return load_pretrained(init, cfg=cfg, ema=True)  # the one set of weights an imported or exported model holds


def check_same_architecture(cfg: Config, init: Path) -> None:
    """Refuse to fine-tune ``init`` into a model of another architecture, naming the fields. Most changes would
    fail at loading (another shape), but some options change no parameter: ``arch.pos_embed: rope`` on weights
    trained with the sin-cos embedding would load and silently compute something else."""
    from dataclasses import fields

    from dfm.models import model_config_from
    from dfm.pretrained import pretrained_config

    source, mine = model_config_from(pretrained_config(init)), model_config_from(cfg)
    diffs = [f"{f.name}: {getattr(source, f.name)!r} -> {getattr(mine, f.name)!r}" for f in fields(source)
             if getattr(source, f.name) != getattr(mine, f.name)]  # fmt: skip
    if diffs:
        raise ConfigError(
            f"cannot fine-tune {init} into another architecture ({'; '.join(diffs)}): its weights were trained for "
            "its own; drop those overrides"
        )


def main(argv: list[str] | None = None) -> float | None:
    args, extra = parse_args(argv)
    init = finetune_source(args.ckpt)
    start = None
    try:
        cfg = resolve_config(args, extra, init)
        if init is not None:
            start = finetune_start(cfg, init, args.resume, args.overwrite)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm train: {err}")
    if start is not None:
        print(f"dfm train: fine-tuning the weights of {init} from step 0")
        return run(cfg, init=start, overwrite=args.overwrite)
    resume = args.resume or (bool(args.ckpt) and init is None)
    return run(cfg, resume=resume, ckpt=None if init else args.ckpt, overwrite=args.overwrite)


def check_before_work(cfg: Config, world_size: int) -> None:
    """What training needs beyond a valid config, checked before the run folder, the model or the engine: the
    batch layout at this world size, the latent store (one shard per rank; its shape and classes fill or must
    match ``data.*``), the metrics backend (``report_to``) and the evaluation files."""
    from dfm.launch.engine import batch_layout

    from dfm.reporting import check_report_to

    batch_layout(cfg, world_size)  # the batch sizes, before the run folder is locked or created
    if cfg.data.kind == "latents":
        from dfm.data import check_store_matches

        check_store_matches(cfg.data, world_size)
        cfg.data.data_dir = str(Path(cfg.data.data_dir).resolve())  # the saved config names the store wherever run
    check_report_to(cfg.report_to)
    for key in ("eval_inception_weights", "eval_ref"):
        path = getattr(cfg.train, key)
        if cfg.train.eval_every and path is not None and not Path(path).is_file():
            raise ConfigError(f"config key 'train.{key}': {path} does not exist")


def measure_stage_statistics(cfg: Config) -> dict | None:
    """``dfm.normalize_stages`` without ``dfm.stage_rms``: measure the data's per-stage statistics
    (``dfm.normalization``) and set ``dfm.stage_rms`` before the run folder is checked, so a resume compares the
    values a run was trained with; every rank measures the same data. Returns the statistics (None: nothing
    measured)."""
    if not cfg.dfm.normalize_stages or cfg.dfm.stage_rms is not None:
        return None
    from dfm.normalization import measure_stage_rms

    stats = measure_stage_rms(cfg.data, cfg.stages)
    cfg.dfm.stage_rms = stats["rms"]
    return stats


def build_trainer(cfg: Config, resume_from: Path | None = None, init: DFMSiT | None = None):
    """Model, EMA, optimizer, DeepSpeed engine, loader, sample decoder and evaluator for ``cfg`` (validated).

    ``resume_from``: the checkpoint the trainer will resume, so that the engine is built to read it (as a
    universal checkpoint when it was written at another world size). ``init``: a model (built for ``cfg``)
    whose weights training starts from instead of a fresh initialisation; the EMA starts from them too.
    Nothing is written to the run folder here (:func:`open_outputs` does that once the run has started).
    """
    from dfm.launch.checkpoint import DeepSpeedState, needs_universal, saved_layout
    from dfm.launch.engine import batch_layout, build_engine, setup_distributed, training_device

    from dfm.data import build_loader
    from dfm.evaluation.training import build_evaluator
    from dfm.models import DFMSiT
    from dfm.trainer import Trainer
    from dfm.vae import resolve_decoder

    rank, world_size = setup_distributed()
    measure_stage_statistics(cfg)  # done already when run() starts a run; here for callers that build directly
    micro, accum = batch_layout(cfg, world_size)
    device = training_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = (init.train() if init is not None else DFMSiT.from_config(cfg)).to(device)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    universal = resume_from is not None and needs_universal(
        resume_from, world_size, cfg.train.zero_stage, cfg.train.offload
    )
    if universal and rank == 0:
        saved_world, stage = saved_layout(resume_from)
        print(
            f"dfm train: {resume_from} was written by {saved_world} rank(s) at ZeRO {stage} and this run has "
            f"{world_size}: resuming through DeepSpeed's universal checkpoint ({resume_from / 'universal'}, "
            "converted once and kept)"
        )
    engine, ema, grad_norm = build_engine(cfg, model, world_size, load_universal=universal)
    loader = build_loader(cfg.data, micro, rank, world_size, cfg.seed, device=device, accum_steps=accum)
    decoder, notes = None, []
    if rank == 0:
        decoder, note = resolve_decoder(cfg, None, device)
        notes = [f"samples: {note}" + ("" if decoder else "; the grids show latent channels 0-2")] if note else []
    evaluator, note = build_evaluator(cfg, decoder, device) if rank == 0 else (None, "")
    notes += [note] if note else []
    state = DeepSpeedState(engine, cfg.train.zero_stage)
    trainer = Trainer(
        cfg, engine, ema, loader, accum, state, rank, read_grad_norm=grad_norm, decoder=decoder, evaluator=evaluator
    )
    evaluates = [evaluator is not None]  # rank 0 decides; every rank joins the evaluations' EMA gathers
    if world_size > 1:
        torch.distributed.broadcast_object_list(evaluates, src=0)
    trainer.evaluates, trainer.num_params, trainer.notes = evaluates[0], num_params, notes
    return trainer


def start_lines(cfg: Config, trainer, threads: tuple[int, str]) -> list[str]:
    """What a run says when it starts: model, scale, precision, batch, schedule, threads, data, outputs."""
    from dfm.launch.threads import local_world_size

    from dfm.flops import device_name

    t, micro = cfg.train, cfg.train.global_batch_size // (trainer.world_size * trainer.accum_steps)
    warmup = f", warmup {t.lr_warmup_steps}" if t.lr_warmup_steps else ""
    ema = f", warmup power {t.ema_warmup_power}" if t.ema_warmup_power else ""
    shape = f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution}, {cfg.data.num_classes} classes"
    return [
        f"{cfg.model}: {cfg.stages} stage(s), {trainer.num_params / 1e6:.2f} M parameters, "
        f"{trainer.flops_per_image / 1e9:.3g} GFLOP per training image",
        f"world size {trainer.world_size} ({local_world_size()} on this node), {trainer.device.type} "
        f"({device_name(trainer.device)}), precision {trainer.precision}, ZeRO {t.zero_stage}",
        f"effective batch {t.global_batch_size} = {micro} per micro-batch x {trainer.world_size} rank(s) x "
        f"{trainer.accum_steps} accumulation step(s); lr {t.lr:g} {t.lr_schedule}{warmup}; EMA {t.ema_decay}{ema}",
        f"threads: {threads[0]} per rank ({threads[1]})",
        f"data: {cfg.data.kind} {cfg.data.data_dir or ''} ({shape})".replace("  ", " "),
        *(
            [f"stages normalised by their data RMS {[round(r, 4) for r in cfg.dfm.stage_rms]}"]
            if cfg.dfm.normalize_stages
            else []
        ),  # fmt: skip
        *trainer.notes,
        f"outputs: {cfg.run_dir} (metrics: {cfg.report_to})",
    ]


def open_outputs(
    cfg: Config, trainer, resume_from: Path | None, threads: tuple[int, str], stats: dict | None = None
) -> None:
    """Rank 0, once the run has started: ``config.yaml``, the launch appended to ``run.json``, the measured
    stage statistics (``stage_stats.json``), the metrics backend, and the start-up lines."""
    from dfm.launch.rundir import launch_record, record_launch

    from dfm.files import write_json_atomic
    from dfm.normalization import STATS_FILE
    from dfm.reporting import open_writer

    save_config(cfg, cfg.run_dir / "config.yaml")
    if stats is not None:
        write_json_atomic(cfg.run_dir / STATS_FILE, stats)
    record = launch_record(
        cfg,
        trainer.world_size,
        resumed_from=str(Path(resume_from).resolve()) if resume_from else None,
        start_step=trainer.state.step,
        run_id=trainer.run_id,
        threads=threads[0],
    )
    record_launch(cfg.run_dir, record)
    trainer.writer = open_writer(cfg.report_to, cfg.run_dir, cfg.exp_name, trainer.run_id, cfg.to_dict())
    for line in start_lines(cfg, trainer, threads):
        print(f"dfm train: {line}", flush=True)


def run(
    cfg: Config, resume: bool = False, ckpt: str | None = None, init: DFMSiT | None = None, overwrite: bool = False
) -> float | None:
    """Train ``cfg`` (already validated), optionally resuming or starting from the weights of ``init``; the
    entry point tests call in-process. The data and settings are checked, then the run folder is locked and
    checked (``dfm.launch.rundir``); the folder is written to only once the engine is built and resumed."""
    from dfm.launch.engine import setup_distributed
    from dfm.launch.rundir import clear_outputs, open_run, own_checkpoint
    from dfm.launch.threads import set_threads

    from dfm import distributed

    rank, world_size = setup_distributed()
    threads = set_threads(cfg.train.threads)
    check_before_work(cfg, world_size)
    stats = measure_stage_statistics(cfg)
    lock, resume_from = open_run(cfg, resume, ckpt, overwrite)
    trainer = None
    try:
        trainer = build_trainer(cfg, resume_from, init=init)
        if resume_from is not None:
            trainer.resume(resume_from)
        if overwrite and not own_checkpoint(cfg.run_dir, resume_from):  # the new run is built: the old one goes
            distributed.agree(lambda: clear_outputs(cfg.run_dir))
        if rank == 0:
            lock.announce()  # the run has started: from here on the folder is its
            open_outputs(cfg, trainer, resume_from, threads, stats)
            if resume_from is not None:
                print(f"dfm train: resumed at step {trainer.state.step} from {resume_from}", flush=True)
        return fit(trainer)
    finally:
        if trainer is not None and trainer.writer is not None:
            trainer.writer.close()
        if lock is not None:
            lock.release()


def fit(trainer) -> float | None:
    """``trainer.fit()``; Ctrl-C ends it with one line saying where the run stands (the checkpoints are
    atomic, so an interrupt loses only the steps since the latest one)."""
    from dfm import checkpoint

    try:
        return trainer.fit()
    except KeyboardInterrupt:
        step, latest = trainer.state.step, checkpoint.latest_checkpoint(trainer.cfg.run_dir / "checkpoints")
        if latest is None:
            message = f"interrupted at step {step}, before the first checkpoint; start again with --overwrite"
            raise KeyboardInterrupt(message) from None
        raise KeyboardInterrupt(
            f"interrupted at step {step} (latest checkpoint: step {int(latest.name)}); resume with --resume"
        ) from None


if __name__ == "__main__":
    # Run as a script by the `deepspeed` launcher or torchrun: `deepspeed launch/train.py --config ...`.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from dfm.launch.cli import run_command

    sys.exit(run_command("train", sys.argv[1:]))
