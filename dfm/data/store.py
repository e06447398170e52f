"""The latent store format: opening and validating a store, writing one, and its latent statistics.

A store holds SD-VAE encoder moments, ``concat([mean, std])`` of shape ``(2C, h, w)`` per image, and one class
label per image; training draws the posterior sample from them (:mod:`dfm.data.stream`). Two layouts are read:

* **packed** (written by ``dfm prepare encode``): ``manifest.json`` + ``moments.npy`` ``(N, 2C, h, w)`` float16 or
  float32, memory-mapped, + ``labels.npy`` ``(N,)`` int64. A rank reads its shard by fancy-indexing one file
  instead of opening hundreds of thousands of small files.
* **files** (the seed's / EDM2's layout): ``dataset.json`` ``{"labels": [[relative_path, label], ...]}`` and one
  ``(2C, h, w)`` ``.npy`` per image; an optional ``manifest.json`` with ``"layout": "files"`` gives shape, dtype and
  class count, otherwise they are read from the first file.

``data_dir`` may be the store itself or its parent holding ``vae-sd/`` (the seed's ``--data-dir`` habit). A store
is written by :class:`StoreWriter`, manifest last: a folder with a manifest holds a complete store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfm.files import atomic_open, write_json_atomic

LATENT_SCALE = 0.18215  # SD-VAE scaling factor: training latents are (mean + std * n) * 0.18215
MANIFEST = "manifest.json"
MOMENTS = "moments.npy"
LABELS = "labels.npy"
FILES_INDEX = "dataset.json"  # the seed's / EDM2's per-file index: {"labels": [[relative_path, label], ...]}
STORE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
LAYOUTS = ("packed", "files")


class StoreError(ValueError):
    """A latent store that cannot be trained on; the message names the offending file."""


@dataclass
class LatentStore:
    """An opened latent store: metadata, labels in memory, moments read on demand.

    The moments memory map is opened lazily and dropped when pickled, so a store can be handed to DataLoader
    workers or DALI's Python workers (each maps the file itself).
    """

    root: Path
    layout: str  # "packed" or "files"
    count: int
    shape: tuple[int, int, int]  # per-sample moments shape (2C, h, w)
    dtype: np.dtype
    num_classes: int
    labels: np.ndarray  # (N,) int64
    scale: float = LATENT_SCALE  # training latents are (z - shift) * scale, the VAE's factors
    shift: float = 0.0
    stats: dict | None = None
    files: list[str] | None = None  # files layout: paths relative to root, in label order
    manifest: dict = field(default_factory=dict)
    _moments: np.ndarray | None = field(default=None, repr=False)

    @property
    def channels(self) -> int:
        """Latent channels C (the moments hold 2C: mean then std)."""
        return self.shape[0] // 2

    @property
    def moments_path(self) -> Path:
        return self.root / self.manifest.get("moments", MOMENTS)

    @property
    def moments(self) -> np.ndarray:
        """The packed moments as a read-only memory map ``(N, 2C, h, w)``."""
        if self.layout != "packed":
            raise AttributeError("only a packed store has a single moments array")
        if self._moments is None:
            self._moments = np.load(self.moments_path, mmap_mode="r")
        return self._moments

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Moments of the given samples, ``(len(indices), 2C, h, w)`` in the store dtype, in the given order."""
        if self.layout == "packed":
            # One fancy-indexed read. Sorting first buys nothing: a shuffled batch of a large store is scattered
            # across the file either way, and the argsort and scatter cost more than they save from the page cache.
            return self.moments[indices]
        out = np.empty((len(indices), *self.shape), dtype=self.dtype)
        for j, i in enumerate(indices):
            out[j] = self.read_file(int(i))
        return out

    def read_file(self, i: int) -> np.ndarray:
        """One sample of a files-layout store, checked against the store's shape and dtype."""
        path = self.root / self.files[i]
        try:
            m = np.load(path)
        except FileNotFoundError:
            raise StoreError(f"missing latent file {path}") from None
        except Exception as e:  # numpy raises ValueError/OSError/EOFError/UnpicklingError on corrupt files
            raise StoreError(f"corrupt latent file {path}: {e}") from e
        if m.shape != self.shape or m.dtype != self.dtype:
            raise StoreError(
                f"latent file {path} has shape {m.shape} and dtype {m.dtype}, expected {self.shape} {self.dtype}"
            )
        return m

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_moments"] = None
        return state


