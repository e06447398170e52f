"""Reading ADM-layout ``.npz`` files: sample batches, reference batches and reference statistics.

ADM's layout: ``arr_0`` holds uint8 images (N, H, W, 3) (plus ``arr_1`` labels for class-conditional
samples, unused here); a reference batch may also carry precomputed Inception statistics ``mu``, ``sigma``
(2048-d pool features) and ``mu_s``, ``sigma_s`` (2023-d spatial features). A 50k x 256 x 256 x 3 batch is
~9.8 GB, so images are streamed from the archive member in batches, as ADM's evaluator does, rather than
loaded whole. Every error names the file and the key.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from dfm.evaluation.frechet import FeatureStats

IMAGES_KEY = "arr_0"

# Reference-statistics keys: feature name -> (mean key, covariance key). "pool" and "spatial" are ADM's;
# "dinov2" is this project's extension for FDD.
STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}


def _archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        return zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not an .npz archive ({e})") from e


def npz_keys(path: str | Path) -> list[str]:
    """Names of the arrays stored in the archive ``path``."""
    path = Path(path)
    with _archive(path) as zf:
        return [name[: -len(".npy")] for name in zf.namelist() if name.endswith(".npy")]


@contextmanager
def _open_member(path: Path, key: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], bool, np.dtype]]:
    """The archive member ``key`` positioned at its data, with its (shape, fortran_order, dtype)."""
    with _archive(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            keys = sorted(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
            raise ValueError(f"{path}: no array '{key}' (the file holds: {', '.join(keys) or 'nothing'})")
        with zf.open(f"{key}.npy", "r") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):  # 3.0 only differs by a utf-8 header, which 2.0's reader accepts
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: array '{key}' has unsupported .npy format version {version}")
            yield f, shape, fortran, dtype


class NpzImages:
    """uint8 images (N, H, W, 3) stored under ``key`` in an ``.npz``, read batch by batch.

    The header is checked on construction (dtype uint8, four dimensions, three channels, C order), so a
    wrong file fails before any feature network runs.
    """

    def __init__(self, path: str | Path, key: str = IMAGES_KEY):
        self.path, self.key = Path(path), key
        with _open_member(self.path, key) as (_, shape, fortran, dtype):
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
                raise ValueError(
                    f"{self.path}: array '{key}' must hold uint8 images of shape (N, H, W, 3) as ADM writes "
                    f"them, got {dtype} of shape {shape}"
                )
            if fortran:
                raise ValueError(f"{self.path}: array '{key}' is stored in Fortran order; save it in C order")
        self.shape: tuple[int, int, int, int] = tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (B, H, W, 3) uint8 batches covering all images in order; the last may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        n, item_bytes = self.shape[0], int(np.prod(self.shape[1:]))
        with _open_member(self.path, self.key) as (f, *_):
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                data = f.read(b * item_bytes)
                if len(data) != b * item_bytes:
                    raise ValueError(
                        f"{self.path}: array '{self.key}' is truncated: expected {n} images, data ends at image "
                        f"{start + len(data) // item_bytes}"
                    )
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        """All images as one (N, H, W, 3) uint8 array."""
        return np.concatenate(list(self.batches(4096)), axis=0)


def read_reference_stats(path: str | Path) -> dict[str, FeatureStats]:
    """The precomputed statistics a reference ``.npz`` carries, by feature name ("pool", "spatial", "dinov2").

    A mean without its covariance (or the reverse), or shapes that do not fit (D,) and (D, D), is an error
    naming the file and the keys. A file without statistics gives an empty dict.
    """
    path = Path(path)
    keys = set(npz_keys(path))
    stats = {}
    with np.load(path) as npz:
        for name, (mu_key, sigma_key) in STATS_KEYS.items():
            present = {mu_key, sigma_key} & keys
            if not present:
                continue
            if len(present) == 1:
                missing = ({mu_key, sigma_key} - present).pop()
                raise ValueError(f"{path}: has '{present.pop()}' but not '{missing}'")
            mu, sigma = np.asarray(npz[mu_key], np.float64), np.asarray(npz[sigma_key], np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(
                    f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are not a (D,) mean and (D, D) "
                    "covariance"
                )
            stats[name] = FeatureStats(mu, sigma)
    return stats


def write_reference_stats(path: str | Path, stats: dict[str, FeatureStats]) -> None:
    """Write statistics under the keys :func:`read_reference_stats` reads (ADM's for pool and spatial).

    ``path`` is used as given (``np.savez`` would otherwise append ``.npz`` to a name without it)."""
    arrays = {}
    for name, s in stats.items():
        mu_key, sigma_key = STATS_KEYS[name]
        arrays[mu_key], arrays[sigma_key] = s.mu, s.sigma
    with open(path, "wb") as f:
        np.savez(f, **arrays)
