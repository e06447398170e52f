"""``dfm prepare convert``: raw images → centre-cropped PNGs and a ``dataset.json`` index.

``convert`` reads an image folder with class subfolders (ImageNet's train layout), a zip of the same, or a folder
/zip with an EDM2-style ``dataset.json``; it writes ``{idx:08d}[:5]/img{idx:08d}.png`` plus ``dataset.json``
(``{"labels": [[name, label], ...], "classes": [...]}``) to a folder or a zip, the layout the seed's encode step
(and :mod:`dfm.data.encode`) reads. Work is spread over processes; finished images are kept, so an interrupted run
resumes; unreadable images are skipped, counted and listed in ``dataset.json`` under ``"skipped"``.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dfm.data.store import FILES_INDEX
from dfm.files import atomic_path, write_json_atomic

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TRANSFORMS = ("center-crop-dhariwal", "center-crop")
# Far above any training resolution, and small enough that one image (MAX_RESOLUTION² x 3 bytes = 768 MiB) fits
# in a worker's memory: a larger request is a typo, refused up front rather than as a MemoryError per image.
MAX_RESOLUTION = 16384
PLAN = "convert-plan.json"  # the settings of a conversion under way, beside its images; removed when it finishes


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def parse_resolution(text: str) -> tuple[int, int]:
    """``"256x256"`` → ``(256, 256)`` (width, height); a single number is a square: ``"64"`` → ``(64, 64)``."""
    parts = text.lower().split("x")
    try:
        w, h = (int(v) for v in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        raise ValueError(f"resolution must look like 256x256 (or 256 for a square), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"resolution must be positive, got {text!r}")
    if max(w, h) > MAX_RESOLUTION:
        raise ValueError(f"--resolution {text} is larger than {MAX_RESOLUTION}x{MAX_RESOLUTION}")
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


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey (PNG's ``I;16`` and PIL's 32-bit ``I``) is scaled to 8 bits first: PIL's own
    conversion clips every value above 255, which turns a 16-bit photo white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{img.mode} image with values in [{arr.min():g}, {arr.max():g}]: not 16-bit grey")
        img = Image.fromarray(np.round(arr / 257.0).astype(np.uint8), mode="L")  # 65535 / 255 = 257
    elif img.mode == "F":
        raise ValueError("floating-point image (mode F): its value range is unknown; convert it to 8 or 16 bits")
    return img.convert("RGB")


def transform_image(img: Image.Image, resolution: tuple[int, int], transform: str) -> np.ndarray:
    """RGB-convert and apply ``transform`` at ``resolution`` (width, height)."""
    img = to_rgb(img)
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
    else from the top-level folder of each image (sorted folder names → 0, 1, ...; deeper folders belong to
    their top-level class, as in ImageNet's layout). A source whose images all lie at its top is one class;
    images both at the top and in class folders are refused (their class is ambiguous)."""
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
    top = [n for n in images if "/" not in n]
    if top and len(top) < len(images):
        raise ValueError(
            f"{source.path}: {len(top)} images lie at the top (e.g. {top[0]}) beside class folders: their class "
            "is ambiguous; move them into a class folder, or give a dataset.json with the labels"
        )
    class_of = {n: n.split("/", 1)[0] if "/" in n else source.path.stem for n in images}
    classes = sorted(set(class_of.values()))
    label_of = {c: i for i, c in enumerate(classes)}
    return [(n, label_of[class_of[n]]) for n in images], classes


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
    # Atomic: a present file is a complete file, which is what resuming relies on (the temporary's name does not
    # end in .png, so an interrupted write is not taken for a finished image).
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)  # level 1: 3x faster, ~10% larger
    return idx, None


