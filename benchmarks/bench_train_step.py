"""The training step ``dfm train`` runs, against a plain reference step, on 32x32x4 latents (256 px SD-VAE).

``pytest benchmarks/bench_train_step.py --benchmark-enable --benchmark-json=train_step.json``, then
``python benchmarks/render.py train_step.json``. Providers, each on the same model, initial weights, batch
and optimizer settings (AdamW lr 1e-4, clipping 1.0, EMA 0.9999):

- ``reference``: the plain step of the authors' kind of code, written out below: the eager model,
  ``torch.optim.AdamW(foreach=True)``, ``torch.nn.utils.clip_grad_norm_``, the per-parameter EMA update of
  DiT/SiT (``ema.mul_(d).add_(p, alpha=1 - d)``), fp32 on CPU and bf16 autocast on CUDA.
- ``engine``: ``Trainer.train_step`` on the DeepSpeed engine and EMA that ``dfm.launch.train.build_trainer``
  makes from a run config (``dfm train``'s own path), ZeRO 0, one rank, in the reference's precision.
- ``engine+compile``: the same with ``train.compile=true``; its first step (the compile) is timed apart.
- ``engine+checkpointing``: the engine with ``train.activation_checkpointing=1`` (every block recomputed in
  backward): the recompute's cost as a time ratio against ``engine``, the memory it saves as a peak.

Reported per provider: seconds per step (the median), images/s, peak memory, and on CUDA TFLOP/s and MFU
against the card's bf16 peak (``dfm.flops``). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU, where torch keeps no allocator statistics, it is the growth of the resident set of a fresh process
(``python benchmarks/bench_train_step.py --peak MODEL PROVIDER BATCH``) from after its imports to the end of
three steps: the model, optimizer state, EMA and one step's activations, as training holds them.

Cases: ``DFM-SiT-B/8`` (16 tokens: the optimizer, clipping and EMA over 132 M parameters dominate) and
``DFM-SiT-B/2`` (256 tokens: the matmuls dominate). ``DFM_BENCH_MODELS`` (comma list) replaces them, e.g.
``DFM-SiT-XL/2`` for the recipe's model. ``DFM_BENCH_BATCH`` / ``DFM_BENCH_ROUNDS`` override the batch and the
timed rounds (CUDA: 64 and 20; CPU: 8 and 3); ``DFM_BENCH_BATCH=auto`` (CUDA) takes the largest power of two
from 32 up at which the reference step runs, found once per model by doubling until the card runs out of
memory. The engine providers need DeepSpeed and are skipped without it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, also when run as a script
from conftest import DEVICE, HAS_CUDA, synchronize  # noqa: E402

from dfm import flops  # noqa: E402
from dfm.config import load_config  # noqa: E402
from dfm.models import build_model  # noqa: E402
from dfm.objective import DFMObjective  # noqa: E402
from dfm.precision import autocast, resolve_precision  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = os.environ.get("DFM_BENCH_MODELS", "DFM-SiT-B/8,DFM-SiT-B/2").split(",")
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
PROVIDERS = ["reference", pytest.param("engine", marks=NEEDS_DEEPSPEED),
             pytest.param("engine+compile", marks=NEEDS_DEEPSPEED),
             pytest.param("engine+checkpointing", marks=NEEDS_DEEPSPEED)]  # fmt: skip
BATCH = os.environ.get("DFM_BENCH_BATCH", "64" if HAS_CUDA else "8")  # a number, or "auto" (CUDA)
ROUNDS = int(os.environ.get("DFM_BENCH_ROUNDS", 20 if HAS_CUDA else 3))
LATENT = (4, 32, 32)  # SD-VAE latents of 256 px images
CLASSES = 1000
LR, CLIP, EMA_DECAY = 1e-4, 1.0, 0.9999


def batch(device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(size, *LATENT, generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    return x.to(device), y.to(device)


@functools.cache
def batch_size(model_name: str) -> int:
    """``DFM_BENCH_BATCH``, or with ``auto`` the largest power of two (from 32) whose reference step fits."""
    if BATCH != "auto":
        return int(BATCH)
    if not HAS_CUDA:
        return 8
    step_on = reference_setup(model_name)[0]  # one model for the whole search: an XL build takes seconds
    fits, size = 0, 32
    while True:
        try:
            step_on(*batch(DEVICE, size))
            synchronize()
        except torch.OutOfMemoryError:
            break
        fits, size = size, 2 * size
    del step_on
    torch.cuda.empty_cache()
    if not fits:
        raise RuntimeError(f"{model_name}: not even batch 32 fits on {torch.cuda.get_device_name()}")
    if importlib.util.find_spec("deepspeed") is not None and not _engine_fits(model_name, fits):
        fits //= 2  # both providers run one batch, so that their times compare
    return fits


def _engine_fits(model_name: str, size: int) -> bool:
    """Whether the engine's step also runs at ``size`` (its buffers differ from the reference's)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            step = engine_step(model_name, size, False, Path(tmp))[0]
            step()
            synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        step = None
        torch.cuda.empty_cache()


# -- reference: the plain step ---------------------------------------------------------------------------


def reference_step(model_name: str, size: int):
    """A plain training step: what ``engine`` must beat. Returns ``(step, model)``."""
    step_on, model = reference_setup(model_name)
    x, y = batch(DEVICE, size)
    return (lambda: step_on(x, y)), model


