"""The run folder is protected: every refused or failed start names the folder or the key and leaves the folder
byte for byte as it was; a start that goes ahead records itself in run.json (real engine, CPU, one rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dfm import checkpoint
from dfm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8", "train.max_steps=2",
        "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=2", "sample.num_steps_per_scale=[2,1]",
        "sample.per_class=1"]  # fmt: skip


def tiny(tmp_path, *extra):
    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", *extra])


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A digits run of 2 steps that finished: checkpoint 2, config.yaml, run.json, events, an empty lock."""
    from dfm.launch.train import run

    out = tmp_path_factory.mktemp("runs")
    run(tiny(out, "exp_name=done"))
    return out


def refused(out: Path, exc, match: str, *overrides: str, **kwargs) -> None:
    """Run ``dfm train`` on the finished run's folder with ``overrides``; it must raise ``exc`` matching
    ``match`` and leave the folder as it was."""
    from dfm.launch.train import run

    before = snapshot(out / "done")
    with pytest.raises(exc, match=match):
        run(tiny(out, "exp_name=done", *overrides), **kwargs)
    assert snapshot(out / "done") == before


def test_the_finished_run_holds_what_it_should(finished):
    run_dir = finished / "done"
    assert (run_dir / ".lock").read_bytes() == b""  # released: it names no holder
    assert checkpoint.latest_checkpoint(run_dir / "checkpoints").name == "0000002"
    (launch,) = json.loads((run_dir / "run.json").read_text())["launches"]
    assert launch["world_size"] == 1 and launch["resumed_from"] is None and launch["start_step"] == 0
    assert launch["command"][0] == sys.executable and launch["data"] == {"kind": "digits", "data_dir": None}
    assert launch["code"]["commit"] is None or len(launch["code"]["commit"]) == 40
    assert {"python", "torch", "deepspeed"} <= set(launch["versions"])


def test_a_fresh_start_in_a_used_folder_is_refused(finished):
    refused(finished, ConfigError, rf"{finished / 'done'} already holds a run: add --resume .* --overwrite")


def test_a_resume_that_would_build_another_model_is_refused_naming_the_keys(finished):
    refused(finished, ConfigError, r"cannot resume .*0000002 .*arch\.hidden_size: 64 -> 96.*use the run's own config",
            "arch.hidden_size=96", resume=True)  # fmt: skip
    refused(finished, ConfigError, r"dfm\.stages_count: 2 -> 1", "dfm.stages_count=1", "model=SiT-S/4",
            "sample.num_steps_per_scale=[3]", "dfm.stage_weights=[1]", "sample.stage_sampling_thresholds=[]",
            resume=True)  # fmt: skip


def test_a_resume_that_fails_after_the_engine_is_built_changes_nothing(finished):
    # the data stream of another seed cannot continue this run's: found once the engine and loader exist
    refused(finished, ValueError, r"loader state has seed=0, this loader has seed=1: cannot resume", "seed=1",
            resume=True)  # fmt: skip
    refused(finished, checkpoint.CheckpointError,
            r"written with train.zero_stage=0, train.offload=False; resume it with the same",
            "train.zero_stage=1", resume=True)  # fmt: skip


def test_resume_of_a_folder_without_checkpoint_is_refused(tmp_path):
    from dfm.launch.train import run

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("exp_name: half\n")
    before = snapshot(tmp_path / "half")
    with pytest.raises(ConfigError, match=rf"--resume: {tmp_path / 'half'} holds no checkpoint to resume"):
        run(tiny(tmp_path, "exp_name=half"), resume=True)
    assert snapshot(tmp_path / "half") == before


def test_resume_appends_to_run_json_and_overwrite_starts_afresh(tmp_path):
    from dfm.launch.train import run

    run(tiny(tmp_path, "exp_name=r"))
    first = json.loads((tmp_path / "r" / "run.json").read_text())["launches"][0]
    run(tiny(tmp_path, "exp_name=r", "train.max_steps=4", "train.lr=2e-4"), resume=True)
    launches = json.loads((tmp_path / "r" / "run.json").read_text())["launches"]
    assert len(launches) == 2 and launches[0] == first
    assert launches[1]["start_step"] == 2 and launches[1]["resumed_from"].endswith("0000002")
    assert launches[1]["run_id"] == first["run_id"]  # the same run, continued
    assert "lr: 0.0002" in (tmp_path / "r" / "config.yaml").read_text()  # the config of the latest start
    run(tiny(tmp_path, "exp_name=r"), overwrite=True)
    (again,) = json.loads((tmp_path / "r" / "run.json").read_text())["launches"]
    assert again["run_id"] != first["run_id"] and not (tmp_path / "r" / "checkpoints" / "0000004").exists()


# -- the data: a latent store's shape and classes ---------------------------------------------------------------


def write_latents(root: Path, side: int, classes: int = 3) -> Path:
    from dfm.data.store import write_store

    rng = np.random.default_rng(side)
    mean = rng.standard_normal((12, 4, side, side)).astype(np.float32)
    return write_store(root, np.concatenate([mean, np.full_like(mean, 0.1)], axis=1), np.arange(12) % classes, classes)


def test_a_resume_on_a_store_of_another_shape_is_refused(tmp_path):
    from dfm.launch.train import run

    small, large = write_latents(tmp_path / "s8", 8), write_latents(tmp_path / "s16", 16)
    # the digits config names the digits' shape; null hands the three keys to the store
    latent = ["data.kind=latents", "data.num_workers=0", "data.resolution=null", "data.channels=null",
              "data.num_classes=null"]  # fmt: skip
    run(tiny(tmp_path, "exp_name=lat", *latent, f"data.data_dir={small}"))
    saved = load_config(tmp_path / "lat" / "config.yaml")
    assert (saved.data.resolution, saved.data.channels, saved.data.num_classes) == (8, 4, 3)  # from the store
    assert saved.data.data_dir == str(small.resolve())  # the store by its absolute path
    before = snapshot(tmp_path / "lat")
    with pytest.raises(ConfigError, match=r"data\.resolution: 8 -> 16"):
        run(tiny(tmp_path, "exp_name=lat", *latent, f"data.data_dir={large}"), resume=True)
    assert snapshot(tmp_path / "lat") == before


def test_cli_refuses_a_config_the_store_contradicts_before_any_work(tmp_path):
    store = write_latents(tmp_path / "store", 8)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-m", "dfm.launch.cli", "train", "--config", str(ROOT / "configs" / "dfm_digits.yaml"),
         "--data-dir", str(store), "data.resolution=16", f"output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "config key 'data.resolution' is 16 but the latent store" in lines[0], done.stderr
    assert str(store) in lines[0] and not (tmp_path / "runs").exists()
