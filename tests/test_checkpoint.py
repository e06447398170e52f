"""Checkpoints that trust nothing on disk (``dfm.checkpoint``, ``dfm.launch.checkpoint``, ``dfm.launch.rundir``).

The unit tests build checkpoint folders by hand; the others train a tiny model on the real DeepSpeed engine
(CPU, gloo) and then corrupt, plant or remove files the way a crash, a full disk or an attacker would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dfm.launch.checkpoint import audit_engine_files
from dfm.launch.train import run
from safetensors.torch import save_file

from dfm import checkpoint
from dfm.checkpoint import CheckpointError, NonFiniteError
from dfm.config import ConfigError, load_config
from dfm.files import FolderLock, LockedError

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "arch.depth=2",
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "train.global_batch_size=8",
    "train.log_every=2",
    "train.sample_every=1000",
    "train.ckpt_every=2",
    "train.keep_ckpts=3",
    "sample.num_steps_per_scale=[2,1]",
    "sample.per_class=1",
]
MARKER = "planted-code-ran"


def tiny(tmp_path, *extra):
    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", *extra])


def weights(ckpt_dir: Path) -> tuple[dict, dict]:
    return checkpoint.load_model_weights(ckpt_dir), checkpoint.load_ema_weights(ckpt_dir)


def assert_bitwise(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class Planted:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- the format, built by hand ---------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, run_id: str = "run") -> Path:
    folder = root / checkpoint.tag_of(step)
    folder.mkdir(parents=True)
    save_file({"w": torch.full((3,), float(step))}, str(folder / checkpoint.EMA_FILE))
    (folder / "trainer_rank0.json").write_text(json.dumps({"step": step, "loader": {}, "rng": {}}))
    checkpoint.write_manifest(folder, step, run_id, {"world_size": 1, "zero_stage": 0})
    return folder


def test_verify_names_the_file_that_is_missing_truncated_or_altered(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    assert checkpoint.verify(folder)["step"] == 2
    ema = folder / checkpoint.EMA_FILE
    data = ema.read_bytes()
    ema.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    with pytest.raises(CheckpointError, match=r"ema\.safetensors does not match its checksum"):
        checkpoint.verify(folder)
    checkpoint.verify(folder, checksums=False)  # the cheap check sees sizes only
    ema.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors has 10 bytes, the manifest says"):
        checkpoint.verify(folder)
    ema.unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors is missing"):
        checkpoint.verify(folder)
    (folder / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        checkpoint.verify(folder)


def test_the_latest_pointer_is_a_tag_inside_the_folder(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    assert checkpoint.pointed(root) is None
    (root / "latest").write_text("0000002")
    assert checkpoint.pointed(root) == root / "0000002"
    for bad in ("../../elsewhere", "/etc", "0000002/../../x", "latest"):
        (root / "latest").write_text(bad)
        with pytest.raises(CheckpointError, match="not a checkpoint tag"):
            checkpoint.pointed(root)
    outside = fake_checkpoint(tmp_path / "other", 9)
    (root / "0000009").symlink_to(outside)
    (root / "latest").write_text("0000009")
    with pytest.raises(CheckpointError, match="leads outside"):
        checkpoint.pointed(root)


def test_find_resumable_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    assert checkpoint.find_resumable(root).name == "0000006"  # no pointer: the newest intact, by scanning
    (root / "latest").write_text("0000006")
    (root / "0000006" / checkpoint.EMA_FILE).write_bytes(b"garbage")
    (root / "0000004" / "trainer_rank0.json").write_text("{")
    said = []
    assert checkpoint.find_resumable(root, report=said.append).name == "0000002"
    assert [s.split(":")[0] for s in said] == ["rejected checkpoint 0000006", "rejected checkpoint 0000004"]
    assert "ema.safetensors" in said[0] and "trainer_rank0.json" in said[1]
    (root / "0000002" / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.find_resumable(root, report=said.append)
    assert checkpoint.find_resumable(tmp_path / "empty") is None


def test_rotation_deletes_only_this_runs_older_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 1, run_id="someone-else")
    for step in (2, 4, 6):
        fake_checkpoint(root, step, run_id="mine")
    (fake_checkpoint(root, 3, run_id="mine") / checkpoint.MANIFEST).unlink()  # unprovable ownership: kept
    removed = checkpoint.prune(root, keep=1, run_id="mine", current=6)
    assert sorted(removed) == ["0000002", "0000004"]
    assert sorted(p.name for p in checkpoint.checkpoint_dirs(root)) == ["0000001", "0000003", "0000006"]


def test_a_future_abandoned_by_a_resume_is_set_aside_not_counted(tmp_path):
    """Resumed from 4 (say 6 was corrupt) and saving 5 with keep=2: 4 and 5 stay, 6 is moved out of the way
    (kept, never resumed from), instead of 6 counting as one of the two newest and 4 being deleted."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 5, 6):
        fake_checkpoint(root, step, run_id="mine")
    checkpoint.prune(root, keep=2, run_id="mine", current=5)
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["0000005", "0000004"]
    assert (root / checkpoint.STAGING / "superseded" / "0000006").is_dir()


