"""Helpers for the data tests: a synthetic ImageNet-style folder, a tiny random AutoencoderKL, and stores whose
moments encode the sample index so a loader's output can be traced back to the rows it read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet-like folder names, sorted = label order
PER_CLASS = 5
INDEX_STEP = 10.0  # index-coded stores: mean = INDEX_STEP * index, so round(mean / INDEX_STEP) = index


def make_image_folder(root: Path) -> Path:
    """Class subfolders of random images in varied sizes and modes (RGB JPEG, grey PNG, RGBA PNG, tiny), plus
    one unreadable file in the second class."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = (int(v) for v in rng.integers(24, 80, 2))
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            rgb[..., label] = 255  # class-dependent colour, so a wrong label mapping would show in the pixels
            if i == 1:
                Image.fromarray(rgb[..., 0]).save(d / f"img_{i}.png")  # greyscale
            elif i == 2:
                Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / f"img_{i}.png")  # RGBA
            else:
                Image.fromarray(rgb).save(d / f"img_{i}.JPEG", quality=95)
    (root / CLASSES[1] / "truncated.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def make_tiny_vae(path: Path, seed: int | None = None, **config) -> Path:
    """A 2-level AutoencoderKL (downsampling 2, 4 latent channels) with random weights (from ``seed`` when given),
    saved like a hub VAE; ``config`` overrides its settings (``latent_channels``, ``scaling_factor``, ...)."""
    import torch
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                    sample_size=16)  # fmt: skip
    AutoencoderKL(**(settings | config)).save_pretrained(path)
    return path


def index_coded_moments(count: int, channels: int = 4, hw: int = 4, std: float = 0.0, dtype=np.float32) -> np.ndarray:
    """Moments whose mean is ``INDEX_STEP * index`` everywhere and whose std is ``std``."""
    m = np.empty((count, 2 * channels, hw, hw), dtype=dtype)
    m[:, :channels] = (INDEX_STEP * np.arange(count)).reshape(-1, 1, 1, 1)
    m[:, channels:] = std
    return m


def decode_indices(x, scale: float = 0.18215) -> np.ndarray:
    """Sample indices of a batch drawn from an index-coded store (noise std must stay well below INDEX_STEP/2)."""
    return np.rint(x[:, 0, 0, 0].double().cpu().numpy() / scale / INDEX_STEP).astype(np.int64)
