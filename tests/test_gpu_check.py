"""``benchmarks/gpu_check.sh`` as the GPU machine will run it, dry, on this machine.

The GPU machine has torch, Triton and the test tools but not DeepSpeed, diffusers, DALI or flash-attn, and
the project is not installed there. Here that environment is simulated by a ``sitecustomize`` that hides those
packages from the import system (``import`` fails and ``find_spec`` says None, as when they are absent) and
drops the editable install's finder, so ``dfm`` can only come from the script's own package view. The dry run
must then import everything, collect every CUDA-only test with no collection error, import every benchmark
module and write its four files: whatever breaks that here would have cost a GPU loan.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = ("deepspeed", "diffusers", "nvidia", "flash_attn")

BLOCKER = f'''
import importlib.machinery
import importlib.metadata
import os
import sys

HIDDEN = {HIDDEN!r}


class _WithoutHidden(importlib.machinery.PathFinder):
    """The path finder, blind to the packages the GPU machine lacks (modules and their metadata)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, context=None, **kwargs):
        context = context or importlib.metadata.DistributionFinder.Context(**kwargs)
        for dist in super().find_distributions(context):
            name = dist.metadata["Name"].lower().replace("-", "_")
            if not any(name == hidden or name.startswith(hidden + "_") for hidden in HIDDEN):
                yield dist


installed = os.environ.get("HIDE_INSTALL") != "1"  # the project is not installed there
sys.meta_path[:] = [
    _WithoutHidden if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
    if installed or not getattr(finder, "__module__", "").startswith("__editable__")  # setuptools' finder class
]
'''


@pytest.fixture(scope="module")
def device_like_env(tmp_path_factory) -> dict[str, str]:
    blocker = tmp_path_factory.mktemp("device_site")
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OUT", "WHEELS"))}
    env.update(PYTHONPATH=str(blocker), HIDE_INSTALL="1", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    env.update(OMP_NUM_THREADS="1")
    return env


def test_the_blocker_hides_what_the_gpu_machine_lacks(device_like_env):
    code = (
        "import importlib.util, importlib.metadata\n"
        "assert importlib.util.find_spec('deepspeed') is None and importlib.util.find_spec('diffusers') is None\n"
        "try:\n    importlib.metadata.version('deepspeed')\nexcept importlib.metadata.PackageNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('deepspeed metadata still visible')\n"
        "try:\n    import dfm\nexcept ModuleNotFoundError:\n    print('no dfm')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=device_like_env, cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no dfm"  # outside the checkout the project is not importable: not installed


def test_dry_run_collects_everything_and_writes_its_four_files(tmp_path, device_like_env):
    out_dir = tmp_path / "out"
    env = {**device_like_env, "OUT": str(out_dir), "WHEELS": str(tmp_path / "no-wheels")}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["benchmarks.md", "logs.tar.gz", "results.json", "summary.md"]  # the machine returns at most 8

    summary = (out_dir / "summary.md").read_text()
    assert "no CUDA device" in summary
    assert "deepspeed missing" in summary and "diffusers missing" in summary  # the simulated machine, not ours
    assert "broken" not in summary  # every package present imports
    assert "imports: ok" in summary and "/view/dfm" in summary  # dfm came from the script's package view
    steps = ("wheels", "environment", "kernels_cpu", "benchmarks_import", "kernels", "train_step", "sampler",
             "attention", "cuda_tests", "cuda_compile_tests", "kernels_compile")  # fmt: skip
    for step in steps:  # each GPU step's selection collects at least one test (pytest exits 5 on none)
        assert f"| {step} | ok |" in summary, summary
    assert "errors: 0" in summary and "failed:" not in summary
    assert "Device-to-device copy" in summary and "share of copy" in summary  # real rows went through the summary

    with tarfile.open(out_dir / "logs.tar.gz") as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    collected = logs["logs/benchmarks_import.log"]
    for module in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert f"benchmarks/{module.name}::" in collected, f"{module.name} was not imported by the dry run"
    cuda = logs["logs/cuda_tests.log"]
    assert " skipped" in cuda and "error" not in cuda.lower().replace("collection errors", "")


def test_a_test_that_needs_a_missing_optional_package_is_skipped_naming_it(device_like_env):
    """tests/conftest.py: on a machine without DeepSpeed a trainer test is a skip saying so, not a failure."""
    env = {**device_like_env, "HIDE_INSTALL": "0", "DFM_OPTIONAL_PACKAGES": "deepspeed,diffusers"}
    test = "tests/test_engine.py::test_one_rank_at_zero_0_skips_the_gradient_all_reduce"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", test],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert "1 skipped" in run.stdout and "needs deepspeed (not installed)" in run.stdout, run.stdout[-2000:]
    del env["DFM_OPTIONAL_PACKAGES"]  # an ordinary install: a missing DeepSpeed is a failure, not a skip
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", test],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout[-2000:]
