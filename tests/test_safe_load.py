"""The weights-only loader: allow-listed globals load, anything else is refused without being run, and
truncated or foreign files fail in one line naming the file."""

import argparse
import pickle

import pytest
import torch

from dfm.safe_load import CorruptFileError, UnsafeFileError, load_torch_file


class WritesMarker:
    """Unpickling this runs ``exec``, which writes the marker file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


@pytest.fixture
def state():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_malicious_file_is_refused_and_nothing_runs(tmp_path, state, zipped):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"ema": state, "payload": WritesMarker(marker)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeFileError) as err:
        load_torch_file(path, allow=(argparse.Namespace,))
    message = str(err.value)
    assert str(path) in message and "exec" in message and "\n" not in message
    assert not marker.exists()
    # the file really is malicious: an ordinary unpickling runs the payload
    if zipped:
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            torch.load(f, weights_only=False)
    assert marker.read_text() == "executed"


def test_allow_list_is_explicit(tmp_path, state):
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(model="DFM-SiT-XL/2", num_steps_per_scale=[40, 10], cfg_prob=0.1)
    torch.save({"ema": state, "args": args, "steps": 7}, path)
    with pytest.raises(UnsafeFileError, match=r"ckpt\.pt: refused to unpickle: it needs argparse\.Namespace"):
        load_torch_file(path)
    out = load_torch_file(path, allow=(argparse.Namespace,))
    assert out["args"] == args and out["steps"] == 7
    for k, v in state.items():
        assert torch.equal(out["ema"][k], v) and out["ema"][k].dtype == v.dtype


@pytest.mark.parametrize("mmap", [True, False])
def test_plain_state_dict_loads_exactly(tmp_path, state, mmap):
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    out = load_torch_file(path, mmap=mmap)
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_file_is_named_in_one_line(tmp_path, state, damage):
    good = tmp_path / "good.pt"
    torch.save({"ema": state}, good)
    data = {"truncated": good.read_bytes()[:-100], "garbage": b"not a checkpoint at all", "empty": b""}[damage]
    path = tmp_path / f"{damage}.pt"
    path.write_bytes(data)
    with pytest.raises(CorruptFileError) as err:
        load_torch_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch_file(tmp_path / "nope.pt")


def test_errors_are_value_errors_for_callers_that_catch_bad_input():
    assert issubclass(UnsafeFileError, ValueError) and issubclass(CorruptFileError, ValueError)
    assert not issubclass(UnsafeFileError, pickle.UnpicklingError)
