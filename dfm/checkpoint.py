"""Run checkpoints: atomic, verified, resumable exactly, and nothing in them is unpickled by us.

A checkpoint is a directory ``<run>/checkpoints/<step:07d>/`` holding

- the engine's resumable state (optimizer, ZeRO shards: written and read by the ``EngineState`` the launch
  layer provides, ``dfm.launch.checkpoint``),
- ``model.safetensors`` (the trained weights) and ``ema.safetensors`` (the EMA), fp32, loadable anywhere,
- ``trainer_rank<r>.json`` per rank (step, data position, RNG states) and ``config.yaml``,
- ``manifest.json``: the run's id, step, layout, and the size and SHA-256 of every file above.

Saving: every rank writes into ``checkpoints/.staging/<tag>``; when all have finished, rank 0 hashes the
files, writes the manifest, fsyncs the folder and renames it into place, then replaces the ``latest``
pointer -- each step atomic, so a save interrupted anywhere leaves the previous checkpoint and the pointer
to it intact. Nothing is saved from a non-finite state (``NonFiniteError``), and rotation deletes only
older checkpoints of the same run (same ``run_id``), never those another run left in the folder.

Resuming: :func:`find_resumable` takes the checkpoint ``latest`` names (a plain tag inside the folder,
nothing else is followed) or, without a usable pointer, the newest checkpoint found by scanning; a
checkpoint whose files are missing, truncated or altered (size or checksum) is rejected with a message
naming the file, and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfm import distributed
from dfm.files import default_mode, fsync_dir, fsync_file, write_text_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
STAGING = ".staging"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TAG = re.compile(r"^\d{7,}$")
DERIVED = ("universal",)  # folders made from a checkpoint after it was saved (not part of its manifest)
_HASH_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class NonFiniteError(RuntimeError):
    """Training reached a non-finite state; nothing is saved from it."""


class EngineState(Protocol):
    """What the launch layer provides for the engine's part of a checkpoint (``dfm.launch.checkpoint``)."""

    def save(self, folder: Path) -> None:
        """Write this rank's resumable engine state (optimizer, shards) into ``folder``."""

    def load(self, folder: Path) -> None:
        """Restore the engine from ``folder``."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The full trained weights on rank 0 (empty elsewhere). Collective."""


def tag_of(step: int) -> str:
    return f"{step:07d}"


# -- RNG and trainer state (JSON: nothing to unpickle) -------------------------------------------------


def rng_state() -> dict:
    """The process-global RNG states as JSON values (the training draws have their own per-step seeds)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def trainer_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"trainer_rank{rank}.json"


def load_trainer_state(folder: str | Path, rank: int) -> dict | None:
    """Rank ``rank``'s trainer state in ``folder``, or None when that rank did not exist in the saving run."""
    path = trainer_file(Path(folder), rank)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable trainer state ({err})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a trainer state (no 'step')")
    return state


# -- weights -------------------------------------------------------------------------------------------


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file of weights (``ema.safetensors``, ``model.safetensors``, an exported file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weights ({' '.join(str(err).split())})") from None


def load_ema_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """EMA state dict from a checkpoint (or imported) directory, or an exported ``.safetensors`` file."""
    ckpt = Path(ckpt)
    return load_weights(ckpt / EMA_FILE if ckpt.is_dir() else ckpt)


def load_model_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights of a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MODEL_FILE).is_file() and (ckpt_dir / EMA_FILE).is_file():
        raise FileNotFoundError(f"{ckpt_dir} holds no {MODEL_FILE}: only the EMA weights are saved there")
    return load_weights(ckpt_dir / MODEL_FILE)


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights with non-finite values, naming ``source`` and the tensors (what sampling or training
    them would only turn into black images or a NaN loss much later)."""
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {', '.join(bad[:6])}{more}")


def all_finite(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> bool:
    """Whether every value is finite (one fused reduction and one host read; for save and log steps)."""
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack(torch._foreach_norm(tensors)).float().isfinite().all())


# -- manifest and verification -------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in DERIVED and rel.name != MANIFEST:
            out.append(path)
    return out


def write_manifest(folder: Path, step: int, run_id: str, layout: dict) -> dict:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in _checkpoint_files(folder)
    }
    manifest = {"format": MANIFEST_FORMAT, "step": step, "run_id": run_id, **layout, "files": files}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} " + ("is not a checkpoint directory" if folder.exists() else "does not exist"))
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete or was written by an older version")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest")
    return manifest


def verify(folder: str | Path, checksums: bool = True, only: Iterable[str] | None = None) -> dict:
    """The manifest of ``folder`` after checking every file it lists (size, and SHA-256 unless ``checksums``
    is False), or only the files ``only`` (those a reader is about to read: each must be listed); raises
    :class:`CheckpointError` naming the first bad file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    if only is not None:
        unlisted = [name for name in only if name not in files]
        if unlisted:
            raise CheckpointError(
                f"{folder / MANIFEST} does not list {', '.join(unlisted)}: the checkpoint was altered"
            )
        files = {name: files[name] for name in only}
    for rel, want in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{folder / MANIFEST} lists a file outside the checkpoint: {rel}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != want["size"]:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the manifest says {want['size']}")
        if checksums and sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum: the file was altered or corrupted")
    return manifest


