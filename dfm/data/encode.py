"""``dfm prepare encode``: converted images → SD-VAE encoder moments in a latent store.

``encode`` runs diffusers' ``AutoencoderKL`` over the images ``dfm prepare convert`` wrote (:mod:`dfm.data.convert`)
and stores the encoder moments ``concat([mean, std])`` per image (the seed's ``img-mean-std`` convention). Images
are split into chunks; rank ``r`` of ``W`` encodes chunks ``c ≡ r (mod W)`` and writes each finished chunk
atomically under ``parts/``, which makes the run resumable and lets ranks run on different GPUs or machines. Once
every chunk exists, the parts are packed into one memory-mappable ``moments.npy`` (or the per-image layout) with
``labels.npy``, per-channel latent statistics and ``manifest.json``, written last
(:class:`~dfm.data.store.StoreWriter`).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dfm.data.convert import ImageSource
from dfm.data.store import FILES_INDEX, LATENT_SCALE, MANIFEST, StoreWriter
from dfm.devices import resolve_device
from dfm.files import atomic_open, write_json_atomic
from dfm.vae import DEFAULT_VAE, VaeSpec, load_vae, vae_checksum, vae_spec


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(B, 3, H, W)`` → encoder moments ``concat([mean, std])`` ``(B, 2C, H/f, W/f)`` float32."""
    x = images.to(next(vae.parameters()).device, torch.float32) / 127.5 - 1
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


class _Images(torch.utils.data.Dataset):
    """Converted images by index: ``(uint8 (3, H, W) or None, index, error)``."""

    def __init__(self, source: ImageSource, names: list[str]):
        self.source, self.names = source, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            with self.source.open(self.names[i]) as f:
                arr = np.asarray(Image.open(f).convert("RGB"))
        except Exception as e:
            return None, i, f"{type(e).__name__}: {e}"
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i, None


def _collate(batch: list) -> list:
    return batch


def _part_path(dest: Path, chunk: int) -> Path:
    return dest / "parts" / f"chunk-{chunk:06d}.npz"


def _plan_path(dest: Path) -> Path:
    return dest / "parts" / "plan.json"


def _read_plan(dest: Path) -> dict:
    path = _plan_path(dest)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: nothing was encoded into {dest}")
    with open(path) as f:
        return json.load(f)


# What determines a store's content besides the image list: a resumed run, another rank, or a rerun onto a finished
# store must agree on every one of them, or rows from two VAEs (or two sources) would be mixed silently.
SETTINGS = ("source", "resolution", "vae", "vae_subfolder", "vae_checksum", "dtype", "chunk_size")


def encode_settings(source: str | Path, spec: VaeSpec, dtype: str, chunk_size: int, read_source: bool = True) -> dict:
    """The settings of an encode job (:data:`SETTINGS`): the source by absolute path with its image size, the VAE
    with its checksum (:func:`~dfm.vae.vae_checksum`), dtype and chunking. ``read_source=False`` (a finished
    store whose converted images are gone, as they often are after encoding) leaves the image size out: the
    source is then compared by its path alone."""
    if read_source:
        src = ImageSource(source)
        entries, index = _source_index(src)
    return {
        "source": str((src.path if read_source else Path(source)).resolve()),
        "resolution": _source_resolution(src, entries, index) if read_source else None,
        "vae": spec.source,
        "vae_subfolder": spec.subfolder,
        "vae_checksum": vae_checksum(spec),
        "dtype": str(np.dtype(dtype)),
        "chunk_size": chunk_size,
    }


def _source_index(src: ImageSource) -> tuple[list, dict]:
    """``(labels entries, dataset.json)`` of a converted source; refused when it lists no images."""
    names = set(src.names())
    if FILES_INDEX not in names:
        raise FileNotFoundError(f"{src.path} has no {FILES_INDEX}: run `dfm prepare convert` on the raw images first")
    with src.open(FILES_INDEX) as f:
        index = json.load(f)
    entries = index.get("labels") or []
    if not entries:
        raise ValueError(f"{src.path}: {FILES_INDEX} lists no images: nothing to encode")
    missing = [n for n, _ in entries if n not in names]
    if missing:
        raise FileNotFoundError(f"{src.path}: {len(missing)} images listed in {FILES_INDEX} are missing: {missing[0]}")
    return entries, index