def reference_setup(model_name: str):
    """The reference's model, EMA and optimizer; returns ``(step_on(x, y), model)``."""
    torch.manual_seed(0)
    model = build_model(model_name, input_size=LATENT[1], num_classes=CLASSES).to(DEVICE)
    ema = copy.deepcopy(model).requires_grad_(False)  # one host initialisation: an XL/2's takes seconds
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    objective = DFMObjective(stages=model.stages, num_classes=CLASSES)
    generator = torch.Generator(DEVICE).manual_seed(2)

    def step_on(x, y):
        with autocast(DEVICE):
            loss = objective.stage_losses(model, x, y, generator=generator)[0].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.mul_(EMA_DECAY).add_(p, alpha=1 - EMA_DECAY)
        return loss.detach()

    return step_on, model


# -- engine: the step dfm train runs ---------------------------------------------------------------------


def latent_store(root: Path) -> Path:
    """A small store of 32x32x4 moments, so that the run config is the one an ImageNet run uses."""
    from dfm.data.store import write_store

    rng = np.random.default_rng(0)
    moments = np.concatenate([rng.standard_normal((64, 4, 32, 32)), np.full((64, 4, 32, 32), 0.1)], axis=1)
    return write_store(root, moments.astype(np.float16), rng.integers(0, CLASSES, 64), num_classes=CLASSES)


def engine_step(model_name: str, size: int, compiled: bool, workdir: Path, checkpointing: int = 0):
    """``Trainer.train_step`` on the engine ``build_trainer`` makes; returns ``(step, model)``."""
    from dfm.launch.train import build_trainer

    overrides = [
        f"model={model_name}",
        f"data.data_dir={latent_store(workdir / 'store')}",
        f"output_dir={workdir}",
        f"train.global_batch_size={size}",
        f"train.lr={LR}",
        f"train.grad_clip={CLIP}",
        f"train.ema_decay={EMA_DECAY}",
        f"train.compile={str(compiled).lower()}",
        f"train.activation_checkpointing={checkpointing}",
        "train.zero_stage=0",  # one rank: the recipe's ZeRO 2 would only add partition bookkeeping
        # the reference's precision on every device: bf16 autocast on CUDA (the recipe's), fp32 on CPU. The
        # recipe's explicit bf16 on a CPU with AVX512-BF16 made the engine's matmuls 4x faster than the
        # reference's fp32 ones (measured on the 2-core EPYC): a precision gap, not a faster step.
        "train.precision=auto",
        "data.num_workers=0",
    ]
    torch.manual_seed(0)
    trainer = build_trainer(load_config(ROOT / "configs" / "dfm_sit_xl_256.yaml", overrides))
    x, y = batch(DEVICE, size)

    def data():
        while True:
            yield x, y

    stream = data()
    return (lambda: trainer.train_step(stream)), trainer.engine.module


def make_step(model_name: str, provider: str, size: int, workdir: Path):
    if provider == "reference":
        return reference_step(model_name, size)
    return engine_step(model_name, size, provider == "engine+compile", workdir,
                       checkpointing=1 if provider == "engine+checkpointing" else 0)  # fmt: skip


# -- peak memory -----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_here(model_name: str, provider: str, size: int) -> float:
    """MB: the growth of this (fresh) process's resident set over building the provider and three steps."""
    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401  (every provider's process holds the same imports before the baseline)

    before = _rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        step, _ = make_step(model_name, provider, size, Path(tmp))
        for _ in range(3):
            step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return (peak - before) / 2**20


def peak_memory(model_name: str, provider: str, size: int) -> float:
    """MB of peak memory of ``provider``'s training (see the module docstring)."""
    if HAS_CUDA:
        return torch.cuda.max_memory_allocated() / 2**20
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, __file__, "--peak", model_name, provider, str(size)],
        capture_output=True, text=True, env=env, timeout=900, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_mb"]


# -- the benchmark ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_name", MODELS)
def test_train_step(benchmark, tmp_path, model_name, provider):
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    size = batch_size(model_name)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()  # after the batch search, which ran at larger sizes
    step, model = make_step(model_name, provider, size, tmp_path)

    def timed():
        step()
        synchronize()

    start = time.perf_counter()
    timed()  # compiles the forward and backward graphs under engine+compile; lazy optimizer state
    first = time.perf_counter() - start
    timed()  # one more untimed step: allocator and autotuning caches settle
    benchmark.group = f"train_step {model_name} batch={size} {'x'.join(map(str, LATENT))}"
    benchmark.extra_info.update(provider=provider, batch=size, first_call_s=round(first, 3))
    benchmark.extra_info.update(device=flops.device_name(DEVICE), torch=torch.__version__)
    benchmark.extra_info["precision"] = resolve_precision("auto", DEVICE)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran as a smoke test
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["s_per_step"] = round(median, 4)
    benchmark.extra_info["images_per_s"] = round(size / median, 2)
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory(model_name, provider, size), 1)
    if HAS_CUDA:
        achieved = flops.training_flops(model.config) * size / median
        benchmark.extra_info["tflops"] = round(achieved / 1e12, 1)
        utilisation = flops.mfu(flops.training_flops(model.config), size / median, flops.device_name(DEVICE))
        if utilisation is not None:
            benchmark.extra_info["mfu"] = round(utilisation, 3)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        print(json.dumps({"peak_mem_mb": peak_memory_here(sys.argv[2], sys.argv[3], int(sys.argv[4]))}))
    else:
        sys.exit("usage: python benchmarks/bench_train_step.py --peak MODEL PROVIDER BATCH")