# -- finding checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(ckpt_root: str | Path) -> list[Path]:
    """Every finished-looking checkpoint directory under ``ckpt_root``, newest step first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and TAG.match(p.name))
    return sorted(found, key=lambda p: -int(p.name))


def pointed(ckpt_root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None. The pointer holds a tag, nothing else: a path,
    ``..`` or a link out of the folder is refused."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not TAG.match(tag):
        raise CheckpointError(f"{pointer} holds {tag!r}, not a checkpoint tag (7+ digits)")
    path = root / tag
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{pointer} names {path}, which leads outside {root}")
    return path if path.is_dir() else None


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names (when it exists), else the newest complete one by scan; None if none.

    Cheap (sizes only): for reading weights. Resuming uses :func:`find_resumable`, which also verifies checksums.
    """
    for path in _candidates(ckpt_root):
        try:
            verify(path, checksums=False)
            return path
        except CheckpointError:
            continue
    return None


def _candidates(ckpt_root: str | Path, report: Callable[[str], None] | None = None) -> list[Path]:
    """The pointed checkpoint first (an unusable pointer is reported and ignored), then the rest newest first."""
    try:
        first = pointed(ckpt_root)
    except CheckpointError as err:
        if report is not None:
            report(f"ignoring the pointer: {err}")
        first = None
    rest = [p for p in checkpoint_dirs(ckpt_root) if p != first]
    return ([first] if first is not None else []) + rest


