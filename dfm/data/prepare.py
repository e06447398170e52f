"""Data preparation: raw images → centre-cropped images (``convert``) → SD-VAE moments in a latent store (``encode``).

``convert`` reads an image folder with class subfolders (ImageNet's train layout), a zip of the same, or a folder
/zip with an EDM2-style ``dataset.json``; it writes ``{idx:08d}[:5]/img{idx:08d}.png`` plus ``dataset.json``
(``{"labels": [[name, label], ...], "classes": [...]}``) to a folder or a zip, the layout the seed's encode step
reads. Work is spread over processes; finished images are kept, so an interrupted run resumes; unreadable
images are skipped, counted and listed in ``dataset.json`` under ``"skipped"``.

``encode`` runs diffusers' ``AutoencoderKL`` over those images and stores the encoder moments
``concat([mean, std])`` per image (the seed's ``img-mean-std`` convention). Images are split into chunks;
rank ``r`` of ``W`` encodes chunks ``c ≡ r (mod W)`` and writes each finished chunk atomically under
``parts/``, which makes the run resumable and lets ranks run on different GPUs or machines. Once every chunk
exists, the parts are packed into one memory-mappable ``moments.npy`` (or the per-image layout) with
``labels.npy``, per-channel latent statistics and ``manifest.json``, written last.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dfm.data.store import FILES_INDEX, LATENT_SCALE, MANIFEST, StoreWriter
from dfm.files import write_json_atomic

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TRANSFORMS = ("center-crop-dhariwal", "center-crop")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the SD VAE the seed's encode step uses


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def parse_resolution(text: str) -> tuple[int, int]:
    """``"256x256"`` → ``(256, 256)`` (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must look like 256x256, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"resolution must be positive, got {text!r}")
    return w, h


def center_crop_dhariwal(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``): halve with a box filter while the short side is
    at least ``2 * size``, bicubic-resize the short side to ``size``, crop the centre; ``(size, size, 3)`` uint8."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def center_crop(img: Image.Image, width: int, height: int) -> np.ndarray:
    """EDM's centre crop: the largest centred square, Lanczos-resized to ``(height, width, 3)`` uint8."""
    arr = np.asarray(img)
    s = min(arr.shape[:2])
    top, left = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
    square = Image.fromarray(arr[top : top + s, left : left + s])
    return np.asarray(square.resize((width, height), resample=Image.LANCZOS))


def transform_image(img: Image.Image, resolution: tuple[int, int], transform: str) -> np.ndarray:
    """RGB-convert and apply ``transform`` at ``resolution`` (width, height)."""
    img = img.convert("RGB")
    w, h = resolution
    if transform == "center-crop-dhariwal":
        if w != h:
            raise ValueError(f"center-crop-dhariwal needs a square resolution, got {w}x{h}")
        return center_crop_dhariwal(img, w)
    if transform == "center-crop":
        return center_crop(img, w, h)
    raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")


# ----------------------------------------------------------------------------------------------------------------
# Image sources: folders and zips, with class subfolders or a dataset.json


class ImageSource:
    """Read-only view of an image folder or zip; the zip is opened lazily once per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"image source {self.path} does not exist")
        self.is_zip = self.path.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise ValueError(f"image source {self.path} is neither a folder nor a zip file")
        self._zip: zipfile.ZipFile | None = None

    def names(self) -> list[str]:
        """Every file's path relative to the source, with ``/`` separators, sorted."""
        if self.is_zip:
            return sorted(n for n in self._zipfile().namelist() if not n.endswith("/"))
        root = str(self.path)
        out = []
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            out.extend(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files)
        return sorted(out)

    def open(self, name: str) -> io.BufferedIOBase:
        if self.is_zip:
            return self._zipfile().open(name)
        return open(self.path / name, "rb")

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}


def scan_source(source: ImageSource) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(name, label), ...], class_names)``: labels from a ``dataset.json`` at the root if there is one,
    else from the parent folder of each image (sorted folder names → 0, 1, ...)."""
    names = source.names()
    if FILES_INDEX in names:
        with source.open(FILES_INDEX) as f:
            index = json.load(f)
        entries = [(str(n), int(y) if y is not None else 0) for n, y in index.get("labels") or []]
        if not entries:  # unlabelled EDM2 data set: every image, class 0
            entries = [(n, 0) for n in names if Path(n).suffix.lower() in IMAGE_EXTS]
        classes = index.get("classes") or [str(c) for c in range(max((y for _, y in entries), default=-1) + 1)]
        return entries, classes
    images = [n for n in names if Path(n).suffix.lower() in IMAGE_EXTS]
    classes = sorted({str(Path(n).parent) for n in images})
    label_of = {c: i for i, c in enumerate(classes)}
    return [(n, label_of[str(Path(n).parent)]) for n in images], classes


def output_name(idx: int) -> str:
    """EDM2's image naming: ``00012/img00012345.png``."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


# ----------------------------------------------------------------------------------------------------------------
# convert


@dataclass
class ConvertReport:
    written: int  # images converted in this run
    reused: int  # images already present from an earlier run
    skipped: list[tuple[str, str]]  # (source name, reason) of unreadable images
    dest: Path


