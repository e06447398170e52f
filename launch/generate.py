"""``dfm generate``: sample many images across ranks into ADM's ``.npz`` layout (for FID & co.), resumably.

One process:   dfm generate --ckpt runs/dfm-digits --num-samples 500 --out samples.npz
One node:      torchrun --nproc_per_node 8 launch/generate.py --ckpt runs/dfm-sit-xl-256 \\
                   --num-samples 50000 --batch-size 64 --out dfm-sit-xl-256.npz   (the store's VAE decodes)
               (or: deepspeed --num_gpus 8 launch/generate.py ...)
Imported:      dfm generate --ckpt imported/dfm-sit-xl-256 --vae stabilityai/sd-vae-ft-ema ...   (no store)
Sampling keys of the run config can be overridden, with or without their ``sample.`` prefix:
               cfg_scale=1.5 num_steps_per_scale=[40,10] stage_sampling_thresholds=[0.1] guidance_high=0.7
               mode=sde num_steps=250   (the SiT baseline's Euler-Maruyama sampler)

Index ``i`` of ``[0, N)`` gets its label and noise from ``(seed, i)`` alone, so the images do not depend
on the world size or the batch size. Finished batches land in ``<out>.parts/`` as they complete; running
the same command again after a crash (or after ``--max-batches``) produces only what is missing, at any
world size (on several nodes, ``<out>`` must be on a file system every rank sees). When every index
exists, rank 0 writes ``<out>`` (``arr_0`` uint8 N x H x W x 3, labels in ``arr_1`` and ``labels``) and
removes the parts (``--keep-parts`` keeps them); ``settings`` in the ``.npz`` records what made the
images. An existing ``<out>`` made with the same settings is left as it is; one made with other settings
(or recording none) is refused, naming the settings that differ, unless ``--force`` generates it again.
Latent models decode with the VAE their latent store recorded (``dfm prepare encode``), or the diffusers
``AutoencoderKL`` at ``--vae``: ``vae.decode(z / scaling_factor + shift_factor)`` with the store's
factors. Without a VAE a latent model is refused: an ``.npz`` of latent channels would score as images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from dfm.launch import options
from tqdm import tqdm

from dfm import distributed, generation
from dfm.config import ConfigError
from dfm.devices import resolve_device
from dfm.fast_sampling import sampler_mode
from dfm.files import FolderLock, LockedError
from dfm.precision import PRECISIONS, resolve_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dfm generate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run or imported directory, or exported .safetensors")
    p.add_argument("--config", help="run config (default: the one saved with the checkpoint, or <file>.yaml)")
    p.add_argument("--num-samples", type=int, default=50_000, help="N: indices [0, N) are generated")
    p.add_argument("--out", required=True, help="output .npz (shards go to <out>.parts/ until it is complete)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch on each rank")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: index i draws from (seed, i)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (sample.cfg_scale)")
    p.add_argument("--labels", choices=generation.LABEL_MODES, default="random",
                   help="random: uniform class per index (as ADM / DiT); balanced: class i %% num_classes")  # fmt: skip
    p.add_argument("--vae", help="AutoencoderKL (folder or hub name) decoding latent models (default: the store's)")
    p.add_argument("--decode-batch-size", type=int, default=32, help="images per VAE decode call")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--sampler", choices=("auto", "eager", "compile", "cudagraph"), default="auto",
                   help="staged-sampler execution (auto: CUDA graphs on CUDA, eager on CPU)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="model precision (auto: bf16 autocast on CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop each rank after this many batches (finish later with the same command)")  # fmt: skip
    p.add_argument("--keep-parts", action="store_true", help="keep <out>.parts/ after merging")
    p.add_argument("--force", action="store_true", help="generate again over an existing --out made otherwise")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides of sampling keys, e.g. cfg_scale=1.5")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.decode_batch_size < 1:
        p.error("--num-samples, --batch-size and --decode-batch-size must be >= 1")
    if args.max_batches is not None and args.max_batches < 0:
        p.error("--max-batches must be >= 0")
    return args


def sampling_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides of sampling keys (bare ``cfg_scale=2`` or ``sample.cfg_scale=2``; any
    other key is refused by name), and ``--cfg-scale``."""
    out = options.sampling_overrides(args.overrides)
    if args.cfg_scale is not None:
        out.append(f"sample.cfg_scale={args.cfg_scale}")
    return out


