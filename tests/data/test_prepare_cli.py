"""``dfm prepare`` (launch/prepare.py): the ``prepared`` fixture runs convert and encode through it; validate."""

from __future__ import annotations


def test_cli_validate_reports_the_store(prepared, capsys):
    from dfm.launch.prepare import main

    assert main(["validate", "--data-dir", str(prepared), "--world-size", "2", "--deep"]) == 0
    assert "packed store, 15 samples of (8, 16, 16) float32, 3 classes: ok" in capsys.readouterr().out
