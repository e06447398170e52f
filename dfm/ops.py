"""Dispatch between the Triton kernels in ``dfm.kernels`` and their eager PyTorch references.

The objective and the sampler call these functions, never a kernel directly. One predicate per kernel
(:func:`use_triton_laplacian`, :func:`use_triton_noising`, :func:`use_triton_pyramid_noise`) decides;
each checks the mode, that Triton imports, the device, the dtype and autograd, and logs the reason for
falling back once. The mode comes from :func:`set_triton_mode` or else the ``DFM_TRITON`` environment
variable:

- ``auto`` (default): Triton for CUDA tensors when it can run, the reference otherwise.
- ``1`` / ``on``: Triton or an error saying why not. CPU tensors run in Triton's interpreter, which
  needs ``TRITON_INTERPRET=1`` in the environment before the kernels are first imported (tests only:
  the interpreter is orders of magnitude slower than the reference).
- ``0`` / ``off``: always the reference.

The kernel modules are imported lazily, on the first call that will launch one, so importing ``dfm``
never defines a ``@triton.jit`` function before a test harness has had the chance to select the
interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor

from dfm.files import ON_OFF_AUTO, env_switch, log_once
from dfm.kernels import DTYPES, MAX_NUMEL, reference

log = logging.getLogger(__name__)

ENV_VAR = "DFM_TRITON"
MODES = ON_OFF_AUTO

_mode_override: str | None = None
_modules: dict[str, ModuleType] = {}
_import_error: list[BaseException] = []


# -- mode -----------------------------------------------------------------------------------------------


def triton_mode() -> str:
    """The current mode: ``"auto"``, ``"on"`` or ``"off"`` (override first, then ``DFM_TRITON``)."""
    if _mode_override is not None:
        return MODES[_mode_override.strip().lower()]
    return env_switch(ENV_VAR, MODES, "auto")


def set_triton_mode(mode: str | None) -> None:
    """Force ``"on"`` / ``"off"`` / ``"auto"`` for this process (``None`` returns to ``DFM_TRITON``)."""
    global _mode_override
    if mode is not None and str(mode).strip().lower() not in MODES:
        raise ValueError(f"Triton mode must be one of {sorted(MODES)} or None, got {mode!r}")
    _mode_override = None if mode is None else str(mode)


@contextmanager
def triton_mode_as(mode: str | None):
    """Context manager form of :func:`set_triton_mode`."""
    previous = _mode_override
    set_triton_mode(mode)
    try:
        yield
    finally:
        set_triton_mode(previous)


# -- predicates ------------------------------------------------------------------------------------------


def _kernel_module(name: str) -> ModuleType | None:
    """``dfm.kernels.<name>``, imported on first use; ``None`` when Triton does not import."""
    if name not in _modules and not _import_error:
        try:
            _modules[name] = importlib.import_module(f"dfm.kernels.{name}")
        except ImportError as err:  # no Triton in this environment
            _import_error.append(err)
    return _modules.get(name)


def _tensors_unfit(tensors: list[Tensor]) -> str | None:
    """Why these tensors are no input for any kernel, or None."""
    x = tensors[0]
    if any(t.device != x.device for t in tensors):
        return "tensors on several devices"
    if any(t.dtype != x.dtype for t in tensors):
        return "mixed dtypes"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (kernels take float32, float16, bfloat16)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs require grad (the kernels have no backward)"
    if any(t.numel() > MAX_NUMEL for t in tensors):
        return "more than 2^31 elements"
    return None


def _device_unfit(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` in this process (before importing them), or None."""
    if device.type == "cpu":
        if triton_mode() != "on":
            return "CPU tensors (Triton runs on CPU only in its interpreter, when forced)"
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "CPU tensors need TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"device {device.type}"
    return None