def _device(requested: str) -> torch.device:
    """``--device`` through the one decision of ``training_device``; ``cpu`` keeps every rank on the host."""
    resolve_device(requested)  # refused here, in one line, before any process group or model
    if requested == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # also gloo instead of nccl, and no GPU per rank needed
    from dfm.launch.engine import training_device

    return training_device()


def load(args: argparse.Namespace, device: torch.device):
    """(model on ``device``, run config, resolved checkpoint path, LatentDecoder or None); errors name what is wrong."""
    from dfm.pretrained import load_pretrained, pretrained_config, resolve_pretrained
    from dfm.vae import resolve_decoder

    ckpt = resolve_pretrained(args.ckpt)
    cfg = pretrained_config(ckpt, args.config, sampling_overrides(args))
    model = load_pretrained(ckpt, cfg=cfg, ema=False if args.raw else None)
    decoder, note = resolve_decoder(cfg, args.vae, device, batch_size=args.decode_batch_size)
    if cfg.data.kind == "latents" and decoder is None:
        raise ConfigError(f"{cfg.model} generates latents (data.kind=latents) and there is {note}: pass --vae")
    if note and distributed.rank() == 0:
        print(f"dfm generate: {note}")
    return model.to(device), cfg, ckpt, decoder


def manifest_settings(args: argparse.Namespace, cfg, ckpt: Path, precision: str, decoder=None) -> dict:
    """What makes two runs' images different: shards made under other settings must not be mixed."""
    sample = {k: v for k, v in asdict(cfg.sample).items() if k != "per_class"}
    return {
        "num_samples": args.num_samples,
        "seed": args.seed,
        "labels": args.labels,
        "checkpoint": str(Path(ckpt).resolve()),
        "weights": "raw" if args.raw else "ema",
        "model": cfg.model,
        "data": {k: getattr(cfg.data, k) for k in ("kind", "resolution", "channels", "num_classes")},
        "sample": sample,
        "steps_per_stage": cfg.steps_per_stage(),
        "thresholds": cfg.thresholds(),
        "vae": decoder.spec.to_dict() if decoder is not None else None,
        "precision": precision,
    }


