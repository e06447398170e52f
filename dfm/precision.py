"""Numeric precision: the one place where ``train.precision`` (and the samplers' ``precision``) is decided.

Training follows the reference (the authors train under ``torch.autocast`` over fp32 weights): parameters,
optimizer master weights and moments, EMA, gradients and their all-reduce, the pyramid, the noising, the
velocity targets and the loss are fp32; under ``bf16`` the matmuls, convolutions and attention run in bf16
through ``torch.autocast``, which leaves every other operator in the dtype of its (fp32) inputs, so the
residual stream, LayerNorm and adaLN stay fp32.

``auto`` is ``bf16`` on CUDA and ``fp32`` on CPU, where bf16 matmuls have no native support on AVX2
machines and ran ~40x slower than fp32 (2-core AMD EPYC).
"""

from __future__ import annotations

import contextlib
import typing
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"`` for ``precision`` (``auto`` | ``bf16`` | ``fp32``) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str = "auto", cache_enabled: bool = True):
    """The forward-pass context for ``precision`` on ``device``: ``torch.autocast`` in bf16, a no-op in fp32.

    ``cache_enabled=False`` for code captured in a CUDA graph: autocast's weight-cast cache would hold
    tensors allocated outside the graph's memory pool.
    """
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache_enabled)


__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "Precision", "autocast", "resolve_precision"]