def _source_resolution(src: ImageSource, entries: list, index: dict) -> list[int] | None:
    """``[width, height]`` of the converted images: as ``dfm prepare convert`` recorded it, else the first image's."""
    if index.get("resolution"):
        return [int(v) for v in index["resolution"]]
    try:
        with src.open(entries[0][0]) as f:
            return list(Image.open(f).size)  # reads the header only
    except Exception:  # an unreadable first image is named (or skipped) when it is encoded
        return None


# How a setting is named to the user: the flag that sets it, or what it is.
_SETTING_NAMES = {
    "source": "--source",
    "resolution": "the source's image size",
    "vae": "--vae",
    "vae_subfolder": "--vae-subfolder",
    "vae_checksum": "the VAE's checksum",
    "dtype": "--dtype",
    "chunk_size": "--chunk-size",
}


def check_settings(recorded: dict, settings: dict, where: Path) -> None:
    """Refuse ``settings`` unless they equal those ``where`` records, naming the first that differs with both
    values. A setting the record lacks (a job of an older version) counts as differing: it cannot be shown to
    match. A VAE whose files have the recorded checksum is the same VAE under another path (a copy, another
    machine's mount)."""
    checksum = recorded.get("vae_checksum")
    same_vae_files = str(checksum).startswith("sha256:") and checksum == settings.get("vae_checksum")
    for key in SETTINGS:
        if key == "vae" and same_vae_files:
            continue
        if key in settings and recorded.get(key, "not recorded") != settings[key]:
            name = _SETTING_NAMES[key]
            raise ValueError(
                f"{where} records {name} {recorded.get(key, 'not recorded')} but this run has {name} {settings[key]}:"
                " rerun with the recorded setting, or use a fresh --dest"
            )