class WeightsOnly:
    """The smallest EngineState: no engine files, the given weights as the trained ones."""

    def __init__(self, weights: dict):
        self._weights = weights

    def save(self, folder: Path) -> None:
        pass

    def load(self, folder: Path) -> None:
        pass

    def weights(self) -> dict:
        return self._weights

    def state_dict(self) -> dict:  # doubles as the EMA
        return self._weights


def request(step: int, run_id: str = "mine") -> checkpoint.SaveRequest:
    state = {"step": step, "loader": {}, "rng": {}}
    return checkpoint.SaveRequest(step, run_id, state, "model: x\n", {"world_size": 1, "zero_stage": 0}, keep=5)


def test_non_finite_weights_are_never_saved(tmp_path):
    root = tmp_path / "checkpoints"
    good = WeightsOnly({"w": torch.ones(3)})
    checkpoint.save_checkpoint(root, request(2), good, good)
    bad = WeightsOnly({"w": torch.tensor([1.0, float("nan"), 2.0])})
    with pytest.raises(NonFiniteError, match="step 4: the weights or the EMA are not finite"):
        checkpoint.save_checkpoint(root, request(4), bad, good)
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["0000002"] and (
        root / "latest"
    ).read_text() == "0000002"
    assert not (root / checkpoint.STAGING / "0000004").exists()


def test_a_step_saved_by_another_run_is_not_replaced(tmp_path):
    root = tmp_path / "checkpoints"
    weights = WeightsOnly({"w": torch.ones(3)})
    checkpoint.save_checkpoint(root, request(2, run_id="theirs"), weights, weights)
    with pytest.raises(CheckpointError, match=r"0000002 belongs to another run \(theirs\)"):
        checkpoint.save_checkpoint(root, request(2, run_id="mine"), weights, weights)
    assert checkpoint.read_manifest(root / "0000002")["run_id"] == "theirs"
    checkpoint.save_checkpoint(root, request(2, run_id="theirs"), WeightsOnly({"w": torch.zeros(3)}), weights)
    assert torch.equal(checkpoint.load_model_weights(root / "0000002")["w"], torch.zeros(3))  # its own: replaced


def test_rng_and_trainer_state_round_trip_as_json():
    import random

    state = checkpoint.rng_state()
    text = json.dumps(state)  # JSON: nothing to unpickle on the way back
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    for _ in range(5):
        random.random(), np.random.rand(), torch.rand(7)
    checkpoint.set_rng_state(json.loads(text))
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_weights_that_cannot_be_read_are_named(tmp_path):
    bad = tmp_path / "ema.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: unreadable weights"):
        checkpoint.load_ema_weights(bad)
    with pytest.raises(FileNotFoundError, match="no weights at"):
        checkpoint.load_ema_weights(tmp_path / "absent.safetensors")