def check_existing(out: Path, settings: dict) -> None:
    """Refuse an existing ``out`` that was not made with ``settings`` (naming the settings that differ):
    calling it done would hand another sample set to the evaluation."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory")
    try:
        recorded = generation.read_settings(out)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"--out {out} already exists and is not a readable .npz ({err}); pass --force") from None
    if recorded is None:
        raise ConfigError(f"--out {out} already exists and records no settings; pass --force to replace it")
    details = generation.settings_diff(recorded, generation.as_recorded(settings))
    if details:
        raise ConfigError(
            f"--out {out} already exists, made with other settings ({details}); pass --force to replace it, or "
            "choose another --out"
        )


def _open_parts(args, cfg, ckpt: Path, precision: str, decoder) -> FolderLock | None:
    """Rank 0 locks ``<out>.parts`` for the job and checks its settings; every rank stops on its error."""
    parts = generation.parts_dir(Path(args.out))
    held: list[FolderLock] = []

    def decide() -> None:
        # the lock first: two jobs started at once must not both pass the settings check and write the manifest
        held.append(FolderLock(parts, "dfm generate").acquire())
        generation.check_manifest(parts, manifest_settings(args, cfg, ckpt, precision, decoder))
        generation.clean_temporaries(parts)
        for bad, why in generation.discard_bad_shards(parts):
            print(f"dfm generate: redoing {bad.name} ({why})")

    try:
        distributed.agree(decide)
    except (ValueError, LockedError) as err:  # the settings differ, or another job holds the folder
        for lock in held:
            lock.release()
        raise ConfigError(str(err)) from None
    return held[0] if held else None


def _my_pieces(args, parts: Path, rank: int, world_size: int) -> tuple[list, int, int]:
    """(this rank's pieces, indices already done, pieces left in all); every rank computes the same plan."""
    done = generation.scan_shards(parts)
    pieces = generation.plan_pieces(generation.missing_ranges(done, args.num_samples), args.batch_size)
    distributed.barrier()  # every rank has listed the shards before any rank writes one: all hold the same plan
    mine = generation.rank_pieces(pieces, rank, world_size)
    if args.max_batches is not None:
        mine = mine[: args.max_batches]
    return mine, sum(b - a for a, b in done if a < args.num_samples), len(pieces)


def _sample_pieces(sampler, mine: list, parts: Path, rank: int, bar, pad_to: int) -> None:
    shown = bar.n
    for start, stop in mine:
        images, labels = sampler.images(range(start, stop), pad_to=pad_to)
        generation.write_shard(parts, start, images, labels)
        if rank == 0:  # rank 0's bar counts every rank's shards on disk: its rate is the whole job's images/s
            now = generation.count_done(parts)
            bar.update(now - shown)
            shown = now


def _merge(args, parts: Path, out: Path, done_before: int, elapsed: float, bar) -> Path | None:
    """Rank 0, after every rank's pieces: report, and merge the shards once all indices are there."""
    complete = generation.count_done(parts)
    bar.update(complete - bar.n)
    bar.close()
    made = complete - done_before
    if made:
        print(f"dfm generate: {made} images in {elapsed:.1f} s ({made / max(elapsed, 1e-9):.2f} img/s)")
    if complete < args.num_samples:
        print(f"dfm generate: {complete}/{args.num_samples} done in {parts}; run the same command to continue")
        return None
    generation.merge_shards(parts, out, args.num_samples)
    if not args.keep_parts:
        shutil.rmtree(parts)
    print(f"dfm generate: wrote {out} ({args.num_samples} images)")
    return out


def generate(args: argparse.Namespace) -> Path | None:
    """Run ``dfm generate`` on this rank; returns the merged ``.npz`` (rank 0, once complete) or None."""
    from dfm.launch.engine import setup_distributed

    device = _device(args.device)  # before the process group: it picks the backend
    try:  # a forced --sampler this device cannot run: refused now, not at the first batch
        sampler_mode(device, args.sampler)
    except RuntimeError as err:
        raise ConfigError(f"--sampler {args.sampler}: {err}") from None
    rank, world_size = setup_distributed()
    out = Path(args.out)
    parts = generation.parts_dir(out)
    precision = resolve_precision(args.precision, device)
    model, cfg, ckpt, decoder = load(args, device)
    if out.exists() and not args.force:  # every rank sees the same file: nobody starts work
        check_existing(out, manifest_settings(args, cfg, ckpt, precision, decoder))
        if rank == 0:
            print(f"dfm generate: {out} already exists, made with these settings; nothing to do")
        return out
    lock = _open_parts(args, cfg, ckpt, precision, decoder)
    try:
        mine, done_before, left = _my_pieces(args, parts, rank, world_size)
        sampler = generation.IndexSampler(
            model, cfg, seed=args.seed, labels=args.labels, decoder=decoder, sampler_mode=args.sampler,
            precision=precision,
        )  # fmt: skip
        todo = args.num_samples - done_before
        if rank == 0:
            print(
                f"dfm generate: {args.num_samples} samples of {cfg.model} ({cfg.sample.mode}, "
                f"NFE {sum(cfg.steps_per_stage()) if cfg.sample.mode == 'ode' else cfg.sample.num_steps}, "
                f"cfg {cfg.sample.cfg_scale}) on {world_size} rank(s), {device.type}, {precision}: "
                f"{done_before} exist, {todo} to go in {left} batches of <= {args.batch_size}"
            )
        bar = tqdm(
            total=args.num_samples, initial=done_before, unit="img", dynamic_ncols=True, disable=rank != 0 or not todo
        )
        tic = time.perf_counter()
        _sample_pieces(sampler, mine, parts, rank, bar, args.batch_size)
        distributed.barrier()
        if rank != 0:
            return None
        return _merge(args, parts, out, done_before, time.perf_counter() - tic, bar)
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    try:
        return generate(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"dfm generate: {err}")


if __name__ == "__main__":
    # Run as a script by torchrun or the `deepspeed` launcher: `torchrun --nproc_per_node 8 launch/generate.py ...`.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from dfm.launch.cli import run_command

    sys.exit(run_command("generate", sys.argv[1:]))
