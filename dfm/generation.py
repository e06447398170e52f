"""Generating many samples across ranks into ADM's ``.npz`` layout, resumably (``dfm generate``).

The contract, and how each part of it is kept:

- **A sample is a function of (seed, index).** Index ``i`` draws its label and its noise (one white-noise
  tensor per stage, then the SDE's step noise) from its own CPU generator seeded with
  :func:`index_seed`, so neither the world size, nor the batch size, nor the device changes what index
  ``i`` is; only the float rounding of the batched matmuls depends on the company a sample keeps.
- **Every index exactly once.** The missing indices (``[0, N)`` minus those already in shard files) are
  cut into *pieces*: contiguous ranges split at multiples of the batch size, so a fresh run's pieces are
  ``[bB, (b+1)B)``. Piece ``j`` goes to rank ``j % world_size``; every rank computes the same plan from the
  same directory listing, taken before any rank writes.
- **Crash-safe shards.** A finished piece is one file ``<out>.parts/<start>-<stop>.npz`` written under a
  temporary name and renamed into place, so a shard either exists whole or not at all; a restart skips
  the indices it holds and redoes the rest (at any world size or batch size). ``manifest.json`` records
  the settings that change what the images are (checkpoint, seed, labels, sampler keys, VAE, precision);
  a restart with other settings is refused instead of mixing two sample sets.
- **ADM's layout.** :func:`merge_shards` streams the shards in index order into one ``.npz`` holding
  ``arr_0`` (uint8 N x H x W x 3), ``arr_1`` (the labels, as ADM's sampler names them), ``labels``
  (the same, as ``dfm sample`` names them) and ``settings`` (the manifest's settings as JSON text:
  :func:`read_settings`), written to a temporary file and renamed: at 50k x 256 px the images alone are
  9.8 GB, so they are never all held in memory.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dfm.fast_sampling import ModelSampler
from dfm.files import atomic_open, atomic_path, write_text_atomic
from dfm.precision import autocast, resolve_precision
from dfm.visualize import to_uint8

LABEL_MODES = ("random", "balanced")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SETTINGS = "settings"  # .npz member: the JSON of what made the samples (checkpoint, sampler, CFG, seed, VAE)
_SHARD = re.compile(r"^(\d+)-(\d+)\.npz$")


# -- per-index draws ---------------------------------------------------------------------------------------


def index_seed(seed: int, index: int) -> int:
    """Seed of index ``index``'s generator: distinct for every index of a run.

    torch's CPU generator keeps only the low 32 bits of a seed (mt19937), so the map is a bijection modulo
    2**32 for a fixed ``seed`` (a hash would collide: 50k indices in 2**32 values collide with ~25 %
    probability); the odd multiplier spreads different seeds apart.
    """
    return (seed * 0x9E3779B1 + index) % 2**32


@dataclass
class IndexDraws:
    """The random inputs of a batch of indices: noise per stage (B, C, H_s, W_s), labels (B,), on CPU.

    ``generators`` hold each index's stream after the initial draws; :meth:`step_noise` continues them,
    so the SDE's per-step noise is a function of the index too.
    """

    noise: list[Tensor]
    y: Tensor
    generators: list[torch.Generator]
    count: int | None = None  # indices asked for; the rest pads the batch (repeats of the last index)

    def step_noise(self) -> Tensor:
        """N(0, I) of the finest stage's shape for every index, each from its own generator."""
        shape = self.noise[-1].shape[1:]
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])


