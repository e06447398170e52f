"""Training-step throughput of ZeRO stages 0 (plain data parallelism), 1, 2 and 3 on two ranks.

``pytest benchmarks/bench_zero.py --benchmark-enable`` (``DFM_BENCH_ROUNDS`` sets the timed steps). Each
case launches a real 2-rank job (``torchrun``, gloo on CPU, NCCL on CUDA when the host has two GPUs)
running this file as its worker: it builds the trainer of ``dfm train`` (``dfm.launch.train.build_trainer``)
for the stage, takes warm-up steps, then waits. Every benchmark round asks the job, through a TCP store
hosted by this process, for one ``Trainer.train_step`` (forward, backward, DeepSpeed's reduction and
optimizer step, EMA) on both ranks, and returns when rank 0 has finished it, so pytest-benchmark times
steady-state steps; the request and reply add ~0.2 ms. A summary prints each stage's median step time and
its slowdown against ZeRO 0.

Two model sizes: ``tiny`` (depth 2, width 64, 0.2 M parameters), where host overhead dominates, and
``S/2`` (DFM-SiT-S/2, 33 M parameters), with 16x16 digits, micro batch 8 per rank. On ZeRO 2 of ``S/2`` the
gradient-communication settings are compared too: ``overlap_comm`` off, and 100x smaller buckets. Measured results and
the hardware they came from are in ``benchmarks/results/2026-11-25-cpu-epyc-2core-zero.md``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("DFM_BENCH_ROUNDS", 50 if torch.cuda.is_available() else 10))
WARMUP = 3
MODELS = {
    "tiny": ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2"],
    "S/2": ["arch.depth=12", "arch.hidden_size=384", "arch.num_heads=6"],
}
STAGES = [0, 1, 2, 3]
# Gradient-communication settings (train.overlap_comm, bucket sizes), compared on ZeRO 2 of the larger model.
VARIANTS = {
    "default": [],
    "no_overlap": ["train.overlap_comm=false"],
    "small_buckets": ["train.reduce_bucket_size=5000000", "train.allgather_bucket_size=5000000"],
}
CASES = [(m, s, "default") for m in MODELS for s in STAGES] + [("S/2", 2, v) for v in VARIANTS if v != "default"]
_medians: dict[str, dict[str, float]] = {}


def config(model: str, stage: int, out: Path, variant: str = "default"):
    from dfm.config import load_config

    overrides = (
        MODELS[model]
        + VARIANTS[variant]
        + [
            "train.global_batch_size=16",
            "train.micro_batch_size=8",
            f"train.zero_stage={stage}",
            "train.precision=fp32" if not torch.cuda.is_available() else "train.precision=bf16",
            f"output_dir={out}",
            f"exp_name=zero{stage}",
        ]
    )
    return load_config(ROOT / "configs" / "dfm_digits.yaml", overrides)


def worker(model: str, stage: int, out: Path, port: int, variant: str) -> None:
    """Inside the 2-rank job: build the trainer, warm up, then take one step per request until told to stop."""
    from dfm.launch.train import build_trainer

    trainer = build_trainer(config(model, stage, out, variant))
    data = iter(trainer.loader)
    for _ in range(WARMUP):
        trainer.train_step(data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(minutes=10))
    torch.distributed.barrier()
    if trainer.rank == 0:
        store.set("ready", "1")
    for i in itertools.count():
        if store.get(f"go/{i}") == b"stop":
            break
        trainer.train_step(data)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.rank == 0:
            store.set(f"done/{i}", "1")


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: each stage's median step time and its ratio to ZeRO 0, per model."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if not _medians or reporter is None:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with capture.global_and_fixture_disabled():  # fixture teardown output is captured otherwise
        reporter.write_sep("-", f"2-rank training step, median and time relative to ZeRO 0 ({device})")
        for model, by_case in _medians.items():
            base = by_case.get("ZeRO 0")
            cells = [f"{c} {t * 1e3:.1f} ms" + (f" ({t / base:.2f}x)" if base else "") for c, t in by_case.items()]
            reporter.write_line(f"{model}: " + ", ".join(cells))


@pytest.mark.parametrize("model, stage, variant", CASES)
def test_zero_stage_step(benchmark, tmp_path, model, stage, variant):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(minutes=10))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env |= {"DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu", "TMPDIR": str(tmp_path)}
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, model,
           str(stage), str(tmp_path), str(store.port), variant]  # fmt: skip
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        store.get("ready")  # startup and warm-up, not timed
        rounds = itertools.count()

        def step():
            i = next(rounds)
            store.set(f"go/{i}", "step")
            store.get(f"done/{i}")

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        benchmark.extra_info.update(model=model, zero_stage=stage, ranks=2, device=device, variant=variant)
        benchmark.extra_info["provider"] = f"ZeRO {stage}" + ("" if variant == "default" else f" {variant}")
        benchmark.group = f"zero-{model}"
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
        store.set(f"go/{next(rounds)}", "stop")
        assert job.wait(timeout=120) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        if job.poll() is None:  # the workers run in their own sessions: kill them by pid, then the agent
            for pid in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            job.kill()
            job.wait()
    if benchmark.stats is not None:
        _medians.setdefault(model, {})[benchmark.extra_info["provider"]] = benchmark.stats.stats.median


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