def find_resumable(ckpt_root: str | Path, report: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume: ``latest`` if intact, else the newest intact one; each rejected checkpoint
    is reported with the reason (the bad file). None when the folder holds no checkpoint at all."""
    candidates = _candidates(ckpt_root, report)
    for path in candidates:
        try:
            verify(path)
            return path
        except CheckpointError as err:
            report(f"rejected checkpoint {path.name}: {err}")
    if candidates:
        raise CheckpointError(f"no intact checkpoint in {ckpt_root} (tried {', '.join(p.name for p in candidates)})")
    return None


# -- saving ---------------------------------------------------------------------------------------------


@dataclass
class SaveRequest:
    """Everything one save writes besides the engine state."""

    step: int
    run_id: str
    trainer_state: dict  # this rank's (JSON values)
    config_yaml: str
    layout: dict  # world_size, zero_stage: what a resume needs to read the engine state
    keep: int = 2


def save_checkpoint(ckpt_root: str | Path, request: SaveRequest, engine: EngineState, ema) -> Path:
    """Save ``<ckpt_root>/<step:07d>`` atomically (every rank calls this; see the module docstring).

    ``ema`` has ``state_dict()`` giving the full EMA weights on rank 0 (a collective under ZeRO-3). Raises
    :class:`NonFiniteError` before writing anything if the weights or the EMA are not finite, and
    :class:`CheckpointError` if any rank fails to write (a full disk): on every rank, so none is left waiting.
    """
    root, tag, rank = Path(ckpt_root), tag_of(request.step), distributed.rank()
    staging = root / STAGING / tag
    weights, ema_weights = engine.weights(), ema.state_dict()  # collectives: every rank takes part
    finite = rank != 0 or (all_finite(weights.values()) and all_finite(ema_weights.values()))
    if not distributed.all_ok(finite):
        raise NonFiniteError(f"step {request.step}: the weights or the EMA are not finite; nothing was saved")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of an interrupted save
        staging.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    _on_every_rank(lambda: _write_rank_files(staging, request, engine, weights, ema_weights, rank), staging)

    def commit():
        if rank == 0:
            _commit(root, staging, request)

    _on_every_rank(commit, staging)
    return root / tag


def _on_every_rank(write: Callable[[], object], staging: Path) -> None:
    """Run one phase of a save on this rank; if it fails on any rank (a full disk), every rank raises."""
    error = None
    try:
        write()
    except (OSError, CheckpointError) as err:
        error = err
    if not distributed.all_ok(error is None):
        if isinstance(error, CheckpointError):
            raise error
        reason = f"{error}" if error is not None else "another rank failed to write its part"
        raise CheckpointError(f"saving checkpoint {staging} failed: {reason}") from error


def _write_rank_files(staging: Path, request: SaveRequest, engine: EngineState, weights, ema_weights, rank: int):
    engine.save(staging)
    write_text_atomic(trainer_file(staging, rank), json.dumps(request.trainer_state))
    if rank == 0:
        _save_weights(weights, staging / MODEL_FILE)
        _save_weights(ema_weights, staging / EMA_FILE)
        write_text_atomic(staging / CONFIG_FILE, request.config_yaml)


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    weights = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(weights, str(path))
    default_mode(path)  # safetensors writes 0600; the checkpoint's other files follow the umask
    fsync_dir(path.parent)


def _commit(root: Path, staging: Path, request: SaveRequest) -> None:
    """Rank 0, all files written: manifest, rename into place, pointer, rotation."""
    write_manifest(staging, request.step, request.run_id, request.layout)
    for path in _checkpoint_files(staging):
        fsync_file(path)  # the rename below must not outlive the data it names
    fsync_dir(staging)
    final = root / tag_of(request.step)
    old = None
    if final.exists():  # re-saving a step (a resume from an earlier checkpoint): replace it whole, atomically
        owner = _run_id(final)
        if owner != request.run_id:
            raise CheckpointError(f"{final} belongs to another run ({owner}); refusing to replace it")
        old = root / STAGING / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(root)
    write_pointer(root, final.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(root, request.keep, request.run_id, current=request.step)


def write_pointer(root: Path, tag: str) -> None:
    """Point ``latest`` at checkpoint ``tag`` (the last step of a save)."""
    write_text_atomic(root / LATEST, tag)


def _run_id(folder: Path) -> str | None:
    try:
        return read_manifest(folder).get("run_id")
    except CheckpointError:
        return None  # not provably anyone's


def prune(ckpt_root: Path, keep: int, run_id: str, current: int) -> list[str]:
    """Keep the newest ``keep`` checkpoints of run ``run_id`` up to step ``current``; others' are never touched.

    Checkpoints of this run *after* ``current`` are a future this run abandoned when it resumed from an
    earlier one: they are moved to ``.staging/superseded/`` (kept, but never resumed from or counted).
    """
    ours = [p for p in checkpoint_dirs(ckpt_root) if _run_id(p) == run_id]
    removed = []
    for path in (p for p in ours if int(p.name) > current):
        aside = ckpt_root / STAGING / "superseded" / path.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    for path in [p for p in ours if int(p.name) <= current][keep:]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


__all__ = [
    "CheckpointError",
    "EngineState",
    "NonFiniteError",
    "SaveRequest",
    "all_finite",
    "check_finite",
    "checkpoint_dirs",
    "find_resumable",
    "latest_checkpoint",
    "load_ema_weights",
    "load_model_weights",
    "load_trainer_state",
    "load_weights",
    "non_finite",
    "prune",
    "read_manifest",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify",
]