def resolve_store_dir(data_dir: str | Path) -> Path:
    """The directory holding the store: ``data_dir`` itself, or ``data_dir/vae-sd`` as in the seed's layout."""
    root = Path(data_dir)
    if not root.is_dir():
        raise StoreError(f"latent store directory {root} does not exist")
    if not (root / MANIFEST).exists() and not (root / FILES_INDEX).exists() and (root / "vae-sd").is_dir():
        root = root / "vae-sd"
    return root


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise StoreError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _open_npy(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise StoreError(f"missing {what} file {path}")
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # bad magic, bad header, truncated data (mmap longer than the file)
        raise StoreError(f"corrupt {what} file {path}: {e}") from e


def _check_labels(labels: np.ndarray, num_classes: int, where: Path) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise StoreError(f"labels in {where} have dtype {labels.dtype}, expected an integer dtype")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            raise StoreError(
                f"labels in {where} out of range [0, {num_classes}): sample {bad} has label {int(labels[bad])}"
            )
    return labels


def open_store(data_dir: str | Path) -> LatentStore:
    """Open a packed or files-layout store, checking its metadata (not every sample; see :func:`validate_store`)."""
    root = resolve_store_dir(data_dir)
    manifest_path = root / MANIFEST
    manifest = _read_json(manifest_path) if manifest_path.exists() else {}
    layout = manifest.get("layout", "packed" if manifest else "files")
    if layout == "packed":
        return _open_packed(root, manifest)
    if layout == "files":
        return _open_files(root, manifest)
    raise StoreError(f"{manifest_path}: unknown layout {layout!r}, expected 'packed' or 'files'")


def _open_packed(root: Path, manifest: dict) -> LatentStore:
    where = root / MANIFEST
    missing = [k for k in ("count", "shape", "dtype", "num_classes") if k not in manifest]
    if missing:
        raise StoreError(f"{where} lacks the keys {missing}")
    count, shape = int(manifest["count"]), tuple(int(s) for s in manifest["shape"])
    dtype, num_classes = np.dtype(manifest["dtype"]), int(manifest["num_classes"])
    if len(shape) != 3 or shape[0] % 2:
        raise StoreError(f"{where}: moments shape {list(shape)} must be (2C, h, w)")
    moments_path = root / manifest.get("moments", MOMENTS)
    moments = _open_npy(moments_path, "moments")
    if moments.shape != (count, *shape):
        raise StoreError(f"{moments_path} has shape {moments.shape}, the manifest says {(count, *shape)}")
    if moments.dtype not in STORE_DTYPES:
        raise StoreError(f"{moments_path} has dtype {moments.dtype}; a latent store holds float16 or float32")
    if moments.dtype != dtype:
        raise StoreError(f"{moments_path} has dtype {moments.dtype}, the manifest says {dtype}")
    labels_path = root / manifest.get("labels", LABELS)
    labels = _open_npy(labels_path, "labels")
    if labels.shape != (count,):
        raise StoreError(f"{labels_path} has shape {labels.shape}, expected ({count},)")
    labels = _check_labels(np.array(labels), num_classes, labels_path)
    return LatentStore(
        root=root,
        layout="packed",
        count=count,
        shape=shape,
        dtype=dtype,
        num_classes=num_classes,
        labels=labels,
        scale=float(manifest.get("scale", LATENT_SCALE)),
        shift=float(manifest.get("shift", 0.0)),
        stats=manifest.get("stats"),
        manifest=manifest,
        _moments=moments,
    )


def _open_files(root: Path, manifest: dict) -> LatentStore:
    index_path = root / FILES_INDEX
    if not index_path.exists():
        raise StoreError(f"{root} holds no {MANIFEST} or {FILES_INDEX}: not a latent store")
    entries = _read_json(index_path).get("labels")
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 for e in entries):
        raise StoreError(f"{index_path}: 'labels' must be a list of [relative_path, label] pairs")
    files = [str(name) for name, _ in entries]
    raw_labels = np.array([label for _, label in entries])
    if raw_labels.size and not np.issubdtype(raw_labels.dtype, np.integer):
        raise StoreError(f"labels in {index_path} must be integers, found dtype {raw_labels.dtype}")
    labels = raw_labels.astype(np.int64)
    store = LatentStore(
        root=root,
        layout="files",
        count=len(files),
        shape=(0, 0, 0),
        dtype=np.dtype(np.float32),
        num_classes=0,
        labels=labels,
        files=files,
        manifest=manifest,
    )
    if manifest:
        missing = [k for k in ("shape", "dtype", "num_classes") if k not in manifest]
        if missing:
            raise StoreError(f"{root / MANIFEST} lacks the keys {missing}")
        store.shape = tuple(int(s) for s in manifest["shape"])
        store.dtype = np.dtype(manifest["dtype"])
        store.num_classes = int(manifest["num_classes"])
        store.scale = float(manifest.get("scale", LATENT_SCALE))
        store.shift = float(manifest.get("shift", 0.0))
        store.stats = manifest.get("stats")
    elif files:
        # No manifest (a seed-made store): the first file sets shape and dtype; classes from the labels.
        first = _open_npy(root / files[0], "latent")
        store.shape, store.dtype = tuple(first.shape), first.dtype
        store.num_classes = int(labels.max()) + 1 if labels.size else 0
    if files and (len(store.shape) != 3 or store.shape[0] % 2 or store.dtype not in STORE_DTYPES):
        raise StoreError(f"{root / files[0]}: moments of shape {store.shape} {store.dtype} are not (2C, h, w) float")
    store.labels = _check_labels(labels, store.num_classes, index_path)
    return store


