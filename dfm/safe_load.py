"""Reading ``torch.save`` files that come from elsewhere without running anything they contain.

A ``.pt`` file is a pickle, and unpickling can call any importable function: a checkpoint downloaded from
the internet is code until proven otherwise. :func:`load_torch_file` reads it with torch's weights-only
unpickler, which rebuilds tensors, plain containers and numbers and refuses every other global unless it
is on the caller's explicit allow-list (e.g. ``argparse.Namespace`` for training scripts that save their
arguments). A refused file raises :class:`UnsafeFileError` naming the file and the globals it asked for;
nothing in it has run. A truncated or corrupt file raises :class:`CorruptFileError`, also in one line.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


class UnsafeFileError(ValueError):
    """A file that needs more than tensors, containers and the allow-list to be read (it was not run)."""


class CorruptFileError(ValueError):
    """Not a readable ``torch.save`` file: truncated, corrupt, another format, or pickle opcodes the
    weights-only unpickler does not take (refused like everything else it does not take: nothing ran)."""


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """The globals the file needs beyond the allow-list, found without executing anything.

    Called inside the caller's ``safe_globals`` context, so allowed ones are not listed. The static scan
    needs the zip format; for the legacy format torch's own message names the first refused global.
    """
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError):
            found = []
        if found:
            return sorted(found)
    return _UNSUPPORTED_GLOBAL.findall(message)


def load_torch_file(path: str | Path, allow: Iterable[type] = (), map_location="cpu", mmap: bool = True):
    """``torch.load(path, weights_only=True)`` with ``allow`` (classes or functions) as the only extra globals.

    ``mmap``: memory-map the tensors when the file is in torch's zip format, so that reading one entry of a
    checkpoint that also holds optimizer state does not read the whole file into memory.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        UnsafeFileError: the file needs a global outside the weights-only set and ``allow``.
        CorruptFileError: the file is truncated, corrupt or not a ``torch.save`` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    allow = list(allow)
    mmap = mmap and zipfile.is_zipfile(path)  # torch memory-maps only its zip format
    with torch.serialization.safe_globals(allow):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            message = str(err)
            needed = _unsafe_globals(path, message) if "Weights only load failed" in message else []
            if not needed:  # an opcode the weights-only unpickler does not take, or a damaged stream
                found = _WEIGHTS_UNPICKLER.search(message)
                reason = found.group(1).strip() if found else type(err).__name__
                raise CorruptFileError(
                    f"{path}: not a readable torch.save file (truncated or corrupt?): {reason}"
                ) from None
            allowed = ", ".join(_name(a) for a in allow) or "nothing else"
            raise UnsafeFileError(
                f"{path}: refused to unpickle: it needs {', '.join(needed)} (allowed: tensors, plain containers, "
                f"numbers and {allowed}); nothing in the file was executed"
            ) from None
        except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CorruptFileError(
                f"{path}: not a readable torch.save file (truncated or corrupt?): {type(err).__name__}: {first}"
            ) from None


__all__ = ["CorruptFileError", "UnsafeFileError", "load_torch_file"]
