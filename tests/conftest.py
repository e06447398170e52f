"""Suite-wide set-up: the ``cuda`` marker, IEEE fp32 on GPUs, and deterministic CUDA for bitwise tests.

- ``pytest -m cuda`` selects every CUDA-only test: a test is marked when one of its skip conditions says
  ``needs CUDA`` (the project's wording for a CUDA-only skip) or when it is parametrised on the ``"cuda"``
  device. On a machine without CUDA those tests show as skipped; ``gpu_check.sh`` runs them on a GPU.
- fp32 parity tests compare against fp64 references with fp32 tolerances; TF32 convolutions and matmuls
  (cuDNN's default for convolutions) would round to 10 mantissa bits and fail them with correct code.
- The ``deterministic`` fixture makes CUDA runs bitwise reproducible (deterministic algorithms, cuBLAS
  workspace, the math attention backend), for the tests that compare two runs bit for bit.
- On a machine that runs the suite without some of the project's packages (``gpu_check.sh`` on a GPU machine
  lacking DeepSpeed or diffusers), ``DFM_OPTIONAL_PACKAGES`` names them: a test that fails for want of one is
  reported as skipped with ``needs <package>``, in one place rather than a guard in every test. Unset (an
  ordinary install, CI), a missing package fails the tests that need it, as it should.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = "needs CUDA"
OPTIONAL_PACKAGES = tuple(p for p in os.environ.get("DFM_OPTIONAL_PACKAGES", "").split(",") if p)

if HAS_CUDA:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first initialises
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def needs_cuda(item: pytest.Item) -> bool:
    """Whether ``item`` is a CUDA-only test (see the module docstring)."""
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        if str(mark.kwargs.get("reason", "")).startswith(CUDA_SKIP_REASON):
            return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, (str, torch.device)) and str(v).startswith("cuda") for v in params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def deterministic():
    """Bitwise-reproducible CUDA kernels for the duration of a test (a no-op without CUDA)."""
    if not HAS_CUDA:
        yield
        return
    from dfm import attention

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with attention.forced_backend("math"):  # SDPA's fused backward kernels accumulate with atomics
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _missing_optional_package(excinfo) -> str | None:
    """The optional package whose absence raised ``excinfo``, if that is what it is."""
    if excinfo is None or not excinfo.errisinstance(ModuleNotFoundError):
        return None
    name = excinfo.value.name or ""
    for package in OPTIONAL_PACKAGES:
        if name == package or name.startswith(package + ".") or package.startswith(name + "."):
            try:
                present = importlib.util.find_spec(package) is not None
            except ModuleNotFoundError:  # a parent package (nvidia) is missing too
                present = False
            return None if present else package
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    package = _missing_optional_package(call.excinfo)
    if package is not None:
        report = outcome.get_result()
        report.outcome = "skipped"
        line = (item.location[1] or 0) + 1  # location is 0-based; pytest reports skips 1-based
        report.longrepr = (str(item.path), line, f"Skipped: needs {package} (not installed)")
