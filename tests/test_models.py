"""(DFM-)SiT models: parameter counts, what DFM adds, token grids, zero init, registry and build errors.

Full-size models are only built on the meta device (shapes, no storage, no forward); anything that runs
uses tiny overrides.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfm import pyramid
from dfm.models import MODELS, PATCHES, SIZES, DFMSiT, build_model, model_config

TINY = dict(input_size=8, in_channels=3, num_classes=10, depth=1, hidden_size=64, num_heads=2)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_meta(name: str, **overrides) -> DFMSiT:
    with torch.device("meta"):
        return build_model(name, **overrides)


@pytest.fixture(scope="module")
def full_size() -> dict[str, DFMSiT]:
    """The published sizes at 256 px latents (32x32x4, 1000 classes), each built once on the meta device."""
    return {name: build_meta(name) for name in ("SiT-B/2", "DFM-SiT-B/2", "SiT-XL/2", "DFM-SiT-XL/2")}


@pytest.mark.parametrize("name, published", [("SiT-B/2", 130e6), ("SiT-XL/2", 675e6)])
def test_parameter_counts_match_sit(full_size, name, published):
    assert abs(count(full_size[name]) - published) <= 0.01 * published


@pytest.mark.parametrize("size, extra", [("B", 2e6), ("XL", 4e6)])
def test_dfm_adds_only_per_stage_embedders_and_heads(full_size, size, extra):
    sit, dfm = full_size[f"SiT-{size}/2"], full_size[f"DFM-SiT-{size}/2"]
    added = count(dfm) - count(sit)
    # Stage 1 of DFM-*/2 has SiT's patch 2; stage 0 (patch 1) brings the only new parameters.
    stage0 = count(dfm.x_embedders[0]) + count(dfm.t_embedders[0]) + count(dfm.final_layers[0])
    assert added == stage0
    assert abs(added - extra) <= 0.15 * extra  # spec: about 2 M (B) / 4 M (XL) for two stages
    # Everything else, with DFM's stage 1 in the place of SiT's only stage, has SiT's names and shapes.
    per_stage = ("x_embedders.", "t_embedders.", "final_layers.")
    dfm_shapes = {
        n.replace(".1.", ".0.", 1) if n.startswith(per_stage) else n: p.shape
        for n, p in dfm.named_parameters()
        if not n.startswith(tuple(f"{m}0." for m in per_stage))
    }
    assert dfm_shapes == {n: p.shape for n, p in sit.named_parameters()}


def test_stage_patch_sizes():
    for size in SIZES:
        assert model_config(f"DFM-SiT-{size}/2").stage_patch_sizes == [1, 2]
    assert model_config("DFM-SiT-B/4").stage_patch_sizes == [2, 4]
    assert model_config("DFM-SiT-S/8", stages=4).stage_patch_sizes == [1, 2, 4, 8]
    assert model_config("SiT-L/4").stage_patch_sizes == [4]
    model = build_meta("DFM-SiT-S/2")
    assert [e.proj.kernel_size for e in model.x_embedders] == [(1, 1), (2, 2)]
    assert [head.linear.out_features for head in model.final_layers] == [1 * 1 * 4, 2 * 2 * 4]


@pytest.mark.parametrize(
    "name, stages, hw", [("DFM-SiT-S/2", 2, (8, 8)), ("DFM-SiT-S/4", 3, (16, 8)), ("DFM-SiT-S/8", 4, (16, 16))]
)
def test_every_stage_gives_the_same_token_grid(name, stages, hw):
    model = build_model(name, **{**TINY, "input_size": hw, "stages": stages})
    x = torch.randn(2, 3, *hw)
    bands = pyramid.decompose(x, stages)
    assert [tuple(b.shape[1:]) for b in bands] == model.input_shapes()
    p = model.config.patch_size
    grid = (hw[0] // p, hw[1] // p)
    assert model.grid == grid
    for s, band in enumerate(bands):
        assert model.x_embedders[s](band).shape == (2, grid[0] * grid[1], TINY["hidden_size"])


@pytest.mark.parametrize("name, stages", [("SiT-S/2", 1), ("DFM-SiT-S/2", 2), ("DFM-SiT-S/4", 3)])
def test_zero_output_at_init_with_stage_shapes(name, stages):
    model = build_model(name, **{**TINY, "input_size": 16, "stages": stages})
    bands = pyramid.decompose(torch.randn(3, 3, 16, 16), stages)
    t = torch.rand(3, stages)
    y = torch.tensor([0, 5, 10])  # 10 is the null label
    out = model(bands, t, y, torch.ones(3, stages, dtype=torch.bool))
    assert len(out) == stages
    for v, band in zip(out, bands):
        assert v.shape == band.shape
        assert torch.equal(v, torch.zeros_like(v))


def test_output_depends_on_every_input_once_trained():
    # Guards the zero-init test: with non-zero heads the outputs react to x, t and y.
    model = build_model("DFM-SiT-S/2", **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    g = torch.Generator().manual_seed(0)
    bands = pyramid.decompose(torch.randn(2, 3, 8, 8, generator=g), 2)
    t, y = torch.rand(2, 2, generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(bands, t, y)
        changed = [
            model([bands[0] + 1, bands[1]], t, y),
            model(bands, t.flip(1), y),
            model(bands, t, torch.tensor([3, 4])),
        ]
    for out in changed:
        assert all(not torch.allclose(a, b) for a, b in zip(out, ref))


def test_mask_none_means_all_active():
    model = build_model("DFM-SiT-S/2", **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    bands = pyramid.decompose(torch.randn(2, 3, 8, 8), 2)
    t, y = torch.rand(2, 2), torch.tensor([1, 2])
    with torch.no_grad():
        a = model(bands, t, y)
        b = model(bands, t, y, torch.ones(2, 2, dtype=torch.bool))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_registry_names_and_sizes():
    assert set(SIZES) == {"S", "B", "L", "XL"} and PATCHES == (1, 2, 4, 8)
    assert len(MODELS) == 2 * 4 * 4
    dims = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, hidden, heads) in dims.items():
        for p in PATCHES:
            for prefix, stages in (("SiT", 1), ("DFM-SiT", 2)):
                config = MODELS[f"{prefix}-{size}/{p}"]
                assert (config.depth, config.hidden_size, config.num_heads) == (depth, hidden, heads)
                assert (config.patch_size, config.stages) == (p, stages)
                assert (config.input_size, config.in_channels, config.num_classes) == (32, 4, 1000)


def test_build_model_overrides():
    model = build_model(
        "DFM-SiT-S/4", input_size=(16, 8), in_channels=1, num_classes=7, depth=2, hidden_size=32, num_heads=2
    )
    config = model.config
    assert config.hw == (16, 8) and (config.in_channels, config.num_classes) == (1, 7)
    assert (config.depth, config.hidden_size, config.num_heads, config.stages) == (2, 32, 2, 2)
    assert len(model.blocks) == 2
    assert model.y_embedder.table.num_embeddings == 8  # 7 classes + the null label
    assert model.grid == (4, 2)
    assert MODELS["DFM-SiT-S/4"].depth == 12  # overrides do not leak into the registry


def test_bad_names_and_overrides_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'SiT-M/2'; known: SiT-S/1"):
        build_model("SiT-M/2")
    with pytest.raises(ValueError, match=r"unknown model 'DFM-SiT-B/3'"):
        build_model("DFM-SiT-B/3")
    with pytest.raises(ValueError, match=r"unknown model override\(s\) \['dropout'\]"):
        build_model("SiT-S/2", dropout=0.1)
    with pytest.raises(ValueError, match=r"SiT-S/2 is a single-stage model; use DFM-SiT-S/2 for stages=2"):
        build_model("SiT-S/2", stages=2)


def test_bad_patch_sizes_are_clear_errors():
    # A two-stage model needs an even finest patch: stage 0 gets p / 2.
    with pytest.raises(ValueError, match=r"patch size 1 cannot serve 2 stages"):
        build_model("DFM-SiT-S/1", **TINY)
    with pytest.raises(ValueError, match=r"patch size 2 cannot serve 3 stages"):
        build_model("DFM-SiT-S/2", **{**TINY, "stages": 3})
    with pytest.raises(ValueError, match=r"resolution 12x12 is not divisible by 8 .*patch size 8"):
        build_model("SiT-S/8", **{**TINY, "input_size": 12})
    with pytest.raises(ValueError, match=r"hidden size 66 must be divisible by 4"):
        build_model("SiT-S/2", **{**TINY, "hidden_size": 66, "num_heads": 1})
    with pytest.raises(ValueError, match=r"hidden size 64 is not divisible by 3 heads"):
        build_model("SiT-S/2", **{**TINY, "num_heads": 3})


def test_wrong_number_of_stage_tensors_is_an_error():
    model = build_model("DFM-SiT-S/2", **TINY)
    with pytest.raises(ValueError, match="model has 2 stages but got 1 stage tensors"):
        model([torch.zeros(1, 3, 8, 8)], torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def test_backward_reaches_every_parameter():
    model = build_model("DFM-SiT-S/2", **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    bands = pyramid.decompose(torch.randn(2, 3, 8, 8), 2)
    out = model(bands, torch.rand(2, 2), torch.tensor([0, 10]))
    sum(v.square().sum() for v in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert missing == []


def test_qk_norm_is_the_authors_placement():
    """``qk_norm``: LayerNorm(head_dim, eps 1e-5, affine) on q and k after the head split, before the scaled dot
    product (timm 0.9's Attention, which the authors' code builds with qk_norm=True); written out in fp64."""
    from dfm.models import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, qk_norm=True).double()
    with torch.no_grad():  # away from LayerNorm's ones/zeros init, so the affine part is tested too
        for p in (*attn.q_norm.parameters(), *attn.k_norm.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q = F.layer_norm(q, (16,), attn.q_norm.weight, attn.q_norm.bias, eps=1e-5)
    k = F.layer_norm(k, (16,), attn.k_norm.weight, attn.k_norm.bias, eps=1e-5)
    heads = torch.softmax(q @ k.transpose(-2, -1) / 16**0.5, dim=-1) @ v
    want = F.linear(heads.transpose(1, 2).reshape(2, 5, 64), attn.proj.weight, attn.proj.bias)
    with torch.no_grad():
        got = attn(x)
    assert (got - want).abs().max() < 1e-12
    assert not Attention(64, 4).state_dict().keys() & {"q_norm.weight", "k_norm.weight"}  # off: no parameters
