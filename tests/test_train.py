"""The training loop end to end on a real DeepSpeed engine (CPU, gloo, one rank): exact resume,
atomic checkpoints, no host syncs in a step, and the `dfm train` / `dfm sample` commands."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dfm.launch.train import build_trainer, run
from safetensors.torch import load_file

from dfm import checkpoint
from dfm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "arch.depth=2",
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "train.global_batch_size=8",
    "train.log_every=2",
    "train.sample_every=1000",
    "train.ckpt_every=3",
    "sample.num_steps_per_scale=[2,1]",
    "sample.per_class=1",
]


def tiny(tmp_path, *extra):
    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", *extra])


def weights(ckpt_dir):
    return checkpoint.load_model_weights(ckpt_dir), load_file(str(Path(ckpt_dir) / "ema.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# The paper's architecture options (and the authors' qk-norm): no state beyond their parameters, so the same
# resume must hold with them on.
PAPER_ARCH = ["arch.pos_embed=rope", "arch.stage_embedding=true", "arch.qk_norm=true"]


@pytest.mark.parametrize("arch", [[], PAPER_ARCH], ids=["default", "rope-stage-qk"])
def test_resume_matches_uninterrupted_run_bitwise(tmp_path, deterministic, arch):
    run(tiny(tmp_path, "exp_name=straight", "train.max_steps=6", *arch))
    run(tiny(tmp_path, "exp_name=cut", "train.max_steps=3", *arch))
    run(tiny(tmp_path, "exp_name=cut", "train.max_steps=6", *arch), resume=True)
    straight = weights(tmp_path / "straight" / "checkpoints" / "0000006")
    resumed = weights(tmp_path / "cut" / "checkpoints" / "0000006")
    for a, b in zip(straight, resumed):
        assert_same(a, b)
    # the comparison is not vacuous: training moved the weights between step 3 and step 6
    early = weights(tmp_path / "straight" / "checkpoints" / "0000003")[0]
    assert any(not torch.equal(early[k], straight[0][k]) for k in early)


# A warmup of 4 steps, so that the cut at step 3 falls inside it, then a cosine decay; EMA warmup throughout.
SCHEDULE = ["train.lr_warmup_steps=4", "train.lr_schedule=cosine", "train.lr_min=1e-5", "train.ema_warmup_power=0.75"]


def test_resume_inside_warmup_with_cosine_and_ema_warmup_matches_bitwise(tmp_path, deterministic):
    """The lr and the EMA decay are functions of the step: a run killed after its step-3 checkpoint and resumed
    continues both exactly, with no scheduler state saved."""
    run(tiny(tmp_path, "exp_name=straight", "train.max_steps=6", *SCHEDULE))
    run(tiny(tmp_path, "exp_name=cut", "train.max_steps=6", *SCHEDULE))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "0000006")  # killed after the checkpoint of step 3
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("0000003")
    run(tiny(tmp_path, "exp_name=cut", "train.max_steps=6", *SCHEDULE), resume=True)
    for a, b in zip(weights(tmp_path / "straight" / "checkpoints" / "0000006"),
                    weights(tmp_path / "cut" / "checkpoints" / "0000006")):  # fmt: skip
        assert_same(a, b)
    # not vacuous: the schedule changed the run (another lr and EMA than the constant reference)
    run(tiny(tmp_path, "exp_name=constant", "train.max_steps=6"))
    constant = weights(tmp_path / "constant" / "checkpoints" / "0000006")[1]
    scheduled = weights(tmp_path / "straight" / "checkpoints" / "0000006")[1]
    assert any(not torch.equal(constant[k], scheduled[k]) for k in constant)


@pytest.mark.parametrize("where", ["engine", "ema", "rename", "pointer"])
def test_interrupted_checkpoint_leaves_previous_intact(tmp_path, monkeypatch, where):
    cfg = tiny(tmp_path, "exp_name=crash", "train.max_steps=3")
    trainer = build_trainer(cfg)
    trainer.fit()  # writes checkpoint 0000003
    root = cfg.run_dir / "checkpoints"
    before = weights(root / "0000003")

    class Crash(RuntimeError):
        pass

    def boom(*args, **kwargs):
        raise Crash(where)

    if where == "engine":  # the engine dies after writing part of its files
        real = trainer.engine.save_checkpoint

        def partial(save_dir, tag=None, **kw):
            Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
            Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"\x80truncated")
            raise Crash(where)

        monkeypatch.setattr(trainer.engine, "save_checkpoint", partial)
    elif where == "ema":
        monkeypatch.setattr(checkpoint, "save_file", boom)
    elif where == "rename":
        monkeypatch.setattr(checkpoint.os, "replace", boom)
    else:
        monkeypatch.setattr(checkpoint, "write_pointer", boom)
    trainer.cfg.train.max_steps = 6
    with pytest.raises(Crash):
        trainer.fit()
    monkeypatch.undo()
    if where == "engine":
        trainer.engine.save_checkpoint = real

    latest = checkpoint.latest_checkpoint(root)
    if where == "pointer":  # the new directory is complete, but the pointer still names the old one
        assert latest.name == "0000003"
    else:
        assert latest.name == "0000003" and not (root / "0000006").exists()
    for a, b in zip(before, weights(latest)):
        assert_same(a, b)
    # and a fresh process resumes from it
    resumed = build_trainer(cfg)
    resumed.resume(checkpoint.find_resumable(root))
    assert resumed.state.step == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_step_has_no_cuda_sync(tmp_path, precision):
    """The CUDA runtime's own check on the real step (tests/test_host_sync.py counts syncs on any device)."""
    trainer = build_trainer(
        tiny(tmp_path, f"exp_name=cudasync{precision}", "train.max_steps=100", f"train.precision={precision}")
    )
    assert trainer.device.type == "cuda"
    data = iter(trainer.loader)
    for _ in range(2):  # warm-up: lazy optimizer state, cuBLAS handles
        trainer.train_step(data)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def clean_env() -> dict:
    """The environment without the rendezvous variables an in-process run in this test process has set."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in dist_vars} | {"PYTHONUNBUFFERED": "1"}


def test_cli_train_then_sample(tmp_path, deterministic):
    """The console commands a newcomer runs: a real run directory, checkpoint, grid PNG and .npz."""
    env = clean_env()
    dfm = [sys.executable, "-m", "dfm.launch.cli"]
    train = subprocess.run(
        [*dfm, "train", "--config", str(ROOT / "configs" / "dfm_digits.yaml"), "--exp-name", "cli",
         *TINY, "train.max_steps=4", "train.sample_every=4", f"output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "cli"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "samples" / "0000004.png").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "0000004"
    assert any((run_dir / "tb").iterdir())
    sample = subprocess.run(
        [*dfm, "sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "grid.png"),
         "--npz", str(tmp_path / "s.npz"), "--per-class", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-3000:]
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    # 10 class rows, 2 samples x 2 stage previews per row, 16 px cells with 1 px padding, x4 upscale
    assert grid.size == ((4 * 17 + 1) * 4, (10 * 17 + 1) * 4)
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (20, 16, 16, 3) and arr["arr_0"].dtype == np.uint8
    assert arr["labels"].tolist() == [c for c in range(10) for _ in range(2)]

    # the exported EMA weights sample to the very same images without the run directory
    from dfm.launch import export, sample

    export.main(["--ckpt", str(run_dir), "--out", str(tmp_path / "w.safetensors")])
    sample.main(["--ckpt", str(tmp_path / "w.safetensors"), "--npz", str(tmp_path / "e.npz"), "--per-class", "2"])
    assert np.array_equal(np.load(tmp_path / "e.npz")["arr_0"], arr["arr_0"])
    assert (tmp_path / "w.png").is_file()  # without --out: beside the exported file, as --help says


def test_sample_writes_where_its_help_says(tmp_path):
    from dfm.launch.sample import __doc__ as help_text
    from dfm.launch.sample import default_out

    ckpt = tmp_path / "run" / "checkpoints" / "0000004"
    ckpt.mkdir(parents=True)
    (tmp_path / "imported").mkdir()
    assert default_out(ckpt) == tmp_path / "run" / "samples" / "sample_0000004.png"
    assert default_out(tmp_path / "imported") == tmp_path / "imported" / "samples.png"
    assert default_out(tmp_path / "w.safetensors") == tmp_path / "w.png"
    for place in ("<run>/samples/sample_<step>.png", "<dir>/samples.png", "F.png beside an exported"):
        assert place in " ".join(help_text.split()), place


def test_cli_rejects_bad_config_before_work(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "dfm.launch.cli", "train", "--config", str(ROOT / "configs" / "dfm_digits.yaml"),
         "train.bogus=1", f"output_dir={tmp_path}"],
        capture_output=True, text=True, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and "unknown config key 'train.bogus'" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing was created
