"""InceptionV3: TF-graph input pipeline, feature shapes and taps, state-dict layout and round trip."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfm.evaluation.evaluator import ieee_fp32
from dfm.evaluation.inception import InceptionV3, load_inception, preprocess, resize_bilinear_tf


def tf_legacy_resize_loop(x: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) for one (H, W) image, pixel by pixel."""
    h, w = x.shape
    out = np.zeros((size, size))
    for i in range(size):
        in_y = i * (h / size)
        y0, y1 = int(np.floor(in_y)), min(int(np.ceil(in_y)), h - 1)
        ly = in_y - y0
        for j in range(size):
            in_x = j * (w / size)
            x0, x1 = int(np.floor(in_x)), min(int(np.ceil(in_x)), w - 1)
            lx = in_x - x0
            top = x[y0, x0] + (x[y0, x1] - x[y0, x0]) * lx
            bottom = x[y1, x0] + (x[y1, x1] - x[y1, x0]) * lx
            out[i, j] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("shape, size", [((5, 7), 11), ((13, 9), 4), ((6, 6), 6)])
def test_resize_matches_tf_legacy_bilinear(shape, size):
    x = torch.rand(2, 3, *shape) * 255
    got = resize_bilinear_tf(x, size)
    assert got.shape == (2, 3, size, size)
    ref = tf_legacy_resize_loop(x[1, 2].double().numpy(), size)
    np.testing.assert_allclose(got[1, 2].numpy(), ref, rtol=1e-5, atol=1e-4)
    if shape == (size, size):
        torch.testing.assert_close(got, x, rtol=0, atol=0)
    else:  # the legacy mapping is not torch's half-pixel one
        assert not torch.allclose(got, F.interpolate(x, size=(size, size), mode="bilinear"), atol=1e-2)


def test_preprocess_scales_like_the_tf_graph():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 4, 5, 3)
    x = preprocess(images)
    assert x.shape == (3, 3, 299, 299)
    for value, expected in zip(x[:, 0, 0, 0], (-1.0, 0.0, 127 / 128)):
        assert value.item() == expected
    with pytest.raises(ValueError, match="uint8 images"):
        preprocess(images.float())


def test_features_shapes_and_taps(inception_model):
    taps = {}
    hooks = [
        inception_model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("mixed_6/conv", o)),
        inception_model.Mixed_7c.register_forward_hook(lambda m, i, o: taps.__setitem__("mixed_10", o)),
    ]
    images = torch.randint(0, 256, (2, 40, 32, 3), dtype=torch.uint8)
    try:
        with torch.no_grad():
            pool, spatial, logits = inception_model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert taps["mixed_6/conv"].shape == (2, 192, 17, 17) and taps["mixed_10"].shape == (2, 2048, 8, 8)
    assert pool.std() > 1e-2  # the scaled random weights keep features far from zero
    # sFID: first 7 channels of mixed_6/conv, flattened in NHWC order (ADM's reshape of a TF NHWC tensor)
    torch.testing.assert_close(spatial[1].view(17, 17, 7), taps["mixed_6/conv"][1, :7].permute(1, 2, 0))
    torch.testing.assert_close(pool, taps["mixed_10"].mean(dim=(2, 3)))
    # IS logits: pool_3 @ W only; the fixture gives fc a non-zero bias, which must not enter
    torch.testing.assert_close(logits, pool @ inception_model.fc.weight.T)
    assert inception_model.fc.bias.abs().max() > 0.1


def test_state_dict_has_the_pytorch_fid_layout():
    model = InceptionV3()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision inception_v3, no aux, 1008 classes
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6d.branch7x7dbl_3.conv.weight": (160, 160, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


def test_weights_round_trip(inception_model, inception_weights):
    loaded = load_inception(inception_weights)
    images = torch.randint(0, 256, (2, 24, 24, 3), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(loaded(images), inception_model(images)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_weights_name_the_file_and_keys(tmp_path, inception_weights):
    state = torch.load(inception_weights)
    del state["Mixed_6e.branch1x1.conv.weight"]
    state["fc.weight"] = state["fc.weight"][:1000]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    pattern = (
        re.escape(str(path))
        + ".*missing keys: Mixed_6e.branch1x1.conv.weight.*unexpected keys: AuxLogits.fc.weight"
        + ".*wrong shapes: fc.weight: \\(1000, 2048\\) vs \\(1008, 2048\\)"
    )
    with pytest.raises(ValueError, match=pattern):
        load_inception(path)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_inception(tmp_path / "absent.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_a_float64_reference(inception_model):
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref64 = copy.deepcopy(inception_model).double().forward_preprocessed(preprocess(images).double())
        cpu32 = inception_model(images)
        with ieee_fp32(torch.device("cuda")):
            cuda32 = copy.deepcopy(inception_model).cuda()(images.cuda())
    for name, ref, cpu, cuda in zip(ref64._fields, ref64, cpu32, cuda32):
        cpu_err = (cpu.double() - ref).abs().max().item()
        cuda_err = (cuda.cpu().double() - ref).abs().max().item()
        assert cuda_err <= 2 * cpu_err + 1e-6 * ref.abs().max().item(), name
