"""The project's parity rule, in one place: a fast path is as accurate as torch in the same dtype.

``max|fast - ref| <= 2 * max|torch_same_dtype - ref| + atol`` against an fp64 (or fp32) reference: the
tolerance follows torch's own rounding error, so it tightens with the dtype and can fail.
"""

from __future__ import annotations

import torch


def max_err(a, b) -> float:
    """max |a - b| in fp64 over a tensor or matching lists of tensors (empty tensors count as 0)."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    assert len(a) == len(b)
    return max(((x.double().cpu() - y.double().cpu()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def parity(fast, torch_same_dtype, ref, atol: float) -> tuple[bool, float, float]:
    """(rule holds, error of the fast path, error of torch in the same dtype), both against ``ref``."""
    err_fast, err_torch = max_err(fast, ref), max_err(torch_same_dtype, ref)
    return err_fast <= 2 * err_torch + atol, err_fast, err_torch


def assert_parity(fast, torch_same_dtype, ref, atol: float, what: str = "fast path") -> None:
    ok, err_fast, err_torch = parity(fast, torch_same_dtype, ref, atol)
    assert ok, f"{what}: error {err_fast:.3g} vs torch's {err_torch:.3g} in the same dtype (atol {atol:.3g})"
