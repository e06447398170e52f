"""DeepSpeed at two ranks (CPU, gloo, real ``torchrun`` processes): ZeRO 0-3 equal to one rank, kill and
resume, resume at another world size through a universal checkpoint, rank-dependent draws, EMA export.

One rank accumulating two micro-batches of m and two ranks with one micro-batch of m each see the same
global batch in the same slot order (``InMemoryLoader``) with the same draws (``draw_seed``), so they
differ only in the order of floating-point sums (gloo's all-reduce vs DeepSpeed's accumulation):
``TOL`` bounds that, and ``test_two_ranks_match_one_rank`` checks that training moved the weights by far
more than ``TOL``. Every run ends with a sample grid, so ZeRO-3 also gathers its partitioned EMA to sample.

The 2-rank cases share few launches (each pays DeepSpeed's import and a gloo rendezvous): this file is
also the worker script that ``torchrun`` runs (``python tests/test_distributed.py CASE OUT``).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
TINY = [
    "arch.depth=2",
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",  # 2 ranks x 1 micro-batch, or 1 rank x 2 accumulated micro-batches
    "train.lr=1e-3",
    "train.ema_decay=0.9",
    f"train.max_steps={STEPS}",
    "train.log_every=2",
    "train.sample_every=100000",
    "train.ckpt_every=2",
    "train.keep_ckpts=10",
    "sample.num_steps_per_scale=[2,1]",
    "sample.per_class=1",
]
# Max |difference| of fp32 weights between layouts that sum the same gradients in another order, after
# STEPS AdamW steps of lr 1e-3 (measured: 3e-8; the weights move by 4e-3 between steps 2 and STEPS).
# Gradient clipping (train.grad_clip 1.0) is active in every step here (global norms 1.5-3.4 measured),
# so the layouts also agree on the clipping norm: summed over the ranks' partitions at ZeRO 1/2
# (dfm.optim.ClippedAdamW), DeepSpeed's at ZeRO 3, local at ZeRO 0.
TOL = 1e-6


def tiny(out: Path, *extra: str):
    from dfm.config import load_config

    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={out}", *extra])


# -- the worker: runs under torchrun ---------------------------------------------------------------------


def worker(case: str, out: Path) -> None:
    from dfm.launch.train import build_trainer, run

    if case == "main":
        for stage in (0, 1, 2):
            run(tiny(out, f"exp_name=zero{stage}", f"train.zero_stage={stage}"))
        run(tiny(out, "exp_name=zero3", "train.zero_stage=3", "train.max_steps=3"))  # cut at step 3 ...
        run(tiny(out, "exp_name=zero3", "train.zero_stage=3"), resume=True)  # ... and resumed to STEPS
        record_draws(build_trainer(tiny(out, "exp_name=draws")), out)
    elif case == "kill":  # runs until the test kills it
        run(tiny(out, "exp_name=killed", "train.zero_stage=2", "train.max_steps=100000"))
    elif case == "resume":
        run(tiny(out, "exp_name=killed", "train.zero_stage=2"), resume=True)
    else:
        raise ValueError(case)


def record_draws(trainer, out: Path) -> None:
    """Save which samples (by index, with their global stream positions) and which noise this rank gets over
    the steps that cover one epoch of the real loader."""
    import copy

    loader = copy.copy(trainer.loader)
    loader.x = torch.arange(len(loader.x)).view(-1, 1, 1, 1)  # the same loader, yielding sample indices
    stream = loader.stream
    micro_batches = -(-stream.count // stream.global_batch) * trainer.accum_steps  # whole steps, epoch 0 covered
    positions = [torch.arange(p, p + stream.micro_batch) for p in itertools.islice(loader.starts(), micro_batches)]
    data = iter(loader)
    indices = torch.cat([next(data)[0].flatten() for _ in range(micro_batches)])
    x = torch.zeros(trainer.cfg.train.micro_batch_size, 1, 16, 16)
    from dfm import ops

    noise = []
    for step in range(4):
        for micro in range(trainer.accum_steps):
            g = trainer.seed_draws(step, micro)
            draw = trainer.objective.draw(ops.band_placeholders(x, trainer.objective.stages), torch.zeros(4).long(), g)
            noise.append(torch.cat([e.flatten() for e in draw.eps]))
    record = {"indices": indices, "positions": torch.cat(positions), "noise": torch.stack(noise)}
    torch.save(record, out / f"draws_rank{trainer.rank}.pt")


# -- helpers of the test process ------------------------------------------------------------------------


def clean_env(out: Path) -> dict:
    """The environment without the rendezvous variables an in-process run in this test process has set."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    return env | {"PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TMPDIR": str(out)}


