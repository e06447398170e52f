"""Training-step throughput, eager vs compiled, for DFM-SiT-S/2 and DFM-SiT-B/2 on 32x32x4 latents.

``pytest benchmarks/bench_train_step.py --benchmark-enable --benchmark-json=train_step.json``, then
``python benchmarks/render.py train_step.json``. One step is the full training step: pyramid split,
noising, forward (bf16 autocast on CUDA, fp32 on CPU), masked loss, backward, gradient clipping and
AdamW (``dfm.compile.make_optimizer``). ``compile`` compiles each transformer block
(``dfm.compile.compile_model``); its first step, which compiles the forward and backward graphs, is
timed separately (``first_call_s``) from the steady state. ``extra_info`` holds images/s and, on CUDA,
achieved TFLOP/s and MFU against the card's bf16 peak (``dfm.flops``).

``test_optimizer_step`` times the AdamW implementations alone on the B/2 parameters (apex on CUDA
when installed), which is the measurement behind ``dfm.compile.APEX_FASTER``.

Sizes: ``DFM_BENCH_BATCH`` and ``DFM_BENCH_ROUNDS`` override the batch and the timed rounds (CUDA: 64
and 20, CPU: 2 and 3, where a B/2 step takes seconds).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from dfm import compile as dfm_compile
from dfm import flops
from dfm.compile import autocast, compile_model, make_optimizer
from dfm.models import build_model
from dfm.objective import DFMObjective

MODELS = ["DFM-SiT-S/2", "DFM-SiT-B/2"]
BATCH = int(os.environ.get("DFM_BENCH_BATCH", 64 if HAS_CUDA else 2))
ROUNDS = int(os.environ.get("DFM_BENCH_ROUNDS", 20 if HAS_CUDA else 3))
LATENT = (4, 32, 32)  # SD-VAE latents of 256 px images


def _record(benchmark, first_call_s: float, images: int | None = None, flops_per_image: int | None = None) -> None:
    """Images/s (and TFLOP/s, MFU on CUDA) from the steady-state median into ``extra_info``."""
    benchmark.extra_info["first_call_s"] = round(first_call_s, 3)
    benchmark.extra_info["device"] = flops.device_name(DEVICE)
    benchmark.extra_info["torch"] = torch.__version__
    if benchmark.stats is None or images is None:  # --benchmark-disable: ran once as a smoke test
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = round(images / median, 2)
    if flops_per_image is not None and HAS_CUDA:
        achieved = flops_per_image * images / median
        benchmark.extra_info["tflops"] = round(achieved / 1e12, 1)
        utilisation = flops.mfu(flops_per_image, images / median, flops.device_name(DEVICE))
        if utilisation is not None:
            benchmark.extra_info["mfu"] = round(utilisation, 3)


@pytest.mark.parametrize("provider", ["eager", "compile"])
@pytest.mark.parametrize("model_name", MODELS)
def test_train_step(benchmark, model_name, provider):
    torch.manual_seed(0)
    model = build_model(model_name, input_size=LATENT[1], num_classes=1000).to(DEVICE)
    if provider == "compile":
        compile_model(model, scope="blocks")
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    objective = DFMObjective(stages=model.stages, num_classes=1000)
    x = torch.randn(BATCH, *LATENT, device=DEVICE)
    y = torch.randint(0, 1000, (BATCH,), device=DEVICE)

    def step():
        with autocast(DEVICE):
            loss, _ = objective(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()

    start = time.perf_counter()
    step()  # compiles forward and backward graphs under "compile"
    first = time.perf_counter() - start
    step()  # one more untimed step: allocator and autotuning caches settle
    benchmark.group = f"train_step {model_name} batch={BATCH} {'x'.join(map(str, LATENT))}"
    benchmark.extra_info.update(provider=provider, batch=BATCH, precision=dfm_compile.default_precision(DEVICE))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    _record(benchmark, first, BATCH, flops.training_flops(model.config))


def _impls():
    impls = ["torch", "torch_fused"]
    if HAS_CUDA:
        impls.append(
            pytest.param("apex", marks=pytest.mark.skipif(dfm_compile.ApexFusedAdam is None, reason="apex not built"))
        )
    return impls


@pytest.mark.parametrize("impl", _impls())
def test_optimizer_step(benchmark, impl):
    torch.manual_seed(0)
    model = build_model("DFM-SiT-B/2", input_size=LATENT[1], num_classes=1000).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = make_optimizer(model.parameters(), lr=1e-4, impl=impl)

    def step():
        optimizer.step()
        synchronize()

    start = time.perf_counter()
    step()  # allocates the moment buffers
    first = time.perf_counter() - start
    benchmark.group = "adamw_step DFM-SiT-B/2"
    # The "eager" name makes plain torch.optim.AdamW the baseline of this group's ratios.
    benchmark.extra_info.update(provider="eager" if impl == "torch" else impl)
    benchmark.pedantic(step, rounds=ROUNDS * 3, iterations=1)
    _record(benchmark, first)
