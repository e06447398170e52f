"""Small process-wide helpers every layer uses: atomic files, log-once messages, environment switches.

Atomic files. A reader (another rank, a resumed run, a crash-restarted job) must see a file whole or not
at all: everything is written under a temporary name in the destination's folder, flushed and fsynced,
then renamed into place with ``os.replace`` (atomic on POSIX), and the folder is fsynced so that the rename
itself survives a power loss. The temporary name carries the process id, so several ranks may write the
same file at once. A failed write leaves the old file (if any) and removes its temporary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# -- atomic files ------------------------------------------------------------------------------------------


def temporary_name(path: str | Path) -> Path:
    """The hidden sibling ``.<name>.tmp<pid>`` a write of ``path`` goes through."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or creation inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """fsync ``tmp``, rename it to ``path`` and fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def default_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open`` would (0666 less the umask): some writers (safetensors'
    ``save_file``) create 0600 files, which would make weights private while the configs beside them are not."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (by any writer); renamed into place on success
    with the mode a plain ``open`` gives (:func:`default_mode`)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        default_mode(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """``open`` for writing whose file appears at ``path`` only once complete (``mode`` ``"w"`` or ``"wb"``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success its files are fsynced and it is renamed to
    ``path`` (which must not exist), so the folder appears whole or not at all; on failure it is removed."""
    path = Path(path)
    staging = temporary_name(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for child in staging.rglob("*"):
            if child.is_file():
                fsync_file(child)
        fsync_dir(staging)
        os.replace(staging, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=indent)


# -- output files -------------------------------------------------------------------------------------------


def check_output(
    path: str | Path,
    flag: str = "--out",
    *,
    force: bool = False,
    written_by: str | None = None,
    inputs: tuple[str | Path, ...] = (),
    makes_folders: bool = True,
) -> Path:
    """Refuse, before any work, an output that could not or should not be written at the end: ``path`` (the
    argument ``flag`` names, or a file ``written_by`` it) is a folder, one of the command's ``inputs``, an
    existing file without ``force``, or in a folder that cannot be written (or, unless the writer
    ``makes_folders``, that does not exist). Writability is tried with a probe file, removed at once: permission
    bits say nothing about read-only or virtual file systems, nor to root."""
    path = Path(path)
    what = f"{path} (written beside {flag} {written_by})" if written_by else f"{flag} {path}"
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder; give a file name")
    for source in inputs:
        if Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise ValueError(f"{what} is an input of this command; it would be overwritten")
    if path.exists() and not force:
        raise FileExistsError(f"{what} already exists; pass --force to replace it")
    if not makes_folders and not path.parent.is_dir():
        raise FileNotFoundError(f"{what}: the folder {path.parent} does not exist")
    check_can_create(path, what)
    return path


def check_can_create(path: str | Path, what: str) -> None:
    """Refuse, naming ``what``, a ``path`` whose folder (or nearest existing parent: the rest is created when
    writing) is not a directory or cannot be written; probed with a temporary file, removed at once."""
    path = Path(path)
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{what} exists and is not writable")
    probe = temporary_name(folder / path.name)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        raise OSError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None


# -- an exclusive lock on a folder -------------------------------------------------------------------------


class LockedError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` for as long as the process holds it (released on exit or
    crash by the kernel, so a killed run never leaves a stale lock).

    Taking the lock writes nothing: a process refused the folder's use (another holder, or checks that fail
    after the lock is taken) leaves the folder as it found it, removing the lock file if it made it, and the
    folder itself (and any parents) if it made them and they are still empty. Once the
    work starts, :meth:`announce` writes who holds the lock, for the message another process gets; releasing
    an announced lock empties the file again.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str):
        self.path, self.what, self._fd = Path(folder) / self.NAME, what, None
        self._created = self._announced = False
        self._made_dirs: list[Path] = []  # folders acquire() created, deepest first

    def acquire(self) -> FolderLock:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs = missing
        while True:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise LockedError(f"{self.path.parent} is in use by {holder}: one {self.what} per folder") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that a refused process removed between our open and our flock
                break
            os.close(fd)
        self._fd, self._created, self._announced = fd, created, False
        return self

    def announce(self) -> None:
        """Write the holder (pid and host) into the lock file."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._announced = True

    def release(self) -> None:
        if self._fd is None:
            return
        if self._announced:
            os.ftruncate(self._fd, 0)  # a free lock names no holder
        elif self._created:
            self.path.unlink(missing_ok=True)  # before closing: whoever opened it meanwhile is refused
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
        if not self._announced:  # refused before any work: no empty folders left behind
            for folder in self._made_dirs:
                try:
                    folder.rmdir()  # only if empty: another process may have started using it meanwhile
                except OSError:
                    break

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- log once ----------------------------------------------------------------------------------------------

_logged: set[tuple] = set()


def log_once(logger: logging.Logger, key: tuple | str, message: str, *args, level: int = logging.INFO) -> bool:
    """Log ``message`` the first time ``key`` is seen in this process (e.g. a fast path's fallback reason)."""
    full = (logger.name, key)
    if full in _logged:
        return False
    _logged.add(full)
    logger.log(level, message, *args)
    return True


# -- environment switches ----------------------------------------------------------------------------------


def env_switch(name: str, aliases: dict[str, str], default: str) -> str:
    """The canonical value of environment variable ``name``; ``aliases`` maps accepted spellings to it.

    An unknown value is an error naming the variable and what it accepts (a typo must not silently fall
    back to the default).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = aliases.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"environment variable {name}={raw!r}: expected one of {', '.join(sorted(aliases))}")
    return value


ON_OFF_AUTO = {"auto": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}

__all__ = [
    "FolderLock",
    "LockedError",
    "ON_OFF_AUTO",
    "atomic_folder",
    "atomic_open",
    "atomic_path",
    "check_can_create",
    "check_output",
    "default_mode",
    "env_switch",
    "fsync_dir",
    "fsync_file",
    "log_once",
    "replace_durably",
    "temporary_name",
    "write_json_atomic",
    "write_text_atomic",
]
