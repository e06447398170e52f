"""The one reading of a ``--device`` argument, shared by the commands that take one.

A device string that torch cannot parse, or one naming a GPU this machine does not have, is refused here in one
line naming the argument, before a command writes anything or loads a model; torch would otherwise fail later,
deep inside the first ``.to(device)``, with a traceback.
"""

from __future__ import annotations

import os

import torch

DEVICE_TYPES = ("cpu", "cuda")


class DeviceError(ValueError):
    """A ``--device`` that is not a device of this machine; the message names the argument."""


def resolve_device(requested: str, rank: int | None = None) -> torch.device:
    """``--device`` as a ``torch.device``: ``"auto"`` is this rank's local GPU (``LOCAL_RANK``, else ``rank``)
    when CUDA is available, else the CPU; ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are checked against the GPUs
    visible here. Raises :class:`DeviceError` for anything else."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", rank or 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise DeviceError(f"--device {requested!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested} was given but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device