def draw_indices(
    indices: Sequence[int], seed: int, shapes: list[tuple[int, int, int]], num_classes: int, labels: str = "random"
) -> IndexDraws:
    """Label and stage noise of every index from its own generator (order: label, then stages coarsest first)."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    noise: list[list[Tensor]] = [[] for _ in shapes]
    ys, gens = [], []
    for i in indices:
        g = torch.Generator().manual_seed(index_seed(seed, i))
        if labels == "random":
            ys.append(int(torch.randint(num_classes, (1,), generator=g)))
        else:
            ys.append(i % num_classes)
        for s, shape in enumerate(shapes):
            noise[s].append(torch.randn(shape, generator=g))
        gens.append(g)
    return IndexDraws([torch.stack(n) for n in noise], torch.tensor(ys, dtype=torch.long), gens)


# -- sampling ----------------------------------------------------------------------------------------------


class IndexSampler:
    """Samples given global indices of a run: draws, staged ODE (fast path by its predicate) or SDE, decode.

    Args:
        model: the (EMA) model, already on its device, in eval mode.
        cfg: the run config; its ``sample`` section sets the sampler.
        seed: the run's sampling seed.
        labels: ``"random"`` (uniform per index, as ADM/DiT sample) or ``"balanced"`` (``i % num_classes``).
        decoder: a :class:`dfm.vae.LatentDecoder` for latent models (images through the VAE), None for pixels.
        sampler_mode: ``dfm.fast_sampling`` mode (``auto`` = CUDA graphs on CUDA, eager elsewhere).
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` (``dfm.precision``: autocast of the model; the
            sampler state stays float32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg,
        seed: int = 0,
        labels: str = "random",
        decoder=None,
        sampler_mode: str = "auto",
        precision: str = "auto",
    ):
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        precision = resolve_precision(precision, next(model.parameters()).device)
        self.model, self.cfg, self.seed, self.labels = model, cfg, seed, labels
        self.decoder, self.precision = decoder, precision
        self.device = next(model.parameters()).device
        self.shapes = model.input_shapes()
        self.sampler = ModelSampler(model, cfg, mode=sampler_mode)

    def draw(self, indices: Sequence[int], pad_to: int | None = None) -> IndexDraws:
        """The host-side draws of ``indices`` (each from its own CPU generator), padded to ``pad_to``.

        ``pad_to`` runs the batch at that size, repeating the last index's draws (``run`` drops the copies):
        every batch then has one shape, so a compiled / graph-captured sampler never re-specialises for a
        short last batch. On CUDA the noise is pinned, so ``run`` copies it to the device without waiting.
        """
        indices = list(indices)
        if not indices:
            raise ValueError("no indices to sample")
        padded = indices + [indices[-1]] * max(0, (pad_to or 0) - len(indices))
        draws = draw_indices(padded, self.seed, self.shapes, self.cfg.data.num_classes, self.labels)
        draws.count = len(indices)
        if self.device.type == "cuda":
            draws.noise = [z.pin_memory() for z in draws.noise]
            draws.y = draws.y.pin_memory()
        return draws

    @torch.no_grad()
    def run(self, draws: IndexDraws) -> Tensor:
        """Sample the drawn batch: x (n, C, H, W) float32 in model space, on the device; reads nothing back."""
        noise = [z.to(self.device, non_blocking=True) for z in draws.noise]
        y = draws.y.to(self.device, non_blocking=True)
        # No weight-cast cache: it would hold tensors made outside a CUDA graph's memory pool.
        with autocast(self.device, self.precision, cache_enabled=False):
            x = self.sampler.sample(noise, y, previews=False, step_noise=draws.step_noise).x
        return x[: draws.count].float()

    def sample(self, indices: Sequence[int], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
        """(x (n, C, H, W) float32 in model space on the device, labels (n,) on CPU) for ``indices``."""
        draws = self.draw(indices, pad_to)
        return self.run(draws), draws.y[: draws.count].cpu()

    @torch.no_grad()
    def decode(self, x: Tensor) -> np.ndarray:
        """Model-space samples -> uint8 (n, H, W, 3): through the decoder for latents, else from [-1, 1]."""
        return to_uint8(self.decoder(x) if self.decoder is not None else x)

    def images(self, indices: Sequence[int], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (n, H, W, 3) and int64 labels (n,) of ``indices``."""
        x, y = self.sample(indices, pad_to)
        return self.decode(x), y.numpy().astype(np.int64)


# -- work plan -----------------------------------------------------------------------------------------------


def parts_dir(out: str | Path) -> Path:
    """Where the shards of ``out`` live: ``<out>.parts`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def shard_path(parts: Path, start: int, stop: int) -> Path:
    return Path(parts) / f"{start:08d}-{stop:08d}.npz"