def test_engine_files_with_foreign_globals_are_refused_before_deepspeed_reads_them(tmp_path):
    torch.save({"module": {"w": torch.zeros(2)}, "payload": Planted(tmp_path / MARKER)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: refused to load: its pickle imports (builtins|io)\.open"):
        audit_engine_files(tmp_path)
    assert not (tmp_path / MARKER).exists()
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(CheckpointError, match=r"x\.pt: unreadable engine state"):
        audit_engine_files(tmp_path)


# -- on the real engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and a run cut at step 4 to be corrupted and resumed (copies of it)."""
    out = tmp_path_factory.mktemp("ckpt")
    run(tiny(out, "exp_name=straight", "train.max_steps=6"))
    run(tiny(out, "exp_name=cut", "train.max_steps=4"))
    return out


def resume_copy(runs: Path, tmp_path: Path, name: str) -> str:
    """A copy of the run cut at step 4 (checkpoints 2 and 4) under ``tmp_path/name``; returns ``name``."""
    shutil.copytree(runs / "cut", tmp_path / name)
    return name


def corrupt_ema_truncated(ckpt: Path) -> str:
    path = ckpt / checkpoint.EMA_FILE
    path.write_bytes(path.read_bytes()[:100])
    return "ema.safetensors has 100 bytes"


def corrupt_ema_garbage(ckpt: Path) -> str:
    path = ckpt / checkpoint.EMA_FILE
    path.write_bytes(os.urandom(path.stat().st_size))
    return "ema.safetensors does not match its checksum"


def corrupt_engine_missing(ckpt: Path) -> str:
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    return "mp_rank_00_model_states.pt is missing"


def corrupt_engine_zeroed(ckpt: Path) -> str:
    path = ckpt / "mp_rank_00_model_states.pt"
    path.write_bytes(bytes(path.stat().st_size))
    return "mp_rank_00_model_states.pt does not match its checksum"


def corrupt_trainer_truncated(ckpt: Path) -> str:
    path = ckpt / "trainer_rank0.json"
    path.write_text(path.read_text()[:20])
    return "trainer_rank0.json has 20 bytes"


CORRUPTIONS = [corrupt_ema_truncated, corrupt_ema_garbage, corrupt_engine_missing, corrupt_engine_zeroed,
               corrupt_trainer_truncated]  # fmt: skip


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__[len("corrupt_") :])
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one_bitwise(runs, tmp_path, capsys, corrupt):
    name = resume_copy(runs, tmp_path, "cut")
    reason = corrupt(tmp_path / name / "checkpoints" / "0000004")
    run(tiny(tmp_path, f"exp_name={name}", "train.max_steps=6"), resume=True)
    said = capsys.readouterr().out
    assert "rejected checkpoint 0000004" in said and reason in said, said
    assert "resumed at step 2" in said
    final = tmp_path / name / "checkpoints" / "0000006"
    assert_bitwise(weights(final), weights(runs / "straight" / "checkpoints" / "0000006"))


def test_resume_without_a_latest_pointer_finds_the_newest_checkpoint(runs, tmp_path, capsys):
    name = resume_copy(runs, tmp_path, "nopointer")
    (tmp_path / name / "checkpoints" / "latest").unlink()
    run(tiny(tmp_path, f"exp_name={name}", "train.max_steps=6"), resume=True)
    assert "resumed at step 4" in capsys.readouterr().out
    assert_bitwise(
        weights(tmp_path / name / "checkpoints" / "0000006"), weights(runs / "straight" / "checkpoints" / "0000006")
    )


def plant(ckpt: Path, tmp_path: Path) -> None:
    """An attacker who rewrites the engine file and the manifest to match: only the audit stands in the way."""
    path = ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)  # our own file, read here to rebuild it with a payload
    state["payload"] = Planted(tmp_path / MARKER)
    torch.save(state, path)
    manifest = checkpoint.read_manifest(ckpt)
    checkpoint.write_manifest(ckpt, manifest["step"], manifest["run_id"], {"world_size": 1, "zero_stage": 0})