def torchrun(case: str, out: Path) -> subprocess.Popen:
    """Two ranks on this host; ``--standalone`` picks a free rendezvous port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, case,
           str(out)]  # fmt: skip
    log = open(out / f"{case}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(out), start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, case: str, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    log = (out / f"{case}.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    return log


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL the torchrun agent's workers (their own sessions) and then the agent, by pid."""
    for child in children(pid):
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{step:07d}"


def weights(ckpt_dir: Path) -> tuple[dict, dict]:
    from dfm import checkpoint

    return checkpoint.load_model_weights(ckpt_dir), load_file(str(ckpt_dir / "ema.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def two_ranks(out) -> Path:
    """ZeRO 0, 1, 2 and 3 (cut and resumed) runs and the draw record, from one 2-rank launch."""
    log = finish(torchrun("main", out), out, "main")
    assert "resumed at step 3" in log
    return out


@pytest.fixture(scope="module")
def reference(out) -> Path:
    """The same global batches on one rank (in this process): ZeRO 0, two accumulated micro-batches."""
    from dfm.launch.train import run

    run(tiny(out, "exp_name=one_rank", "train.zero_stage=0"))
    return out / "one_rank"


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_rank(two_ranks, reference, stage):
    """Raw and EMA weights after STEPS steps; ZeRO-3 was also cut at step 3 and resumed in between."""
    one_raw, one_ema = weights(ckpt(reference, STEPS))
    two_raw, two_ema = weights(ckpt(two_ranks / f"zero{stage}", STEPS))
    assert max_diff(one_raw, two_raw) <= TOL and max_diff(one_ema, two_ema) <= TOL
    start_raw, _ = weights(ckpt(reference, 2))
    assert max_diff(start_raw, one_raw) > 1000 * TOL  # training moved the weights: the match is not vacuous


def test_ranks_draw_different_samples_and_noise(two_ranks):
    draws = [torch.load(two_ranks / f"draws_rank{r}.pt") for r in range(2)]
    positions = torch.cat([d["positions"] for d in draws])
    assert sorted(positions.tolist()) == list(range(225 * 8))  # the ranks' slots tile 225 global batches of 8
    a, b = (d["indices"][d["positions"] < 1797].tolist() for d in draws)  # epoch 0: the first 1797 positions
    assert len(set(a)) == len(a) and len(set(b)) == len(b)  # no repeats within a rank
    assert not set(a) & set(b)  # ... nor across ranks, within the epoch
    assert len(a) + len(b) == 1797  # and the epoch is covered whole: nothing dropped
    eps = torch.cat([d["noise"] for d in draws])  # (2 ranks x 4 steps, numel): every pair of them differs
    distance = torch.cdist(eps, eps) + torch.eye(len(eps)) * 1e9  # independent N(0, I): ~sqrt(2 * numel)
    assert distance.min() > 0.5 * (2 * eps.shape[1]) ** 0.5


def test_kill_and_resume_two_ranks_matches_uninterrupted(two_ranks):
    out = two_ranks
    proc = torchrun("kill", out)
    latest = out / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    try:
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        kill_tree(proc.pid)  # SIGKILL mid-run, wherever it is (possibly inside the next save)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out / "kill.log").read_text()[-3000:]
    killed_at = int(latest.read_text())
    assert killed_at < STEPS
    log = finish(torchrun("resume", out), out, "resume")
    assert f"resumed at step {killed_at}" in log
    resumed = weights(ckpt(out / "killed", STEPS))
    straight = weights(ckpt(out / "zero2", STEPS))
    for a, b in zip(resumed, straight):  # same layout, same order of sums: bitwise
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_at_another_world_size(two_ranks, stage, capsys):
    """A 2-rank checkpoint resumed on one rank (two accumulated micro-batches) continues the same run: same
    data position, same draws, same optimizer state. ZeRO shards go through DeepSpeed's universal checkpoint
    (and the run says so); ZeRO 0 keeps the whole optimizer state in one file and loads directly."""
    from dfm.launch.train import run

    saved = ckpt(two_ranks / f"zero{stage}", 2)
    run(tiny(two_ranks, f"exp_name=one_rank_from_zero{stage}", f"train.zero_stage={stage}"), resume=True, ckpt=saved)
    assert (saved / "universal" / "zero").is_dir() == (stage > 0)
    said = f"{saved} was written by 2 rank(s) at ZeRO {stage} and this run has 1: resuming through DeepSpeed's"
    assert (said in capsys.readouterr().out) == (stage > 0)
    resumed = weights(ckpt(two_ranks / f"one_rank_from_zero{stage}", STEPS))
    straight = weights(ckpt(two_ranks / f"zero{stage}", STEPS))
    assert max_diff(resumed[0], straight[0]) <= TOL and max_diff(resumed[1], straight[1]) <= TOL


def test_offload_matches_device_optimizer(reference, out):
    """ZeRO-2 with the optimizer offloaded (DeepSpeed's own optimizer from the generated config)."""
    from dfm.launch.train import run

    run(tiny(out, "exp_name=offload", "train.zero_stage=2", "train.offload=true"))
    a, b = weights(ckpt(out / "offload", STEPS)), weights(ckpt(reference, STEPS))
    assert max_diff(a[0], b[0]) <= TOL and max_diff(a[1], b[1]) <= TOL


def test_export_gathers_zero3_ema_into_one_file(two_ranks, tmp_path):
    from dfm.launch.cli import main as dfm
    from dfm.launch.sample import load_model

    run_dir = two_ranks / "zero3"
    assert dfm(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "ema.safetensors")]) == 0
    exported = load_file(str(tmp_path / "ema.safetensors"))
    saved = load_file(str(ckpt(run_dir, STEPS) / "ema.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    model, cfg = load_model(tmp_path / "ema.safetensors", config=str(tmp_path / "ema.yaml"))
    assert cfg.model == "DFM-SiT-S/4" and all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    # the raw ZeRO-3 weights, consolidated from the partitions
    dfm(["export", "--ckpt", str(ckpt(run_dir, STEPS)), "--out", str(tmp_path / "raw.safetensors"), "--raw"])
    raw = load_file(str(tmp_path / "raw.safetensors"))
    assert raw.keys() == saved.keys() and max_diff(raw, saved) > 0  # the EMA lags the raw weights


def test_compile_is_wired_below_zero3_and_falls_back_with_a_reason(out, caplog):
    from dfm.launch.train import build_trainer

    trainer = build_trainer(tiny(out, "exp_name=compiled", "train.compile=true", "train.zero_stage=2"))
    assert all(block._compiled_call_impl is not None for block in trainer.engine.module.blocks)
    with caplog.at_level(logging.WARNING, logger="dfm.launch.engine"):
        trainer = build_trainer(tiny(out, "exp_name=eager", "train.compile=true", "train.zero_stage=3"))
    assert all(block._compiled_call_impl is None for block in trainer.engine.module.blocks)
    assert "running eager under ZeRO-3" in caplog.text


def test_bf16_autocast_trains_fp32_master_weights(out):
    """One tiny bf16 case (bf16 is emulated on CPU): ZeRO-1 under autocast keeps every weight in fp32, and
    the optimizer's flat fp32 partition is the module's weights themselves (no bf16 working copy)."""
    from dfm.launch.train import run

    loss = run(tiny(out, "exp_name=bf16", "train.zero_stage=1", "train.precision=bf16", "train.max_steps=2"))
    assert loss is not None and 0 < loss < 10
    saved = ckpt(out / "bf16", 2)
    raw, ema = weights(saved)
    assert all(v.dtype == torch.float32 for v in raw.values()) and all(v.dtype == torch.float32 for v in ema.values())
    (optim_file,) = saved.glob("*optim_states.pt")
    master = torch.load(optim_file, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    from dfm.models import DFMSiT

    order = [name for name, _ in DFMSiT.from_config(tiny(out)).named_parameters()]
    working = torch.cat([raw[name].flatten() for name in order])  # the flat group follows the parameter order
    assert master.dtype == torch.float32 and torch.equal(master[: working.numel()], working)
    assert not torch.equal(working.bfloat16().float(), working)  # weights carry bits that bf16 would drop


def test_loader_global_batches_do_not_depend_on_the_layout():
    from dfm.data.digits import InMemoryLoader
    from dfm.trainer import draw_seed

    n, g, m = 103, 12, 2
    ids = torch.arange(n).view(n, 1, 1, 1)

    def global_batches(world: int, accum: int, steps: int, state: dict | None = None) -> list[list[int]]:
        streams = []
        for rank in range(world):
            loader = InMemoryLoader(ids, ids.flatten(), m, rank, world, seed=5, accum_steps=accum)
            if state is not None:
                loader.load_state_dict(state)
            it = iter(loader)
            streams.append([[next(it)[1].tolist() for _ in range(accum)] for _ in range(steps)])
        state = loader.state_dict()
        batches = [sum((sum(streams[r][s], []) for r in range(world)), []) for s in range(steps)]
        return batches, state

    one, _ = global_batches(1, g // m, 20)  # 8.6 global batches per epoch: crosses two epoch boundaries
    for world in (2, 3, 6):
        assert global_batches(world, g // m // world, 20)[0] == one  # same samples, same slot order
        first, state = global_batches(world, g // m // world, 7)  # resume at another world size
        assert first + global_batches(1, g // m, 13, state)[0] == one
    flat = sum(one, [])  # the global stream: epochs of n, concatenated (a global batch may straddle two)
    assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n : 2 * n]) == list(range(n))  # each epoch whole
    assert flat[:n] != flat[n : 2 * n]  # and reshuffled
    seeds = {draw_seed(0, step, slot, 64) % 2**32 for step in range(2000) for slot in range(64)}
    assert len(seeds) == 2000 * 64  # every micro-batch of a run draws from its own seed


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
