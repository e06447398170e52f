"""Parity of the fused Laplacian kernels with the one PyTorch reference (``dfm.kernels.reference``)."""

from __future__ import annotations

import pytest
import torch
from dfm.kernels import laplacian, reference
from kernel_testing import DEVICES, DTYPES, LAYOUTS, assert_parity, make, max_err

from dfm import ops
from dfm.models import build_model
from dfm.sampling import StagedSampler, stage_noise, staged_schedule


def shapes_for(stages: int) -> list[tuple[int, int, int, int]]:
    f = 2 ** (stages - 1)  # smallest legal side; 3f x 5f gives odd low-level sizes at every level
    return [(1, 3, f, f), (2, 5, 3 * f, 5 * f)]


CASES = [(s, shape) for s in range(1, 5) for shape in shapes_for(s)]


@pytest.mark.parametrize("stages,shape", CASES, ids=[f"S{s}-{'x'.join(map(str, sh))}" for s, sh in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_decompose_recompose_parity(stages, shape, dtype, layout, device):
    x = make(shape, dtype, device, layout)
    ref64 = reference.decompose(x.double(), stages)
    bands = laplacian.decompose(x, stages)
    assert [b.shape for b in bands] == [r.shape for r in ref64]
    assert all(b.dtype == dtype for b in bands)
    assert_parity(bands, reference.decompose(x, stages), ref64, dtype)

    # Recomposition, fed non-contiguous bands in the same layout, against the fp64 recomposition.
    bands_in = [make(tuple(b.shape), dtype, device, layout, seed=s) for s, b in enumerate(ref64)]
    out = laplacian.recompose(bands_in)
    assert out.shape == x.shape and out.dtype == dtype
    assert_parity(out, reference.recompose(bands_in), reference.recompose([b.double() for b in bands_in]), dtype)

    # The round trip is as exact as the reference's.
    assert_parity(laplacian.recompose(bands), reference.recompose(reference.decompose(x, stages)), x.double(), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_coarse_stage_is_torchs_bit_for_bit_in_fp32(device):
    """The low-pass stage is pure 2x2 means, summed in PyTorch's order: bit-for-bit ``F.interpolate``'s."""
    if device == "cuda":
        pytest.skip("the GPU compiler may contract into FMAs; parity tolerances cover it")
    x = make((2, 3, 12, 20), torch.float32, device)
    assert torch.equal(laplacian.decompose(x, 3)[0], reference.decompose(x, 3)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_inputs_raise(device):
    with pytest.raises(ValueError, match="not divisible"):
        laplacian.decompose(make((1, 1, 6, 8), torch.float32, device), 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        laplacian.decompose(make((3, 8, 8), torch.float32, device), 2)
    with pytest.raises(ValueError, match="does not follow"):
        laplacian.recompose([make((1, 1, 4, 4), torch.float32, device), make((1, 1, 8, 6), torch.float32, device)])


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_output_unchanged_with_kernels(device):
    """The staged sampler's final recomposition goes through ``dfm.ops``: on and off give the same image."""
    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", input_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    with torch.no_grad():  # random heads, so that the sampler actually moves the state
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(device)
    sampler = StagedSampler(model, staged_schedule([2, 1], [0.5]), null_class=5)
    noise = stage_noise(2, [(3, 4, 4), (3, 8, 8)], generator=torch.Generator().manual_seed(1))
    noise = [n.to(device) for n in noise]
    y = torch.tensor([1, 3], device=device)
    with ops.triton_mode_as("off"):
        eager = sampler.sample(noise, y, previews=False)
    with ops.triton_mode_as("on"):
        fused = sampler.sample(noise, y, previews=False)
    for a, b in zip(eager.bands, fused.bands):
        assert torch.equal(a, b)
    exact = reference.recompose([b.double() for b in eager.bands])
    assert max_err(fused.x, exact) <= 2 * max_err(eager.x, exact) + 1e-6
