"""dfm.files: atomic writes (whole or absent, old content kept on failure), log-once, environment switches."""

from __future__ import annotations

import logging

import pytest

from dfm.files import atomic_open, atomic_path, env_switch, log_once, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    assert (tmp_path / "b.json").read_text().replace(" ", "").replace("\n", "") == '{"x":1}'


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(path, "wb") as f:
        f.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("killed")
    assert not (tmp_path / "c.bin").exists()
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(path, "a"):
            pass


def test_log_once_logs_each_key_once(caplog):
    logger = logging.getLogger("dfm.test_files")
    with caplog.at_level(logging.INFO, logger="dfm.test_files"):
        assert log_once(logger, ("k", 1), "first %s", "time")
        assert not log_once(logger, ("k", 1), "again")
        assert log_once(logger, ("k", 2), "other key")
    assert [r.getMessage() for r in caplog.records] == ["first time", "other key"]


def test_env_switch_names_the_variable_on_a_typo(monkeypatch):
    aliases = {"on": "on", "1": "on", "off": "off"}
    monkeypatch.delenv("DFM_TEST_SWITCH", raising=False)
    assert env_switch("DFM_TEST_SWITCH", aliases, "off") == "off"
    monkeypatch.setenv("DFM_TEST_SWITCH", " 1 ")
    assert env_switch("DFM_TEST_SWITCH", aliases, "off") == "on"
    monkeypatch.setenv("DFM_TEST_SWITCH", "yes please")
    with pytest.raises(ValueError, match="DFM_TEST_SWITCH"):
        env_switch("DFM_TEST_SWITCH", aliases, "off")


def test_folder_lock_is_exclusive_names_its_holder_and_leaves_a_refused_folder_alone(tmp_path):
    from dfm.files import FolderLock, LockedError

    first = FolderLock(tmp_path / "run", "training run").acquire()  # a descriptor of its own: flock conflicts
    with pytest.raises(LockedError, match=r"run is in use by another process: one training run per folder"):
        FolderLock(tmp_path / "run", "training run").acquire()
    first.release()  # never announced: the lock file and the folders it made are gone again
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    FolderLock(tmp_path / "kept" / "a" / "b", "training run").acquire().release()
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]  # only the folders it made, not one that was there
    first = FolderLock(tmp_path / "run", "training run").acquire()
    first.announce()
    with pytest.raises(LockedError, match=r"in use by pid \d+ on "):
        FolderLock(tmp_path / "run", "training run").acquire()
    first.release()
    assert (tmp_path / "run" / ".lock").read_bytes() == b""  # a free lock names no holder
    with FolderLock(tmp_path / "run", "training run"):  # free again; its file existed, so it is kept
        pass
    assert (tmp_path / "run" / ".lock").read_bytes() == b""
