"""(DFM-)SiT models: parameter counts, what DFM adds, token grids, zero init, registry and build errors.

Full-size models are only built on the meta device (shapes, no storage, no forward); anything that runs
uses tiny overrides.
"""

from __future__ import annotations

import math

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


def _rope_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as complex multiplication (pair (2i, 2i + 1) is x_2i + j x_2i+1), in x's precision."""
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turn = torch.polar(torch.ones_like(angles, dtype=x.dtype), angles.to(x.dtype))
    return torch.view_as_real(z * turn).flatten(-2)


@pytest.mark.parametrize("grid, head_dim", [((4, 6), 64), ((3, 5), 72), ((2, 3, 4), 64)], ids=str)
def test_rope_rotates_pairs_and_scores_depend_on_offsets_only(grid, head_dim):
    from dfm.models import apply_rope, rope_angles

    angles64 = rope_angles(head_dim, grid).double()
    N = math.prod(grid)
    assert angles64.shape == (N, head_dim // 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, N, head_dim, generator=g)
    angles = angles64.float()
    got = apply_rope(x, torch.cos(angles), torch.sin(angles))
    same = _rope_reference(x, angles)  # torch's own fp32 error
    want = _rope_reference(x.double(), angles64)
    assert (got.double() - want).abs().max() <= 2 * (same.double() - want).abs().max() + 1e-6
    # The defining property: q.k of rotated vectors depends on the offset between the two positions only.
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    rq, rk = _rope_reference(q.expand(N, head_dim), angles64), _rope_reference(k.expand(N, head_dim), angles64)
    index = torch.arange(N).reshape(grid)
    zero, last, first = (0,) * len(grid), (0,) * (len(grid) - 1) + (1,), (1,) + (0,) * (len(grid) - 1)
    both = tuple(a + b for a, b in zip(first, last))
    assert torch.allclose(rq[index[zero]] @ rk[index[last]], rq[index[first]] @ rk[index[both]], atol=1e-10)
    assert not torch.allclose(rq[index[zero]] @ rk[index[zero]], rq[index[zero]] @ rk[index[last]], atol=1e-6)


def test_rope_model_has_no_additive_position_and_sees_positions():
    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10,
                        pos_embed="rope").eval()  # fmt: skip
    assert model.pos_embed is None and model.rope_cos.shape == (16, 16)  # 4x4 tokens, head dim 32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = [torch.randn(1, *shape) for shape in model.input_shapes()]
    t, y = torch.full((1, 2), 0.5), torch.tensor([3])
    flipped = [torch.flip(x_s, dims=[-1]) for x_s in x]  # the same content at mirrored positions
    with torch.no_grad():
        out, out_flipped = model(x, t, y), model(flipped, t, y)
    assert not torch.allclose(torch.flip(out[1], dims=[-1]), out_flipped[1], atol=1e-4)  # not position-blind
    with pytest.raises(ValueError, match="pos_embed"):
        build_model("SiT-S/2", pos_embed="learned")


def test_stage_embedding_follows_the_active_stages():
    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10,
                        stage_embedding=True).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = [torch.randn(2, *shape) for shape in model.input_shapes()]
    t, y = torch.full((2, 2), 0.5), torch.tensor([1, 2])
    mask = torch.tensor([[True, False], [True, True]])  # sample 0 at stage 0, sample 1 at stage 1
    with torch.no_grad():
        before = model(x, t, y, mask)
        model.stage_embedder.weight[1].add_(1.0)  # changes the conditioning of stage-1 samples only
        after = model(x, t, y, mask)
    assert torch.equal(before[0][0], after[0][0]) and not torch.allclose(before[0][1], after[0][1])
    assert "stage_embedder.weight" not in build_model("DFM-SiT-S/2", depth=1).state_dict()  # off by default
