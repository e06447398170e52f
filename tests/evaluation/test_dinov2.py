"""DINOv2 ViT for FDD: official state-dict layout, architecture read back from weights, feature shapes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dfm.evaluation.dinov2 import DINOV2_CONFIGS, DINOv2Config, DINOv2ViT, load_dinov2, preprocess

TINY = DINOv2Config(embed_dim=128, depth=2, num_heads=2, patch_size=14, img_size=56)


def tiny_model(cfg: DINOv2Config = TINY, seed: int = 0) -> DINOv2ViT:
    torch.manual_seed(seed)
    model = DINOv2ViT(cfg)
    for block in model.blocks:  # LayerScale's 1e-5 init would make the blocks nearly identity maps
        block.ls1.gamma.data.fill_(0.5)
        block.ls2.gamma.data.fill_(0.5)
    return model.eval()


def test_state_dict_has_the_official_layout():
    keys = set(DINOv2ViT(TINY).state_dict())
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {"norm.weight", "norm.bias"} | {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert keys == expected


def test_vitl14_matches_the_released_model_size():
    with torch.device("meta"):
        model = DINOv2ViT(DINOV2_CONFIGS["vitl14"])
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 304_368_640
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 1024)
    assert state["blocks.23.attn.qkv.weight"].shape == (3072, 1024)
    assert state["patch_embed.proj.weight"].shape == (1024, 3, 14, 14)


def test_cls_features_at_native_and_fdd_resolution():
    model = tiny_model()
    with torch.no_grad():
        native = model(torch.randn(2, 3, 56, 56))  # 4x4 grid: position embeddings used as stored
        fdd = model.forward_images(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))  # 224 px: 16x16 grid
    assert native.shape == (2, 128) and fdd.shape == (2, 128)
    assert torch.isfinite(fdd).all() and not torch.allclose(fdd[0], fdd[1])
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 50, 56))


def test_preprocess_resizes_and_normalises():
    x = preprocess(torch.full((1, 16, 16, 3), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], expected)


@pytest.mark.parametrize("shape", [(256, 256), (64, 48)])  # shrink with antialiasing / enlarge
def test_resize_follows_pil_bicubic_as_fdd_reference_does(shape):
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    ours = preprocess(torch.from_numpy(image)[None])[0].permute(1, 2, 0)
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    grey_levels = ((ours * std + mean) * 255).numpy()
    assert np.abs(grey_levels - pil).mean() < 0.4  # torch's default (non-antialiased, a = -0.75) bicubic: 4-19


@pytest.mark.parametrize("registers", [0, 4])
def test_weights_round_trip_and_config_read_from_the_file(tmp_path, registers):
    cfg = DINOv2Config(**{**TINY.__dict__, "num_register_tokens": registers})
    model = tiny_model(cfg)
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = load_dinov2(path)
    assert loaded.cfg == cfg
    images = torch.randint(0, 256, (2, 20, 20, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_images(images), model.forward_images(images), rtol=0, atol=0)


def test_chunked_block_keys_load(tmp_path):
    model = tiny_model()
    # A block_chunks=2 checkpoint of depth 2 keeps block i at "blocks.{chunk}.{i}", chunk = i here.
    state = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in model.state_dict().items()}
    assert "blocks.1.1.attn.qkv.weight" in state
    path = tmp_path / "chunked.pth"
    torch.save(state, path)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(load_dinov2(path)(x), model(x), rtol=0, atol=0)


def test_not_a_dinov2_file_names_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no 'cls_token'"):
        load_dinov2(path)