def shard_problem(path: Path) -> str | None:
    """Why the shard at ``path`` cannot be merged (unreadable, or its arrays do not hold its index range), or
    None. Reads the archive's directory and array headers, not the images."""
    m = _SHARD.match(path.name)
    count = int(m.group(2)) - int(m.group(1))
    try:
        with zipfile.ZipFile(path) as zf:
            shapes = {}
            for name in ("images.npy", "labels.npy"):
                with zf.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)
                shapes[name] = (shape, dtype)
                if zf.getinfo(name).file_size < int(np.prod(shape)) * dtype.itemsize:
                    return f"{name} is shorter than its header says"
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
        return f"unreadable: {' '.join(str(err).split())}"
    images, labels = shapes["images.npy"], shapes["labels.npy"]
    if images[0][:1] != (count,) or labels[0] != (count,) or images[1] != np.uint8:
        return f"holds {images[0]} {images[1]} images and {labels[0]} labels for {count} indices"
    return None


def discard_bad_shards(parts: str | Path) -> list[tuple[Path, str]]:
    """Set aside (as ``.bad-<name>``) every shard of ``parts`` that cannot be merged, so it is sampled again;
    returns what was set aside and why."""
    parts = Path(parts)
    bad = []
    for path in sorted(parts.glob("*.npz")) if parts.is_dir() else []:
        if _SHARD.match(path.name) and (why := shard_problem(path)) is not None:
            path.replace(path.with_name(f".bad-{path.name}"))
            bad.append((path, why))
    return bad


def scan_shards(parts: str | Path) -> list[tuple[int, int]]:
    """Sorted ``(start, stop)`` ranges of the finished shards in ``parts``; overlapping shards are an error."""
    parts = Path(parts)
    if not parts.is_dir():
        return []
    ranges = []
    for name in os.listdir(parts):
        m = _SHARD.match(name)
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            if stop <= start:
                raise ValueError(f"{parts / name}: empty or reversed index range")
            ranges.append((start, stop))
    ranges.sort()
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ValueError(
                f"{parts}: shards {shard_path(parts, a0, a1).name} and {shard_path(parts, b0, b1).name} overlap; "
                "were two runs writing here at once?"
            )
    return ranges


def missing_ranges(done: Iterable[tuple[int, int]], num_samples: int) -> list[tuple[int, int]]:
    """The maximal ranges of ``[0, num_samples)`` not covered by the sorted, disjoint ``done`` ranges."""
    out, cursor = [], 0
    for start, stop in done:
        if start >= num_samples:
            break
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, stop)
    if cursor < num_samples:
        out.append((cursor, num_samples))
    return out


