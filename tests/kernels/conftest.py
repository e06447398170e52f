"""Shared set-up of the kernel parity tests.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. Triton picks interpreter or
compiler when a ``@triton.jit`` function is defined, so ``TRITON_INTERPRET=1`` goes into the
environment here, at import time: pytest imports this file before the test modules of this folder, and
``dfm.ops`` imports the kernel modules only when it first launches one, so nothing outside this folder
needs to know. With CUDA the same tests run compiled on the GPU and the CPU cases are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dfm.kernels import common  # noqa: E402  (imported after the environment is set)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_is_active():
    if not HAS_CUDA and not common.INTERPRETED:
        pytest.fail("dfm.kernels was imported before TRITON_INTERPRET=1 was set; the kernels cannot run on CPU")