def _existing_outputs(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {f"{d.name}/{f.name}" for d in out_dir.iterdir() if d.is_dir() for f in d.iterdir() if f.suffix == ".png"}


def _check_options(resolution: tuple[int, int] | str, transform: str) -> tuple[int, int]:
    if isinstance(resolution, str):
        resolution = parse_resolution(resolution)
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
    if transform == "center-crop-dhariwal" and resolution[0] != resolution[1]:
        raise ValueError(f"center-crop-dhariwal needs a square resolution, got {resolution[0]}x{resolution[1]}")
    return resolution


def _convert_all(todo: list[tuple[int, str]], initargs: tuple, workers: int, bar: tqdm) -> dict[int, str]:
    """Convert ``todo`` over ``workers`` processes; ``{index: reason}`` of the unreadable images."""
    if workers <= 1 or len(todo) < 2:
        _convert_init(*initargs)
        results: Iterable[tuple[int, str | None]] = map(_convert_one, todo)
        pool = None
    else:
        pool = mp.get_context().Pool(workers, initializer=_convert_init, initargs=initargs)
        results = pool.imap_unordered(_convert_one, todo, chunksize=16)
    errors = {}
    try:
        for idx, error in results:
            if error is not None:
                errors[idx] = error
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return errors


def _recorded_settings(dest: Path, out_dir: Path) -> tuple[Path, dict] | None:
    """``(file, settings)`` an earlier conversion into ``dest`` recorded: the plan of one under way, else the
    ``dataset.json`` of a finished one (folder or zip); None when there was none."""
    if (out_dir / PLAN).is_file():
        return out_dir / PLAN, json.loads((out_dir / PLAN).read_text())
    if dest.is_dir() and (dest / FILES_INDEX).is_file():
        return dest / FILES_INDEX, json.loads((dest / FILES_INDEX).read_text())
    if dest.is_file() and zipfile.is_zipfile(dest):
        with zipfile.ZipFile(dest) as z:
            if FILES_INDEX in z.namelist():
                return dest, json.loads(z.read(FILES_INDEX))
    return None


def _check_recorded(dest: Path, out_dir: Path, settings: dict) -> bool:
    """Refuse to resume or redo a conversion under other settings than ``dest`` records (naming both values):
    images of two resolutions, transforms or sources would otherwise be mixed in one data set. Returns whether
    the resolution was recorded; where it was not (an older version), the caller checks the kept images' sizes
    (:func:`_check_kept_sizes`) instead."""
    found = _recorded_settings(dest, out_dir)
    if found is None:
        return False
    where, recorded = found
    for key, value in settings.items():
        if key in recorded and recorded[key] != value:
            show = {"resolution": lambda v: "x".join(map(str, v))}.get(key, str)
            raise ValueError(
                f"{where} records --{key} {show(recorded[key])} but this run asks for --{key} {show(value)}: "
                "rerun with the recorded setting, or convert into a fresh --dest"
            )
    return "resolution" in recorded


def _check_kept_sizes(out_dir: Path, kept: list[str], resolution: tuple[int, int]) -> None:
    """Every image kept from an earlier run has this run's size (the header is read, not the pixels)."""
    for name in kept:
        with Image.open(out_dir / name) as img:
            if img.size != tuple(resolution):
                raise ValueError(
                    f"{out_dir / name} is {img.size[0]}x{img.size[1]}, but this run asks for --resolution "
                    f"{resolution[0]}x{resolution[1]}: convert into a fresh --dest"
                )


def _write_zip(dest: Path, out_dir: Path, names: list[str]) -> None:
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name in names:  # stored, not deflated: PNGs are compressed already
            z.write(out_dir / name, name)
        z.write(out_dir / FILES_INDEX, FILES_INDEX)


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
    kept, under the same source, resolution and transform only: ``dataset.json`` records them (and ``PLAN`` while
    the conversion is under way), and another is refused before anything is written. Unreadable images are
    skipped and reported, never fatal; a source without images is refused.
    """
    resolution = _check_options(resolution, transform)
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {max_images}")
    src, dest = ImageSource(source), Path(dest)
    items, classes = scan_source(src)
    items = items[:max_images] if max_images is not None else items
    if not items:
        raise ValueError(f"no images found in {src.path} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    settings = {"source": str(src.path.resolve()), "resolution": list(resolution), "transform": transform}
    to_zip = dest.suffix.lower() == ".zip"
    out_dir = dest.with_name(dest.name + ".partial") if to_zip else dest
    resolution_recorded = _check_recorded(dest, out_dir, settings)
    done = _existing_outputs(out_dir)
    todo = [(i, name) for i, (name, _) in enumerate(items) if output_name(i) not in done]
    if not resolution_recorded:  # a header read per kept image: only where no record vouches for them
        _check_kept_sizes(out_dir, [output_name(i) for i in range(len(items)) if output_name(i) in done], resolution)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / PLAN).exists():
        write_json_atomic(out_dir / PLAN, settings)

    reused = len(items) - len(todo)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 32)
    bar = tqdm(total=len(items), initial=reused, desc="convert", unit="img", disable=not progress)
    errors = _convert_all(todo, (src, out_dir, resolution, transform), workers, bar)
    skipped = [(items[idx][0], error) for idx, error in errors.items()]

    present = _existing_outputs(out_dir)
    labels = [[output_name(i), y] for i, (_, y) in enumerate(items) if output_name(i) in present and i not in errors]
    index = {"labels": labels, "classes": classes, "skipped": [list(s) for s in skipped], **settings}
    write_json_atomic(out_dir / FILES_INDEX, index)
    if to_zip:
        _write_zip(dest, out_dir, [name for name, _ in labels])
        shutil.rmtree(out_dir)
    else:
        (out_dir / PLAN).unlink()
    return ConvertReport(written=len(todo) - len(skipped), reused=reused, skipped=skipped, dest=dest)
