"""The dispatcher: mode, one predicate per kernel, honest fallback, and an error only when forced."""

from __future__ import annotations

import logging

import pytest
import torch
from dfm.kernels import reference
from kernel_testing import HAS_CUDA, make

from dfm import files, ops, pyramid


@pytest.fixture(autouse=True)
def _no_override():
    with ops.triton_mode_as(None):
        yield


@pytest.mark.parametrize("raw,mode", [("auto", "auto"), ("1", "on"), ("ON", "on"), ("0", "off"), ("false", "off")])
def test_mode_from_environment(monkeypatch, raw, mode):
    monkeypatch.setenv(ops.ENV_VAR, raw)
    assert ops.triton_mode() == mode


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=ops.ENV_VAR):
        ops.triton_mode()
    with pytest.raises(ValueError):
        ops.set_triton_mode("sometimes")


def test_override_beats_environment(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "0")
    with ops.triton_mode_as("on"):
        assert ops.triton_mode() == "on"
    assert ops.triton_mode() == "off"


@pytest.mark.skipif(HAS_CUDA, reason="CPU fallback behaviour")
def test_auto_on_cpu_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    monkeypatch.setattr(files, "_logged", set())
    x = make((2, 3, 8, 8), torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="dfm.ops"):
        assert not ops.use_triton_laplacian(x)
        for got, want in zip(ops.decompose(x, 3), pyramid.decompose(x, 3)):
            assert torch.equal(got, want)
        assert torch.equal(ops.recompose(pyramid.decompose(x, 3)), pyramid.recompose(pyramid.decompose(x, 3)))
    messages = [r.getMessage() for r in caplog.records if r.name == "dfm.ops" and "laplacian" in r.getMessage()]
    assert len(messages) == 1 and "CPU" in messages[0]


def test_off_is_the_eager_reference_exactly(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "0")
    device = "cuda" if HAS_CUDA else "cpu"
    x = make((2, 3, 8, 8), torch.float32, device)
    t = torch.rand(2, 2, device=device)
    mask = torch.tensor([[True, False], [True, True]], device=device)
    bands = pyramid.decompose(x, 2)
    eps = [torch.randn_like(b) for b in bands]
    assert not ops.use_triton_pyramid_noise(x, eps)
    got = ops.decompose_and_noise(x, 2, t, mask, eps)
    want = reference.noise_stages(bands, t, mask, eps)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(HAS_CUDA, reason="runs the interpreter on CPU tensors")
def test_forced_on_runs_the_kernels_or_raises(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "1")
    x = make((1, 3, 4, 4), torch.float32, "cpu")
    assert ops.use_triton_laplacian(x) and ops.use_triton_noising([x]) and ops.use_triton_pyramid_noise(x, [x])
    with pytest.raises(RuntimeError, match="dtype torch.float64"):
        ops.decompose(x.double(), 2)
    with pytest.raises(RuntimeError, match="grad"):
        ops.decompose(x.clone().requires_grad_(True), 2)
    with pytest.raises(RuntimeError, match="mixed dtypes"):
        ops.noise_stages([x], torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), [x.half()])
    with torch.no_grad():  # without autograd the kernels take it
        assert ops.use_triton_laplacian(x.clone().requires_grad_(True))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.decompose(x, 2)
