"""The pictures people look at (``dfm.visualize``): uint8 conversion, tiling, per-stage grids, atomic PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.sampling import SampleResult
from dfm.visualize import class_rows, save_png, stage_preview_grid, tile, to_uint8


def test_to_uint8_rounds_clamps_and_makes_three_channels():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 2, 3)
    out = to_uint8(x)
    # (x + 1) * 127.5 rounded (not truncated: 0 -> 127.5 -> 128), outside [-1, 1] clamped
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8
    assert out[0, ..., 0].tolist() == [[0, 0, 128], [191, 255, 255]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey to RGB
    four = to_uint8(torch.zeros(2, 4, 2, 2))  # more than 3 channels: the first 3 (latents without a VAE)
    assert four.shape == (2, 2, 2, 3)


def test_tile_places_images_row_major_with_padding():
    images = np.stack([np.full((2, 3, 3), i * 40, np.uint8) for i in range(5)])
    grid = tile(images, rows=2, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)  # 3 columns for 5 images
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 40 and grid[4, 1, 0] == 120 and grid[4, 5, 0] == 160
    assert grid[4, 9, 0] == 255 and grid[0, 0, 0] == 255  # the empty sixth cell and the padding stay white


def test_stage_preview_grid_shows_every_phase_of_every_sample():
    n, stages = 4, 2
    previews = [torch.full((n, 1, 4, 4), -1.0 + s) for s in range(stages)]  # phase s: a flat grey level
    result = SampleResult(bands=[], x=previews[-1], previews=previews)
    grid = stage_preview_grid(result, rows=2, scale=3)
    cell = 4 + 1
    assert grid.shape == ((2 * cell + 1) * 3, (n // 2 * stages * cell + 1) * 3, 3)
    first_row = grid[3 : 3 + 12 : 3, :, 0]  # the first image row, undone from the x3 nearest upscale
    levels = [int(first_row[0, (1 + k * cell) * 3]) for k in range(n // 2 * stages)]
    assert levels == [0, 128, 0, 128]  # sample 0: phase 0, phase 1; sample 1: phase 0, phase 1


def test_save_png_is_atomic_and_readable(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path = save_png(grid, tmp_path / "deep" / "g.png")
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.png"]  # no temporary left behind


def test_class_rows_gives_per_class_samples_of_the_first_ten_classes():
    assert class_rows(3, 2, "cpu").tolist() == [0, 0, 1, 1, 2, 2]
    assert class_rows(1000, 1, "cpu").tolist() == list(range(10))
    with pytest.raises(RuntimeError):
        class_rows(3, -1, "cpu")