def _why_not(module: str, tensors: list[Tensor]) -> str | None:
    """Reason the kernels of ``module`` cannot take these tensors, or ``None`` when they can."""
    device = tensors[0].device
    reason = _tensors_unfit(tensors) or _device_unfit(device)
    if reason is not None:
        return reason
    if _kernel_module(module) is None:
        return f"Triton does not import ({_import_error[0]})"
    interpreted = importlib.import_module("dfm.kernels.common").INTERPRETED
    if device.type == "cpu" and not interpreted:
        return "the kernels were imported before TRITON_INTERPRET=1 was set"
    if device.type == "cuda" and interpreted:
        return "TRITON_INTERPRET=1 was set when the kernels were imported (they would run interpreted)"
    return None


def _decide(kernel: str, module: str, tensors: list[Tensor]) -> bool:
    mode = triton_mode()
    if mode == "off":
        return False
    reason = _why_not(module, tensors)
    if reason is None:
        return True
    if mode == "on":
        forced = f"Triton is forced ({ENV_VAR}=1 or set_triton_mode)"
        raise RuntimeError(f"{forced} but the {kernel} kernel cannot run: {reason}")
    log_once(log, (kernel, reason), "%s: using the PyTorch reference (%s)", kernel, reason)
    return False


def use_triton_laplacian(x: Tensor | list[Tensor]) -> bool:
    """Whether :func:`decompose` / :func:`recompose` run the fused Laplacian kernels on ``x``."""
    return _decide("laplacian", "laplacian", [x] if isinstance(x, Tensor) else list(x))


def use_triton_noising(bands: list[Tensor]) -> bool:
    """Whether :func:`noise_stages` runs the fused noising kernel on these bands."""
    return _decide("noising", "noising", list(bands))


def use_triton_pyramid_noise(x: Tensor, eps: list[Tensor]) -> bool:
    """Whether :func:`decompose_and_noise` runs the fused decompose + noise kernel on ``x`` and ``eps``."""
    return _decide("pyramid_noise", "pyramid_noise", [x, *eps])


# -- ops -------------------------------------------------------------------------------------------------


def decompose(x: Tensor, stages: int) -> list[Tensor]:
    """Laplacian pyramid of ``x`` (B, C, H, W), coarsest stage first (:func:`dfm.kernels.reference.decompose`)."""
    if use_triton_laplacian(x):
        return _modules["laplacian"].decompose(x, stages)
    return reference.decompose(x, stages)


def recompose(bands: list[Tensor]) -> Tensor:
    """Inverse of :func:`decompose` (:func:`dfm.kernels.reference.recompose`)."""
    if use_triton_laplacian(bands):
        return _modules["laplacian"].recompose(bands)
    return reference.recompose(bands)


def noise_stages(bands: list[Tensor], t: Tensor, mask: Tensor, eps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per stage ``x_t`` (zero where masked) and ``v = eps - x`` (:func:`dfm.kernels.reference.noise_stages`)."""
    if use_triton_noising(list(bands) + list(eps)):
        return _modules["noising"].noise_stages(bands, t, mask, eps)
    return reference.noise_stages(bands, t, mask, eps)


def decompose_and_noise(
    x: Tensor, stages: int, t: Tensor, mask: Tensor, eps: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """``noise_stages(decompose(x, stages), t, mask, eps)`` without materialising the bands.

    The training step's path: on CUDA one fused launch per pyramid level (one in all for two stages).
    """
    if use_triton_pyramid_noise(x, eps):
        return _modules["pyramid_noise"].decompose_and_noise(x, stages, t, mask, eps)
    return reference.decompose_and_noise(x, stages, t, mask, eps)


def band_placeholders(x: Tensor, stages: int) -> list[Tensor]:
    """Zero-memory stand-ins with the shape, dtype and device of every band of ``x``, coarsest first.

    Lets the objective draw the noise before the (fused) decomposition without computing the bands.
    """
    reference.check_input(x, stages)
    B, C, H, W = x.shape
    return [x.new_empty(()).expand(B, C, h, w) for h, w in reference.stage_shapes(H, W, stages)]