def _encode_plan(source: str | Path, dest: Path, settings: dict) -> dict:
    """Image list, chunking and :data:`SETTINGS`, kept in ``parts/plan.json`` so that a resumed or multi-rank run
    agrees on them (any other is refused)."""
    src = ImageSource(source)
    entries, index = _source_index(src)
    labels = [int(y) if y is not None else 0 for _, y in entries]
    plan = {
        **settings,
        "names": [n for n, _ in entries],
        "labels": labels,
        "num_classes": len(index.get("classes") or []) or (max(labels, default=-1) + 1),
        "num_chunks": math.ceil(len(entries) / settings["chunk_size"]),
    }
    path = _plan_path(dest)
    if path.exists():
        old = _read_plan(dest)
        check_settings(old, settings, path)
        if {k: old.get(k) for k in ("names", "labels")} != {k: plan[k] for k in ("names", "labels")}:
            raise ValueError(f"{path} records another image list: use a fresh --dest or delete {path.parent}")
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def encode_shard(
    source: str | Path,
    dest: str | Path,
    vae: str = DEFAULT_VAE,
    vae_subfolder: str | None = None,
    batch_size: int = 64,
    chunk_size: int = 1024,
    dtype: str = "float32",
    rank: int = 0,
    world_size: int = 1,
    device: str = "auto",
    workers: int = 2,
    skip_bad: bool = False,
    progress: bool = True,
    settings: dict | None = None,
) -> list[tuple[str, str]]:
    """Encode this rank's chunks that are not on disk yet; return the (image, reason) pairs skipped.

    ``settings``: the job's :func:`encode_settings` when the caller has them already (else read here)."""
    dest = Path(dest)
    dev = resolve_device(device, rank)  # before the plan is written: a bad --device leaves nothing behind
    if settings is None:
        settings = encode_settings(source, vae_spec(vae, vae_subfolder), dtype, chunk_size)
    plan = _encode_plan(source, dest, settings)
    names, k = plan["names"], plan["chunk_size"]
    mine = [c for c in range(rank, plan["num_chunks"], world_size) if not _part_path(dest, c).exists()]
    if not mine:
        return []
    model = load_vae(vae, vae_subfolder, dev)
    out_dtype = np.dtype(dtype)
    # Batches never straddle a chunk, so each chunk is finished (and saved) as soon as its last batch is done.
    batches = [
        list(range(s, min(s + batch_size, (c + 1) * k, len(names))))
        for c in mine
        for s in range(c * k, min((c + 1) * k, len(names)), batch_size)
    ]
    images = torch.utils.data.DataLoader(
        _Images(ImageSource(source), names),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
    )
    bar = tqdm(
        total=sum(len(b) for b in batches), desc=f"encode rank {rank}", unit="img", position=rank, disable=not progress
    )
    skipped: list[tuple[str, str]] = []
    part_moments: list[np.ndarray] = []
    part_index: list[np.ndarray] = []
    part_skipped: list[tuple[str, str]] = []
    shape = None  # (3, H, W) of the first image: every image must match it
    for batch in images:
        good_x, good_i = [], []
        for x, i, err in batch:
            if err is None and shape is not None and tuple(x.shape) != shape:
                err = f"image size {tuple(x.shape)} differs from {shape} of the first image"
            if err is None:
                shape = shape or tuple(x.shape)
                good_x.append(x)
                good_i.append(i)
            elif skip_bad:
                part_skipped.append((names[i], err))
            else:
                raise ValueError(f"cannot encode {Path(source) / names[i]}: {err} (pass --skip-bad to skip it)")
        if good_x:
            moments = encode_moments(model, torch.stack(good_x))
            part_moments.append(moments.cpu().numpy().astype(out_dtype))
            part_index.append(np.array(good_i, dtype=np.int64))
        bar.update(len(batch))
        last = batch[-1][1]
        if (last + 1) % k == 0 or last + 1 == len(names):  # the chunk's last batch: save it
            _save_part(dest, last // k, part_moments, part_index, part_skipped)
            skipped += part_skipped
            part_moments, part_index, part_skipped = [], [], []
    bar.close()
    return skipped


def _save_part(dest: Path, chunk: int, moments: list[np.ndarray], index: list[np.ndarray], skipped: list) -> None:
    m = np.concatenate(moments) if moments else np.zeros((0,), np.float32)
    idx = np.concatenate(index) if index else np.zeros((0,), np.int64)
    with atomic_open(_part_path(dest, chunk), "wb") as f:  # atomic: a present part is a complete part
        np.savez(f, moments=m, index=idx, skipped=np.array(json.dumps(skipped)))


def missing_parts(dest: str | Path) -> list[int]:
    """Chunks not encoded yet; a ``FileNotFoundError`` if nothing was planned in ``dest``."""
    dest = Path(dest)
    return [c for c in range(_read_plan(dest)["num_chunks"]) if not _part_path(dest, c).exists()]


def finalize_store(
    dest: str | Path,
    layout: str = "packed",
    scale: float = LATENT_SCALE,
    keep_parts: bool = False,
    vae: VaeSpec | None = None,
) -> dict:
    """Pack the encoded chunks into a latent store (``packed`` or ``files`` layout) with statistics; return the
    manifest, which records the VAE (``vae``: its source and factors; ``scale`` and ``shift`` are the factors
    training applies). The manifest is written last: a store with a manifest is complete."""
    dest = Path(dest)
    missing = missing_parts(dest)
    if missing:
        raise RuntimeError(
            f"{len(missing)} chunks of {dest} are not encoded yet (first: {_part_path(dest, missing[0])})"
        )
    plan = _read_plan(dest)
    labels = np.array(plan["labels"], dtype=np.int64)
    parts = [_part_path(dest, c) for c in range(plan["num_chunks"])]
    count, shape, dtype, skipped = 0, None, None, []
    for p in parts:  # first pass: sizes only (npz members load lazily)
        with np.load(p) as z:
            idx = z["index"]
            count += len(idx)
            skipped += json.loads(str(z["skipped"]))
            if len(idx) and shape is None:
                shape, dtype = z["moments"].shape[1:], z["moments"].dtype
    if count == 0:
        raise ValueError(f"every image of {plan['source']} was skipped: nothing to store in {dest}")
    writer = StoreWriter(dest, layout, count, shape, dtype)
    for p in tqdm(parts, desc="pack", unit="chunk", disable=len(parts) < 8):
        with np.load(p) as z:
            m, idx = z["moments"], z["index"]
        if len(idx):
            writer.add(m, labels[idx])
    recorded = {"vae": vae.to_dict(), "shift": vae.shift_factor} if vae is not None else {}
    scale = vae.scaling_factor if vae is not None else scale
    # The settings a rerun onto the finished store is checked against (:func:`finished_store`).
    recorded |= {k: plan[k] for k in ("resolution", "vae_checksum") if k in plan}
    manifest = writer.finish(plan["num_classes"], scale, source=plan["source"], skipped=skipped, **recorded)
    if not keep_parts:
        shutil.rmtree(dest / "parts")
    return manifest


def finished_store(dest: str | Path, settings: dict, layout: str | None = None) -> dict | None:
    """The manifest of the finished store at ``dest``, or None if there is none yet. A store finished under other
    settings (another VAE, source, resolution, dtype or ``layout``) is refused, naming the setting and both
    values; settings a store of an older version does not record, or that this run could not read (``None``),
    are not compared (nothing is written either way)."""
    path = Path(dest) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if layout is not None and manifest.get("layout", layout) != layout:
        raise ValueError(
            f"{path} records --layout {manifest['layout']} but this run has --layout {layout}:"
            " rerun with the recorded setting, or use a fresh --dest"
        )
    settings = {k: v for k, v in settings.items() if v is not None}
    vae = VaeSpec.from_manifest(manifest)
    recorded = {
        k: manifest[k] for k in ("source", "resolution", "vae_checksum", "dtype") if manifest.get(k) is not None
    }
    if vae is not None:
        recorded |= {"vae": vae.source, "vae_subfolder": vae.subfolder}
    check_settings(recorded, {k: v for k, v in settings.items() if k in recorded}, path)
    return manifest


def _encode_process(kwargs: dict) -> None:
    encode_shard(**kwargs)


def encode(
    source: str | Path,
    dest: str | Path,
    vae: str = DEFAULT_VAE,
    procs: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    layout: str = "packed",
    keep_parts: bool = False,
    wait_timeout: float = 24 * 3600.0,
    chunk_size: int = 1024,
    dtype: str = "float32",
    device: str = "auto",
    **shard_kwargs,
) -> dict | None:
    """Encode ``source`` into a latent store at ``dest``; returns the manifest, or ``None`` on ranks other than 0.

    ``procs > 1`` spawns that many local processes (one per GPU when CUDA exists). Under an external launcher
    (``torchrun``: ``RANK``/``WORLD_SIZE`` set, or ``rank``/``world_size`` given) each rank encodes its chunks and
    rank 0 waits for all of them, then packs. A store that already has a manifest is left as it is, and its
    manifest returned, when it was made with the same settings (:func:`finished_store`); a resumed run must
    have the settings its plan records (:func:`check_settings`).
    """
    dest = Path(dest)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if procs > 1 and world_size > 1:
        raise ValueError("use either procs > 1 (local processes) or an external launcher's ranks, not both")
    # Everything that can be refused is checked before anything is written: a bad --device, VAE or source leaves
    # no store and no plan behind.
    batch_size, workers = shard_kwargs.get("batch_size", 1), shard_kwargs.get("workers", 0)
    for flag, value, least in (("--chunk-size", chunk_size, 1), ("--procs", procs, 1), ("--batch-size", batch_size, 1),
                               ("--workers", workers, 0)):  # fmt: skip
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    resolve_device(device, rank)
    spec = vae_spec(vae, shard_kwargs.get("vae_subfolder"))
    finished = (dest / MANIFEST).exists()
    settings = encode_settings(source, spec, dtype, chunk_size, read_source=not finished or Path(source).exists())
    manifest = finished_store(dest, settings, layout)
    if manifest is not None:
        return manifest
    shard_kwargs |= {"chunk_size": chunk_size, "dtype": dtype, "device": device, "settings": settings}
    dest.mkdir(parents=True, exist_ok=True)
    if procs > 1:
        _encode_plan(source, dest, settings)  # written once, before the ranks race
        common = {**shard_kwargs, "source": source, "dest": dest, "vae": spec.source, "world_size": procs}
        ctx = mp.get_context("spawn")
        children = [
            ctx.Process(
                target=_encode_process,
                args=({**common, "rank": r},),
            )
            for r in range(procs)
        ]
        for p in children:
            p.start()
        for p in children:
            p.join()
        failed = [r for r, p in enumerate(children) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"encode processes {failed} failed; run the same command again to resume")
    else:
        encode_shard(source, dest, vae=spec.source, rank=rank, world_size=world_size, **shard_kwargs)
        if rank != 0:
            return None
        deadline = time.monotonic() + wait_timeout
        while missing_parts(dest):
            if time.monotonic() > deadline:
                raise TimeoutError(f"other ranks did not finish {dest} in time; run the command again to pack it")
            time.sleep(5.0)
    return finalize_store(dest, layout=layout, keep_parts=keep_parts, vae=spec)
