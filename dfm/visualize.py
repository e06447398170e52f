"""Sampling a model from its run config, and the pictures people look at: grids with per-stage previews."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dfm.fast_sampling import ModelSampler
from dfm.files import atomic_path
from dfm.sampling import SampleResult, stage_noise


def sample_model(model, cfg, y: Tensor, generator: torch.Generator | None = None) -> SampleResult:
    """Sample ``model`` for labels ``y`` with the sampling settings of run config ``cfg`` (eval mode, no grad)."""
    device = y.device
    shapes = model.input_shapes()
    noise = stage_noise(y.shape[0], shapes, generator=generator, device=device)
    was_training = model.training
    model.eval()
    try:
        return ModelSampler(model, cfg).sample(noise, y, generator=generator)
    finally:
        model.train(was_training)


def decode_result(result: SampleResult, decoder=None) -> SampleResult:
    """``result`` with its final samples and every stage preview decoded to images by ``decoder`` (latents ->
    [-1, 1] images, ``dfm.vae.LatentDecoder``); unchanged without one (pixels, or no VAE known)."""
    if decoder is None:
        return result
    previews = [decoder(p) for p in result.previews]
    x = previews[-1] if len(result.previews) and result.previews[-1] is result.x else decoder(result.x)
    return SampleResult(bands=result.bands, x=x, previews=previews)


# Grid cells are shown at least this many pixels wide: an 8x8 digit becomes 64x64, a 16x16 one 64x64 too.
DISPLAY_SIDE = 64


def grid_scale(side: int) -> int:
    """Nearest-neighbour pixel repetition for a grid of ``side``-pixel cells, so that small images stay legible:
    ``DISPLAY_SIDE // side`` (8 for 8 px digits, 4 for 16 px), 1 from ``DISPLAY_SIDE`` on (a decoded 256 px
    sample needs none). Repetition, not interpolation: every pixel the model made stays visible as it is."""
    return max(1, DISPLAY_SIDE // side)


def to_uint8(x: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (one channel is repeated; more than 3 keep the first 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).numpy()


def tile(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image, row-major."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = images[i]
    return grid


def stage_preview_grid(result: SampleResult, rows: int, scale: int = 1) -> np.ndarray:
    """A row per class; in each row, every sample shows its previews after each phase side by side."""
    previews = [to_uint8(p) for p in result.previews]  # S x (N, H, W, 3)
    n = previews[0].shape[0]
    cells = np.stack([previews[s][i] for i in range(n) for s in range(len(previews))])
    grid = tile(cells, rows)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def class_rows(num_classes: int, per_class: int, device, max_rows: int = 10) -> Tensor:
    """Labels for a grid: ``per_class`` samples of each of the first ``max_rows`` classes, row-major."""
    rows = min(num_classes, max_rows)
    return torch.arange(rows, device=device).repeat_interleave(per_class)
