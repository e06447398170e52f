"""The one precision decision (``dfm.precision``): what ``auto`` means and what autocast changes."""

from __future__ import annotations

import pytest
import torch

from dfm.precision import autocast, resolve_precision


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_autocast_lowers_matmuls_only():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
        # elementwise work, the pyramid's resize and LayerNorm stay in their fp32 inputs' dtype
        assert (a * b + 1).dtype == torch.float32
        assert torch.nn.functional.interpolate(a[None, None], scale_factor=2, mode="bilinear").dtype == torch.float32
        assert torch.nn.functional.layer_norm(a, (4,)).dtype == torch.float32