@pytest.mark.parametrize("how", ["resume", "ckpt"])
def test_a_planted_pickle_is_refused_on_resume_and_nothing_runs(runs, tmp_path, how):
    name = resume_copy(runs, tmp_path, f"planted-{how}")
    ckpt = tmp_path / name / "checkpoints" / "0000004"
    plant(ckpt, tmp_path)
    cfg = tiny(tmp_path, f"exp_name={name}", "train.max_steps=6")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused to load: .*(builtins|io)\.open"):
        run(cfg, resume=True, ckpt=str(ckpt) if how == "ckpt" else None)
    assert not (tmp_path / MARKER).exists()


def test_raw_weights_and_sampling_read_no_pickle(runs, tmp_path):
    """--raw (sample, export, generate) reads model.safetensors: a planted engine file is never opened."""
    from dfm.launch.export import export

    name = resume_copy(runs, tmp_path, "raw")
    plant(tmp_path / name / "checkpoints" / "0000004", tmp_path)
    out = export(tmp_path / name, tmp_path / "raw.safetensors", raw=True)
    assert checkpoint.load_weights(out).keys() == weights(runs / "cut" / "checkpoints" / "0000004")[0].keys()
    assert not (tmp_path / MARKER).exists()


def test_a_second_run_on_the_same_folder_refuses_at_once(tmp_path):
    cfg = tiny(tmp_path, "exp_name=busy", "train.max_steps=2")
    with FolderLock(cfg.run_dir, "training run") as held:  # as a first `dfm train` holds it, once started
        held.announce()
        with pytest.raises(LockedError, match=rf"{cfg.run_dir} is in use by pid {os.getpid()}"):
            run(cfg)
    assert not (cfg.run_dir / "checkpoints").exists()  # the second run touched nothing
    run(cfg)  # released: the folder is usable again
    assert (cfg.run_dir / "checkpoints" / "0000002").is_dir()


def test_a_non_finite_run_stops_before_saving_and_keeps_the_good_checkpoints(runs, tmp_path, monkeypatch):
    import dfm.data

    real = dfm.data.load_digits_tensor

    def with_nan(resolution):  # a data set with bad values, as a broken preprocessing step would leave it
        x, y = real(resolution)
        x[::50] = float("nan")
        return x, y

    monkeypatch.setattr(dfm.data, "load_digits_tensor", with_nan)
    name = resume_copy(runs, tmp_path, "diverge")
    with pytest.raises(NonFiniteError, match=r"step 6: the training loss is nan"):
        run(tiny(tmp_path, f"exp_name={name}", "train.max_steps=10"), resume=True)
    root = tmp_path / name / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(root)] == ["0000004", "0000002"]  # nothing saved or rotated
    assert (root / "latest").read_text() == "0000004"
    assert_bitwise(weights(root / "0000004"), weights(runs / "cut" / "checkpoints" / "0000004"))


def test_a_full_disk_during_a_save_names_the_checkpoint_and_keeps_the_previous(runs, tmp_path, monkeypatch):
    import errno

    name = resume_copy(runs, tmp_path, "full")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*\.staging/0000006 failed: .*No space left"):
        run(tiny(tmp_path, f"exp_name={name}", "train.max_steps=6"), resume=True)
    root = tmp_path / name / "checkpoints"
    assert (root / "latest").read_text() == "0000004" and not (root / "0000006").exists()


def test_a_run_folder_that_cannot_be_written_is_refused_at_start(tmp_path):
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    cfg = load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path / 'blocked'}"])
    with pytest.raises((ConfigError, OSError), match="blocked"):
        run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]  # refused before any work


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(runs, tmp_path):
    name = resume_copy(runs, tmp_path, "cli")
    (tmp_path / name / "checkpoints" / "0000004" / checkpoint.EMA_FILE).write_bytes(b"x")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    ckpt = tmp_path / name / "checkpoints" / "0000004"
    cmd = [sys.executable, "-m", "dfm.launch.cli", "train", "--config", str(ROOT / "configs" / "dfm_digits.yaml"),
           *TINY, f"output_dir={tmp_path}", f"exp_name={name}", "--ckpt", str(ckpt)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.startswith("dfm train:")]
    assert res.returncode == 1 and len(lines) == 1 and "ema.safetensors" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    res = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr and "CheckpointError" in res.stderr