_worker: dict = {}


def _convert_init(source: ImageSource, out_dir: Path, resolution: tuple[int, int], transform: str) -> None:
    _worker.update(source=source, out_dir=out_dir, resolution=resolution, transform=transform)


def _convert_one(task: tuple[int, str]) -> tuple[int, str | None]:
    idx, name = task
    try:
        with _worker["source"].open(name) as f:
            img = Image.open(f)
            img.load()
        arr = transform_image(img, _worker["resolution"], _worker["transform"])
    except Exception as e:  # unreadable or truncated image: skip it and say why
        return idx, f"{type(e).__name__}: {e}"
    path = _worker["out_dir"] / output_name(idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)  # level 1: 3x faster, ~10% larger
    tmp.replace(path)  # atomic: a present file is a complete file, which is what resuming relies on
    return idx, None


def _existing_outputs(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {f"{d.name}/{f.name}" for d in out_dir.iterdir() if d.is_dir() for f in d.iterdir() if f.suffix == ".png"}


def convert(
    source: str | Path,
    dest: str | Path,
    resolution: tuple[int, int] | str = (256, 256),
    transform: str = "center-crop-dhariwal",
    workers: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Convert an image folder/zip into centre-cropped PNGs and ``dataset.json`` in a folder or zip ``dest``.

    Resumable: images already converted (in the folder, or the staging folder ``<dest>.partial`` of a zip) are
    kept. Unreadable images are skipped and reported, never fatal.
    """
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
    if transform == "center-crop-dhariwal" and resolution[0] != resolution[1]:
        raise ValueError(f"center-crop-dhariwal needs a square resolution, got {resolution[0]}x{resolution[1]}")
    src, dest = ImageSource(source), Path(dest)
    to_zip = dest.suffix.lower() == ".zip"
    out_dir = dest.with_name(dest.name + ".partial") if to_zip else dest
    out_dir.mkdir(parents=True, exist_ok=True)

    items, classes = scan_source(src)
    items = items[:max_images] if max_images is not None else items
    done = _existing_outputs(out_dir)
    todo = [(i, name) for i, (name, _) in enumerate(items) if output_name(i) not in done]
    reused = len(items) - len(todo)
    skipped: list[tuple[str, str]] = []
    workers = workers if workers is not None else min(os.cpu_count() or 1, 32)
    bar = tqdm(total=len(items), initial=reused, desc="convert", unit="img", disable=not progress)
    initargs = (src, out_dir, resolution, transform)
    if workers <= 1 or len(todo) < 2:
        _convert_init(*initargs)
        results: Iterable[tuple[int, str | None]] = map(_convert_one, todo)
        pool = None
    else:
        pool = mp.get_context().Pool(workers, initializer=_convert_init, initargs=initargs)
        results = pool.imap_unordered(_convert_one, todo, chunksize=16)
    try:
        for idx, error in results:
            if error is not None:
                skipped.append((items[idx][0], error))
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    present = _existing_outputs(out_dir)
    bad = {name for name, _ in skipped}
    labels = [[output_name(i), y] for i, (name, y) in enumerate(items) if output_name(i) in present and name not in bad]
    index = {"labels": labels, "classes": classes, "skipped": [list(s) for s in skipped]}
    write_json_atomic(out_dir / FILES_INDEX, index)
    if to_zip:
        tmp = dest.with_name(dest.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for name, _ in labels:
                z.write(out_dir / name, name)
            z.write(out_dir / FILES_INDEX, FILES_INDEX)
        tmp.replace(dest)
        shutil.rmtree(out_dir)
    return ConvertReport(written=len(todo) - len(skipped), reused=reused, skipped=skipped, dest=dest)


# ----------------------------------------------------------------------------------------------------------------
# encode


def load_vae(vae: str, subfolder: str | None = None, device: str | torch.device = "cpu"):
    """diffusers ``AutoencoderKL`` from a local folder or a hub name, in eval mode on ``device``, fp32."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder, low_cpu_mem_usage=False)
    return model.to(device).eval().requires_grad_(False)


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


def _encode_plan(source: str | Path, dest: Path, chunk_size: int) -> dict:
    """Image list and chunking, kept in ``parts/plan.json`` so a resumed or multi-rank run agrees on it."""
    src = ImageSource(source)
    names = set(src.names())
    if FILES_INDEX not in names:
        raise FileNotFoundError(f"{src.path} has no {FILES_INDEX}: run `dfm prepare convert` on the raw images first")
    with src.open(FILES_INDEX) as f:
        index = json.load(f)
    entries = index.get("labels") or []
    missing = [n for n, _ in entries if n not in names]
    if missing:
        raise FileNotFoundError(f"{src.path}: {len(missing)} images listed in {FILES_INDEX} are missing: {missing[0]}")
    labels = [int(y) if y is not None else 0 for _, y in entries]
    plan = {
        "source": str(src.path),
        "names": [n for n, _ in entries],
        "labels": labels,
        "num_classes": len(index.get("classes") or []) or (max(labels, default=-1) + 1),
        "chunk_size": chunk_size,
        "num_chunks": math.ceil(len(entries) / chunk_size),
    }
    path = dest / "parts" / "plan.json"
    if path.exists():
        with open(path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in ("names", "labels", "chunk_size")} != {
            k: plan[k] for k in ("names", "labels", "chunk_size")
        }:
            raise ValueError(
                f"{path} records another image list or chunk size: use a fresh --dest or delete {path.parent}"
            )
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def pick_device(device: str, rank: int) -> torch.device:
    """``"auto"`` → this rank's local GPU if CUDA exists, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


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
) -> list[tuple[str, str]]:
    """Encode this rank's chunks that are not on disk yet; return the (image, reason) pairs skipped."""
    dest = Path(dest)
    plan = _encode_plan(source, dest, chunk_size)
    names, k = plan["names"], plan["chunk_size"]
    mine = [c for c in range(rank, plan["num_chunks"], world_size) if not _part_path(dest, c).exists()]
    if not mine:
        return []
    dev = pick_device(device, rank)
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
    path = _part_path(dest, chunk)
    tmp = path.with_name(path.name + ".tmp.npz")
    m = np.concatenate(moments) if moments else np.zeros((0,), np.float32)
    idx = np.concatenate(index) if index else np.zeros((0,), np.int64)
    np.savez(tmp, moments=m, index=idx, skipped=np.array(json.dumps(skipped)))
    tmp.replace(path)  # atomic: a present part is a complete part


def missing_parts(dest: str | Path) -> list[int]:
    """Chunks not encoded yet (all of them if no plan exists)."""
    dest = Path(dest)
    plan_path = dest / "parts" / "plan.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{plan_path} does not exist: nothing was encoded into {dest}")
    with open(plan_path) as f:
        plan = json.load(f)
    return [c for c in range(plan["num_chunks"]) if not _part_path(dest, c).exists()]


def finalize_store(
    dest: str | Path,
    layout: str = "packed",
    scale: float = LATENT_SCALE,
    keep_parts: bool = False,
    vae: str | None = None,
) -> dict:
    """Pack the encoded chunks into a latent store (``packed`` or ``files`` layout) with statistics; return the
    manifest. The manifest is written last: a store with a manifest is complete."""
    dest = Path(dest)
    missing = missing_parts(dest)
    if missing:
        raise RuntimeError(
            f"{len(missing)} chunks of {dest} are not encoded yet (first: {_part_path(dest, missing[0])})"
        )
    with open(dest / "parts" / "plan.json") as f:
        plan = json.load(f)
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
        raise RuntimeError(f"every image of {plan['source']} was skipped: nothing to store in {dest}")
    writer = StoreWriter(dest, layout, count, shape, dtype)
    for p in tqdm(parts, desc="pack", unit="chunk", disable=len(parts) < 8):
        with np.load(p) as z:
            m, idx = z["moments"], z["index"]
        if len(idx):
            writer.add(m, labels[idx])
    manifest = writer.finish(plan["num_classes"], scale, source=plan["source"], vae=vae, skipped=skipped)
    if not keep_parts:
        shutil.rmtree(dest / "parts")
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
    **shard_kwargs,
) -> dict | None:
    """Encode ``source`` into a latent store at ``dest``; returns the manifest, or ``None`` on ranks other than 0.

    ``procs > 1`` spawns that many local processes (one per GPU when CUDA exists). Under an external launcher
    (``torchrun``: ``RANK``/``WORLD_SIZE`` set, or ``rank``/``world_size`` given) each rank encodes its chunks and
    rank 0 waits for all of them, then packs. A store that already has a manifest is left as it is.
    """
    dest = Path(dest)
    if (dest / MANIFEST).exists():
        with open(dest / MANIFEST) as f:
            return json.load(f)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if procs > 1 and world_size > 1:
        raise ValueError("use either procs > 1 (local processes) or an external launcher's ranks, not both")
    dest.mkdir(parents=True, exist_ok=True)
    scale = _vae_scale(vae, shard_kwargs.get("vae_subfolder"))
    if procs > 1:
        _encode_plan(source, dest, shard_kwargs.get("chunk_size", 1024))  # written once, before the ranks race
        ctx = mp.get_context("spawn")
        children = [
            ctx.Process(
                target=_encode_process,
                args=({**shard_kwargs, "source": source, "dest": dest, "vae": vae, "rank": r, "world_size": procs},),
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
        encode_shard(source, dest, vae=vae, rank=rank, world_size=world_size, **shard_kwargs)
        if rank != 0:
            return None
        deadline = time.monotonic() + wait_timeout
        while missing_parts(dest):
            if time.monotonic() > deadline:
                raise TimeoutError(f"other ranks did not finish {dest} in time; run the command again to pack it")
            time.sleep(5.0)
    return finalize_store(dest, layout=layout, scale=scale, keep_parts=keep_parts, vae=vae)


def _vae_scale(vae: str, subfolder: str | None) -> float:
    """The VAE's ``scaling_factor`` from its config (0.18215 for the SD VAE), without loading weights."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(vae, subfolder=subfolder)
    except Exception:
        return LATENT_SCALE
    return float(config.get("scaling_factor", LATENT_SCALE))
