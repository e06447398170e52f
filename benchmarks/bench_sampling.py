"""Staged sampler throughput: eager vs compiled step vs CUDA graphs, ours and torch's.

``pytest benchmarks/bench_sampling.py --benchmark-enable --benchmark-json=sampler.json``, then
``python benchmarks/render.py sampler.json``. One call samples a batch of DFM-SiT-S/2 latents (32x32x4)
along the staged schedule with CFG (w = 4 on stages whose t lies in [0, 0.7], so the schedule has both
guided steps, with a doubled batch, and unguided ones), previews included. The model runs under bf16
autocast on CUDA and in fp32 on CPU. ``first_call_s`` is the first call (compile, and capture for
``cudagraph``; ``prepare_s`` is that part alone); the benchmark statistics are the steady state.

Providers: ``eager`` (the reference), ``compile`` (the compiled step), ``cudagraph`` (the compiled step
replayed from the graphs ``dfm.fast_sampling`` captures itself, with static buffers) and
``reduce-overhead`` (the compiled step under ``torch.compile(mode="reduce-overhead")``, torch's own
graphs: the plain alternative that the hand-captured ones must beat to keep their place). The two graph
providers need CUDA and are skipped on CPU.

``DFM_BENCH_MODEL``, ``DFM_BENCH_ROUNDS``, ``DFM_BENCH_BATCHES`` (comma list), ``DFM_BENCH_STEPS`` (steps
per phase, comma list) and ``DFM_BENCH_CFG`` (0: no guidance, so the NFE is the step count) override the
defaults: CUDA runs the reference [40, 10] steps at batch 1, 8, 32 and 128; CPU runs [4, 2] steps at
batch 1 and 4; both with CFG.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, synchronize

from dfm import flops
from dfm.fast_sampling import FastStagedSampler
from dfm.models import build_model
from dfm.precision import autocast
from dfm.sampling import StagedSampler, stage_noise, staged_schedule


def _ints(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",")]


MODEL = os.environ.get("DFM_BENCH_MODEL", "DFM-SiT-S/2")
ROUNDS = int(os.environ.get("DFM_BENCH_ROUNDS", 10 if HAS_CUDA else 3))
BATCHES = _ints("DFM_BENCH_BATCHES", "1,8,32,128" if HAS_CUDA else "1,4")
STEPS = _ints("DFM_BENCH_STEPS", "40,10" if HAS_CUDA else "4,2")
THRESHOLDS = [0.1]
GUIDED = os.environ.get("DFM_BENCH_CFG", "1") != "0"
CFG = dict(cfg_scale=4.0 if GUIDED else 1.0, guidance_low=0.0, guidance_high=0.7, null_class=1000)
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
PROVIDERS = ["eager", pytest.param("cudagraph", marks=NEEDS_CUDA), pytest.param("reduce-overhead", marks=NEEDS_CUDA),
             "compile"]  # fmt: skip
MODES = {"eager": {"mode": "eager"}, "compile": {"mode": "compile"}, "cudagraph": {"mode": "cudagraph"},
         "reduce-overhead": {"mode": "compile", "compile_mode": "reduce-overhead"}}  # fmt: skip


class _WithAutocast(torch.nn.Module):
    """The model under the device's default precision (bf16 autocast on CUDA), as sampling runs it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, mask):
        with autocast(DEVICE):
            return self.model(x, t, y, mask)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(MODEL, input_size=32, num_classes=1000).to(DEVICE).eval()
    with torch.no_grad():  # non-zero adaLN and heads, so the velocities (and CFG) are not all zero
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return _WithAutocast(net)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sampler(benchmark, model, batch, provider):
    schedule = staged_schedule(STEPS, THRESHOLDS)
    sampler = FastStagedSampler(StagedSampler(model, schedule, **CFG), **MODES[provider])
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise = stage_noise(batch, model.model.input_shapes(), generator=g, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), generator=g, device=DEVICE)

    def run():
        sampler.sample(noise, y)
        synchronize()

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    prepare = sampler.last_prepare_s
    run()  # one more untimed call
    guidance = "cfg" if GUIDED else "no cfg"
    benchmark.group = f"sampler {MODEL} steps={'+'.join(map(str, STEPS))} {guidance} batch={batch}"
    nfe = sum(2 if guided else 1 for guided in sampler.sampler.step_is_guided)
    benchmark.extra_info.update(
        provider=provider,
        batch=batch,
        nfe=nfe,
        first_call_s=round(first, 3),
        prepare_s=round(prepare, 3),
        device=flops.device_name(DEVICE),
        torch=torch.__version__,
    )
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = round(batch / median, 2)
    if HAS_CUDA:
        per_image = flops.sampling_flops(model.model.config, sampler.sampler.step_is_guided)
        benchmark.extra_info["tflops"] = round(per_image * batch / median / 1e12, 1)
        utilisation = flops.mfu(per_image, batch / median, flops.device_name(DEVICE))
        if utilisation is not None:
            benchmark.extra_info["mfu"] = round(utilisation, 3)
