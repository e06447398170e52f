"""Laplacian pyramid: exact round trip, stage 0 is repeated bilinear halving, previews, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfm import pyramid

# Round-trip tolerances on unit-scale data: a handful of roundings per level.
ROUND_TRIP_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}

SHAPES = [(1, 3, 16, 16), (2, 5, 16, 24), (1, 1, 24, 8)]  # batch 1, odd channels, non-square


def bilinear_half(x: torch.Tensor) -> torch.Tensor:
    """The spec's ``down``, spelled with torch's own scale-factor interface."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_round_trip(stages, shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(stages), dtype=dtype)
    bands = pyramid.decompose(x, stages)
    assert len(bands) == stages
    assert all(b.dtype == dtype for b in bands)
    err = (pyramid.recompose(bands) - x).abs().max().item()
    assert err <= ROUND_TRIP_ATOL[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_band_shapes(stages, shape):
    B, C, H, W = shape
    bands = pyramid.decompose(torch.randn(shape), stages)
    expected = [(B, C, H >> (stages - 1 - s), W >> (stages - 1 - s)) for s in range(stages)]
    assert [tuple(b.shape) for b in bands] == expected
    assert pyramid.stage_shapes(H, W, stages) == [e[2:] for e in expected]


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stage0_is_repeated_bilinear_half(stages):
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x
    for _ in range(stages - 1):
        expected = bilinear_half(expected)
    bands = pyramid.decompose(x, stages)
    torch.testing.assert_close(bands[0], expected, rtol=0, atol=1e-15)
    # The finest band is what the ×2 upsampling of the next level misses.
    if stages > 1:
        low = bilinear_half(x)
        up = F.interpolate(low, scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(bands[-1], x - up, rtol=0, atol=1e-15)


def test_one_stage_is_the_input_itself():
    x = torch.randn(1, 3, 8, 8)
    (band,) = pyramid.decompose(x, 1)
    assert torch.equal(band, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_half_resize_is_2x2_average(dtype):
    x = torch.randn(2, 3, 10, 14, generator=torch.Generator().manual_seed(1), dtype=dtype)
    avg = F.avg_pool2d(x, kernel_size=2)
    atol = 1e-6 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(pyramid.down(x), avg, rtol=0, atol=atol)
    torch.testing.assert_close(bilinear_half(x), avg, rtol=0, atol=atol)


def test_constant_image_has_zero_detail_bands():
    # A bilinear pyramid of a constant has no detail: every band s >= 1 is exactly zero (edge clamping).
    x = torch.full((1, 2, 16, 16), 0.75, dtype=torch.float64)
    bands = pyramid.decompose(x, 4)
    assert torch.equal(bands[0], torch.full((1, 2, 2, 2), 0.75, dtype=torch.float64))
    for band in bands[1:]:
        assert band.abs().max().item() == 0.0


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_preview_shapes_and_full_preview(stages):
    x = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bands = pyramid.decompose(x, stages)
    for upto in range(stages):
        small = pyramid.preview(bands, upto)
        full = pyramid.preview(bands, upto, full_size=True)
        assert small.shape == bands[upto].shape
        assert full.shape == x.shape
        torch.testing.assert_close(small, pyramid.recompose(bands[: upto + 1]), rtol=0, atol=0)
    # The last preview is the input itself; the first one is stage 0.
    torch.testing.assert_close(pyramid.preview(bands, stages - 1), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(pyramid.preview(bands, stages - 1, full_size=True), x, rtol=0, atol=1e-12)
    assert torch.equal(pyramid.preview(bands, 0), bands[0])


def test_preview_full_size_is_upsampled_partial_recomposition():
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bands = pyramid.decompose(x, 3)
    expected = pyramid.up(pyramid.up(bands[0]))
    torch.testing.assert_close(pyramid.preview(bands, 0, full_size=True), expected, rtol=0, atol=0)
    expected = pyramid.up(pyramid.up(bands[0]) + bands[1])
    torch.testing.assert_close(pyramid.preview(bands, 1, full_size=True), expected, rtol=0, atol=0)


def test_preview_rejects_bad_stage():
    bands = pyramid.decompose(torch.randn(1, 1, 8, 8), 2)
    for upto in (-1, 2):
        with pytest.raises(ValueError, match=r"upto must lie in \[0, 1\]"):
            pyramid.preview(bands, upto)


@pytest.mark.parametrize(
    "height, width, stages, need",
    [(6, 8, 3, 4), (8, 10, 3, 4), (12, 12, 4, 8), (7, 8, 2, 2)],
)
def test_indivisible_shape_is_a_clear_error(height, width, stages, need):
    x = torch.randn(1, 3, height, width)
    with pytest.raises(ValueError, match=rf"{height}x{width} is not divisible by {need}"):
        pyramid.decompose(x, stages)
    with pytest.raises(ValueError, match=rf"{height}x{width}"):
        pyramid.stage_shapes(height, width, stages)


def test_patch_size_errors_name_the_sizes():
    # The finest patch must serve 2^(S-1); H, W must then be divisible by the patch.
    with pytest.raises(ValueError, match=r"patch size 2 cannot serve 3 stages.*2\^\(stages-1\) = 4"):
        pyramid.check_divisible(32, 32, 3, patch_size=2)
    with pytest.raises(ValueError, match=r"36x32 is not divisible by 8.*patch size 8"):
        pyramid.check_divisible(36, 32, 2, patch_size=8)
    pyramid.check_divisible(32, 48, 3, patch_size=4)  # fine: no error
    with pytest.raises(ValueError, match=r"stages must be >= 1, got 0"):
        pyramid.decompose(torch.randn(1, 1, 8, 8), 0)


def test_bad_rank_and_mismatched_bands_are_errors():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 8, 8\)"):
        pyramid.decompose(torch.randn(3, 8, 8), 2)
    with pytest.raises(
        ValueError, match=r"band of shape \(1, 1, 6, 6\) does not follow a level of shape \(1, 1, 4, 4\)"
    ):
        pyramid.recompose([torch.randn(1, 1, 4, 4), torch.randn(1, 1, 6, 6)])
