"""benchmarks/render.py: pytest-benchmark JSON -> markdown table (ratios vs eager, hardware) and PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RENDER = Path(__file__).resolve().parent.parent / "benchmarks" / "render.py"


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("bench_render", RENDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(group, provider, median, **extra):
    return {
        "group": group,
        "name": f"test_x[{provider}]",
        "params": {"provider": provider},
        "extra_info": {"provider": provider, "device": "NVIDIA H100 80GB HBM3", "torch": "2.13", **extra},
        "stats": {"median": median},
    }


@pytest.fixture
def json_file(tmp_path):
    data = {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11.7"},
        "datetime": "2026-11-25T18:00:00",
        "benchmarks": [
            _bench("train S/2", "eager", 2.0, images_per_s=1.0),
            _bench("train S/2", "compile", 0.5, images_per_s=4.0, mfu=0.4213, first_call_s=31.5),
            _bench("sampler b=1", "cudagraph", 0.001),  # no eager in this group: no ratio
            _bench("step B/8", "eager", 3.0),  # a reference provider, where present, is the baseline instead
            _bench("step B/8", "reference", 2.0, peak_mem_mb=3000.0),
            _bench("step B/8", "engine", 1.0, peak_mem_mb=2900.0),
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_markdown_table_has_ratios_extras_and_hardware(render, json_file, tmp_path):
    md = tmp_path / "out.md"
    assert render.main([str(json_file), "--md", str(md)]) == 0
    text = md.read_text()
    assert text.count("**Hardware:**") == 1
    assert "NVIDIA H100 80GB HBM3 · Test CPU (2 cores) · torch 2.13 · Python 3.11.7 · 2026-11-25" in text
    rows = [line for line in text.splitlines() if line.startswith(("| train", "| sampler", "| step"))]
    assert rows[0].split(" | ")[1:4] == ["eager", "2.000 s", "1.00x"]
    assert rows[1].split(" | ")[1:] == ["compile", "500.00 ms", "4.00x", "4.00", "–", "42.1%", "31.50 |"]
    assert rows[2].split(" | ")[1:] == ["cudagraph", "1.00 ms", "–", "–", "–", "–", "– |"]
    assert [r.split(" | ")[3] for r in rows[3:]] == ["0.67x", "1.00x", "2.00x"]  # against the reference
    assert rows[5].split(" | ")[5] == "2900"  # peak memory column


def test_plot_is_written(render, json_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    render.main([str(json_file), "--md", str(tmp_path / "out.md"), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_empty_file_is_an_error(render, tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    with pytest.raises(SystemExit):
        render.main([str(path)])