def plan_pieces(missing: Iterable[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    """Cut each missing range at multiples of ``batch_size``: a fresh run's pieces are ``[bB, (b+1)B)``, and a
    resumed run with the same batch size redoes exactly the batches it lost."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    pieces = []
    for start, stop in missing:
        cut = start
        while cut < stop:
            end = min(stop, (cut // batch_size + 1) * batch_size)
            pieces.append((cut, end))
            cut = end
    return pieces


def rank_pieces(pieces: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """Round-robin: piece ``j`` belongs to rank ``j % world_size`` (ranks differ by at most one batch)."""
    return pieces[rank::world_size]


def count_done(parts: str | Path) -> int:
    """Indices held by the finished shards of ``parts``."""
    return sum(stop - start for start, stop in scan_shards(parts))


# -- files ---------------------------------------------------------------------------------------------------


def write_shard(parts: str | Path, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write the images (n, H, W, 3) uint8 and labels (n,) of indices ``[start, start + n)``, atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise ValueError(f"expected uint8 (n, H, W, 3) images and n labels, got {images.dtype} {images.shape}")
    path = shard_path(Path(parts), start, start + len(images))
    with atomic_open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64))
    return path


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["images"], f["labels"]


def _read_labels(path: Path) -> np.ndarray:
    with np.load(path) as f:  # reads only this member of the archive
        return f["labels"]


def clean_temporaries(parts: str | Path) -> int:
    """Remove the half-written files a crash left in ``parts``; returns how many."""
    parts = Path(parts)
    stale = [p for p in parts.glob(".*.tmp*")] if parts.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class ManifestMismatch(ValueError):
    """The shards on disk were made with other settings."""


def as_recorded(settings: dict) -> dict:
    """``settings`` as the manifest (and the merged ``.npz``) record them: JSON values, with the format."""
    return json.loads(json.dumps(dict(settings, format=MANIFEST_FORMAT)))  # tuples -> lists, as stored


def settings_diff(recorded: dict, settings: dict) -> str:
    """``key: recorded -> new`` for every setting that differs ("" when none does)."""
    diff = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
    return "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in diff)


def check_manifest(parts: str | Path, settings: dict) -> None:
    """Record ``settings`` in ``parts/manifest.json``, or check that they equal the recorded ones."""
    parts = Path(parts)
    settings = as_recorded(settings)
    path = parts / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        details = settings_diff(recorded, settings)
        if details:
            raise ManifestMismatch(
                f"{parts} holds samples made with other settings ({details}); "
                "use the same settings, another --out, or delete the folder"
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=1, sort_keys=True))


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]):
    """Stream one C-order array into the archive as ``<name>.npy`` (the layout ``np.savez`` writes)."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    written = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            f.write(chunk.tobytes())
            written += chunk.size
    if written != int(np.prod(shape)):
        raise RuntimeError(f"{name}: wrote {written} values for shape {shape}")


def merge_shards(parts: str | Path, out: str | Path, num_samples: int) -> Path:
    """Stream the shards of ``parts`` in index order into ``out`` (``arr_0``, ``arr_1``, ``labels``), atomically.

    Checks first that the shards cover ``[0, num_samples)`` exactly once and agree on the image size.
    """
    parts, out = Path(parts), Path(out)
    ranges = scan_shards(parts)
    covered = [(a, b) for a, b in ranges if a < num_samples]
    gaps = missing_ranges(covered, num_samples)
    if gaps or any(b > num_samples for _, b in covered):
        end = covered[-1][1] if covered else 0
        raise ValueError(
            f"{parts}: shards do not cover [0, {num_samples}) exactly (missing {gaps[:5]}, last shard ends at {end})"
        )
    first, _ = read_shard(shard_path(parts, *covered[0]))
    shape = (num_samples, *first.shape[1:])

    def images():
        for a, b in covered:
            x, _ = read_shard(shard_path(parts, a, b))
            if x.shape != (b - a, *shape[1:]) or x.dtype != np.uint8:
                raise ValueError(f"{shard_path(parts, a, b)}: images {x.dtype} {x.shape}, expected uint8 {shape[1:]}")
            yield x

    labels = np.concatenate([_read_labels(shard_path(parts, a, b)) for a, b in covered]).astype(np.int64)
    manifest = parts / MANIFEST
    settings = settings_array(json.loads(manifest.read_text())) if manifest.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "arr_0", shape, np.uint8, images())
        _write_npy_member(zf, "arr_1", labels.shape, np.int64, [labels])
        _write_npy_member(zf, "labels", labels.shape, np.int64, [labels])
        if settings is not None:
            _write_npy_member(zf, SETTINGS, (), settings.dtype, [settings])
    return out


def settings_array(settings: dict) -> np.ndarray:
    """``settings`` as the JSON text in a 0-d unicode array: an ``.npz`` member that loads without pickle."""
    return np.array(json.dumps(settings, sort_keys=True))


def read_settings(path: str | Path) -> dict | None:
    """The settings a sample ``.npz`` of ``dfm generate`` or ``dfm sample`` carries (None if it has none)."""
    with np.load(path) as f:
        return json.loads(str(f[SETTINGS])) if SETTINGS in f.files else None


__all__ = [
    "IndexDraws",
    "IndexSampler",
    "LABEL_MODES",
    "ManifestMismatch",
    "as_recorded",
    "check_manifest",
    "clean_temporaries",
    "count_done",
    "discard_bad_shards",
    "draw_indices",
    "index_seed",
    "merge_shards",
    "missing_ranges",
    "parts_dir",
    "plan_pieces",
    "rank_pieces",
    "read_settings",
    "read_shard",
    "scan_shards",
    "settings_array",
    "settings_diff",
    "write_shard",
]
