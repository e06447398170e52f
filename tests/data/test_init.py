"""The package's choice of loader (``dfm.data``): the one predicate for DALI and what it accepts."""

from __future__ import annotations

import logging

import pytest

from dfm import files
from dfm.data import use_dali


def test_loader_predicate(caplog, monkeypatch):
    assert use_dali("torch", "cuda") is False
    monkeypatch.setattr(files, "_logged", set())  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="dfm.data"):
        assert use_dali("auto", "cpu") is False  # the DataLoader is the CPU choice
        assert use_dali("auto", "cpu") is False
    fallbacks = [r for r in caplog.records if "using the PyTorch DataLoader" in r.getMessage()]
    assert len(fallbacks) == 1  # the fallback is said once, not per loader built
    with pytest.raises(ValueError, match="'auto', 'dali' or 'torch'"):
        use_dali("fast", "cpu")