VALUE_SAMPLE = 256  # samples whose values every training start reads (spread over the store): a few MB


def validate_store(data_dir: str | Path, world_size: int = 1, deep: bool = False) -> LatentStore:
    """Check a store before training starts and return it opened; raise :class:`StoreError` naming the file.

    Always checked: the manifest/index, the moments and labels files (presence, readable header, full size,
    shape, dtype), labels in ``[0, num_classes)``, a non-empty shard for every one of ``world_size`` ranks, for
    the files layout that every listed file exists, and the values of ``VALUE_SAMPLE`` samples spread evenly
    over the store (finite means, finite standard deviations >= 0: a NaN store would train to a NaN model).
    ``deep`` reads every sample instead.
    """
    store = open_store(data_dir)
    where = store.moments_path if store.layout == "packed" else store.root / FILES_INDEX
    if store.count == 0:
        raise StoreError(f"{where} holds no samples: the store is empty")
    if world_size > store.count:
        raise StoreError(
            f"{where} holds {store.count} samples, fewer than the {world_size} ranks: some rank's shard is empty"
        )
    if store.layout == "files":
        present = _listed_files_present(store)
        missing = [name for name in store.files if name not in present]
        if missing:
            raise StoreError(f"missing latent file {store.root / missing[0]} ({len(missing)} of {store.count} missing)")
        if deep:
            for i in range(store.count):
                _check_finite(store.read_file(i)[None], store, store.root / store.files[i])
    elif deep:
        chunk = max(1, (64 << 20) // (store.moments[0].nbytes or 1))  # ~64 MiB per read
        for start in range(0, store.count, chunk):
            _check_finite(np.asarray(store.moments[start : start + chunk]), store, store.moments_path, start)
    if not deep:
        _check_sample_values(store)
    return store


def _check_sample_values(store: LatentStore) -> None:
    picks = np.unique(np.linspace(0, store.count - 1, num=min(VALUE_SAMPLE, store.count)).astype(np.int64))
    for i in picks if store.layout == "files" else []:
        _check_finite(store.read_file(int(i))[None], store, store.root / store.files[int(i)], 0)
    if store.layout == "packed":
        bad = _bad_rows(np.asarray(store.moments[picks]), store)
        if bad.any():  # name the first bad sample by its index in the store
            first = int(picks[np.flatnonzero(bad)[0]])
            raise StoreError(f"{store.moments_path}: sample {first} has non-finite moments or std < 0")


def _listed_files_present(store: LatentStore) -> set[str]:
    # One directory listing per folder instead of one stat per file: far cheaper for a million files.
    present: set[str] = set()
    for folder in sorted({str(Path(name).parent) for name in store.files}):
        d = store.root / folder
        if d.is_dir():
            prefix = "" if folder == "." else folder + "/"
            present.update(prefix + e.name for e in d.iterdir())
    return present


def _bad_rows(m: np.ndarray, store: LatentStore) -> np.ndarray:
    """Per sample of moments ``m``: whether a mean is not finite or a standard deviation not finite and >= 0."""
    mean, std = m[:, : store.channels], m[:, store.channels :]
    return ~np.isfinite(mean).reshape(len(m), -1).all(1) | ~(np.isfinite(std) & (std >= 0)).reshape(len(m), -1).all(1)


def _check_finite(m: np.ndarray, store: LatentStore, path: Path, start: int = 0) -> None:
    bad = _bad_rows(m, store)
    if bad.any():
        raise StoreError(f"{path}: sample {start + int(np.flatnonzero(bad)[0])} has non-finite moments or std < 0")


# -- writing -----------------------------------------------------------------------------------------------


def sample_file_name(i: int) -> str:
    """Where sample ``i`` of a files-layout store lives, in the seed's naming: ``00012/img-mean-std-00012345.npy``."""
    s = f"{i:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


class _LatentStats:
    """Per-channel mean and std of the unscaled posterior latent ``z = mean + std * n``, summed chunk by chunk.

    Exact, not sampled: ``E[z] = E[mean]`` and ``Var[z] = E[mean^2] + E[std^2] - E[z]^2`` (float64 sums).
    """

    OF = "z = mean + std * n, before scaling"

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def update(self, moments: np.ndarray) -> None:
        if len(moments) == 0:
            return
        c = moments.shape[1] // 2
        m = np.asarray(moments, dtype=np.float64)
        mean, std = m[:, :c], m[:, c:]
        self.s1 = self.s1 + mean.sum(axis=(0, 2, 3))
        self.s2 = self.s2 + (mean * mean + std * std).sum(axis=(0, 2, 3))
        self.n += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def result(self) -> dict:
        if not self.n:
            return {"mean": [], "std": [], "of": self.OF}
        mu = self.s1 / self.n
        var = np.maximum(self.s2 / self.n - mu * mu, 0.0)
        return {"mean": mu.tolist(), "std": np.sqrt(var).tolist(), "of": self.OF}


class StoreWriter:
    """Write a store of ``count`` samples chunk by chunk: :meth:`add` them in order, then :meth:`finish`.

    The packed layout fills a preallocated ``moments.npy`` in place, so a store larger than memory is packed
    without holding it; the files layout writes one ``.npy`` per sample (:func:`sample_file_name`). Neither goes
    through temporary names: a store counts only once its manifest exists, and :meth:`finish` writes the
    manifest last and atomically, after the data it describes is on disk. A writer killed midway leaves no
    store, and writing again overwrites what it left.
    """

    def __init__(self, root: str | Path, layout: str, count: int, shape: tuple[int, ...], dtype: np.dtype | str):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'packed' or 'files', got {layout!r}")
        self.root, self.layout, self.count = Path(root), layout, int(count)
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.root.mkdir(parents=True, exist_ok=True)
        self.labels = np.empty(self.count, dtype=np.int64)
        self.written = 0
        self._stats = _LatentStats()
        self._moments = None
        if layout == "packed":
            shape = (self.count, *self.shape)
            self._moments = np.lib.format.open_memmap(self.root / MOMENTS, mode="w+", dtype=self.dtype, shape=shape)

    def add(self, moments: np.ndarray, labels: np.ndarray) -> None:
        """Append the next samples: moments ``(B, 2C, h, w)`` and their labels ``(B,)``."""
        lo, hi = self.written, self.written + len(moments)
        if hi > self.count or len(labels) != len(moments) or tuple(moments.shape[1:]) != self.shape:
            raise ValueError(
                f"{self.root}: cannot add {len(moments)} samples of {tuple(moments.shape[1:])} with {len(labels)} "
                f"labels to a store of {self.count} samples of {self.shape} holding {self.written}"
            )
        self._stats.update(moments)
        self.labels[lo:hi] = labels
        if self._moments is not None:
            self._moments[lo:hi] = moments
        else:
            for i, m in zip(range(lo, hi), moments):
                path = self.root / sample_file_name(i)
                path.parent.mkdir(exist_ok=True)
                np.save(path, m.astype(self.dtype, copy=False))
        self.written = hi

    def finish(self, num_classes: int, scale: float = LATENT_SCALE, **extra) -> dict:
        """Write the labels (packed) or the index (files), then the manifest; return the manifest.

        ``extra`` keys are recorded in the manifest (``dfm prepare encode`` records the image source, the VAE
        with its ``shift`` and the images it skipped).
        """
        if self.written != self.count:
            raise ValueError(f"{self.root}: {self.written} of {self.count} samples written, the store is incomplete")
        if self._moments is not None:
            self._moments.flush()  # msync: the moments are on disk before the manifest names them
            self._moments = None
            with atomic_open(self.root / LABELS, "wb") as f:
                np.save(f, self.labels)
        else:
            entries = [[sample_file_name(i), int(y)] for i, y in enumerate(self.labels)]
            write_json_atomic(self.root / FILES_INDEX, {"labels": entries})
        manifest = {
            "format": "dfm-latents",
            "version": 1,
            "layout": self.layout,
            "count": self.count,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "num_classes": int(num_classes),
            "scale": scale,
            "stats": self._stats.result(),
            **extra,
        }
        if self.layout == "packed":
            manifest.update(moments=MOMENTS, labels=LABELS)
        write_json_atomic(self.root / MANIFEST, manifest)
        return manifest


def write_store(
    root: str | Path,
    moments: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    layout: str = "packed",
    scale: float = LATENT_SCALE,
) -> Path:
    """Write an in-memory ``(N, 2C, h, w)`` moments array and its labels as a store; return its folder.

    One :class:`StoreWriter` chunk, for tests and benchmarks; ``dfm prepare encode`` packs its chunks through the
    same writer (:func:`dfm.data.encode.finalize_store`), so both write the same format.
    """
    moments = np.asarray(moments)
    writer = StoreWriter(root, layout, len(moments), moments.shape[1:], moments.dtype)
    writer.add(moments, np.asarray(labels, dtype=np.int64))
    writer.finish(num_classes, scale)
    return writer.root
