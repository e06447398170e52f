"""Compiled (and on CUDA, CUDA-graph) staged sampler vs the eager StagedSampler on the same noise.

One compiled sampler is shared by the CPU tests: its schedule has both unguided and guided (CFG,
doubled batch) steps, so the two step variants are compiled once each and reused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import assert_parity

from dfm import pyramid
from dfm.fast_sampling import FastStagedSampler, sampler_mode, schedule_rows
from dfm.models import build_model
from dfm.sampling import StagedSampler, stage_noise, staged_schedule

CLASSES = 10
STEPS, THRESHOLDS = [4, 2], [0.3]
CFG = dict(cfg_scale=3.0, guidance_low=0.0, guidance_high=0.7, null_class=CLASSES)


def _model(device="cpu"):
    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", depth=2, input_size=16, num_classes=CLASSES).to(device).eval()
    with torch.no_grad():  # leave adaLN-Zero: a zero-initialised model would output v = 0 everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(model, batch, device="cpu"):
    g = torch.Generator(device=device).manual_seed(1)
    noise = stage_noise(batch, model.input_shapes(), generator=g, device=device)
    y = torch.randint(0, CLASSES, (batch,), generator=g, device=device)
    return noise, y


def _reference64(model, schedule, noise, y, method="euler"):
    """The eager step in float64 (model and state): sets the scale of float32 rounding error."""
    sampler = StagedSampler(copy.deepcopy(model).double(), schedule, method=method, **CFG)
    x = [n.double() for n in noise]
    ends, shown = set(schedule.phase_ends()), []
    tab_t_next = schedule.t_next.float().to(noise[0].device)
    with torch.no_grad():
        for i in range(schedule.num_steps):
            x, v = sampler.step_at(x, y, i)
            if i in ends:
                s = len(shown)
                est = [x[j] - tab_t_next[i, j] * v[j] for j in range(s + 1)]
                shown.append(pyramid.preview(est + x[s + 1 :], s, full_size=True))
    return pyramid.recompose(x), shown


@pytest.fixture(scope="module")
def setup():
    model = _model()
    schedule = staged_schedule(STEPS, THRESHOLDS)
    eager = StagedSampler(model, schedule, **CFG)
    assert set(eager.step_is_guided) == {False, True}, "the schedule must exercise both step variants"
    return model, schedule, eager, FastStagedSampler(eager, mode="compile")


def test_compiled_sampler_matches_eager_images_and_previews(setup):
    model, schedule, eager, fast = setup
    noise, y = _inputs(model, batch=3)
    want = eager.sample(noise, y)
    got = fast.sample(noise, y)
    ref_x, ref_previews = _reference64(model, schedule, noise, y)
    atol = 1e-7 * ref_x.abs().max().item()
    assert_parity(got.x, want.x, ref_x, atol, "final image")
    assert len(got.previews) == len(want.previews) == schedule.stages
    for s, (p_fast, p_eager, p_ref) in enumerate(zip(got.previews, want.previews, ref_previews)):
        assert p_fast.shape == p_eager.shape == got.x.shape
        assert_parity(p_fast, p_eager, p_ref, atol, f"preview after phase {s}")
    for b_fast, b_eager in zip(got.bands, want.bands):
        assert b_fast.shape == b_eager.shape and b_fast.dtype == b_eager.dtype == torch.float32
    # Previews differ from the final image (they are real intermediate states, not copies of it).
    assert not torch.allclose(got.previews[0], got.x, atol=1e-3)


def test_compiled_sampler_is_static_after_warmup(setup):
    model, _, _, fast = setup
    noise, y = _inputs(model, batch=3)
    first = fast.sample(noise, y, previews=False)
    with torch.compiler.set_stance("fail_on_recompile"):  # every step reuses one of the two graphs
        second = fast.sample(noise, y, previews=False)
        other_labels = fast.sample(noise, (y + 1) % CLASSES, previews=False)
    assert first.previews == [] and second.previews == []
    assert torch.equal(first.x, second.x)
    assert not torch.equal(first.x, other_labels.x)


def test_schedule_rows_are_the_eager_tables(setup):
    _, schedule, eager, _ = setup
    rows = schedule_rows(eager, "cpu")
    assert rows.shape == (schedule.num_steps, 4, schedule.stages) and rows.dtype == torch.float32
    assert torch.equal(rows[:, 0], schedule.t.float())
    assert torch.equal(rows[:, 1], schedule.t_next.float())
    assert torch.equal(rows[:, 2] > 0.5, schedule.active)
    assert torch.equal(rows[:, 3] > 0.5, eager.guided)


def test_mode_predicate_and_eager_mode(setup):
    model, _, eager, _ = setup
    assert sampler_mode("cpu") == "eager"
    assert sampler_mode("cpu", "compile") == "compile"
    with pytest.raises(RuntimeError, match="CUDA"):
        sampler_mode("cpu", "cudagraph")
    with pytest.raises(ValueError, match="mode"):
        sampler_mode("cpu", "graph")
    with pytest.raises(ValueError, match="reduce-overhead"):  # torch's graphs cannot nest in ours
        FastStagedSampler(eager, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="reduce-overhead"):
        FastStagedSampler(eager, mode="cudagraph", compile_mode="reduce-overhead")
    noise, y = _inputs(model, batch=2)
    want, got = eager.sample(noise, y), FastStagedSampler(eager, mode="auto").sample(noise, y)
    assert torch.equal(want.x, got.x) and all(torch.equal(a, b) for a, b in zip(want.previews, got.previews))
    with pytest.raises(ValueError, match="stages"):
        FastStagedSampler(eager).sample(noise[:1], y)


GRAPH_MODES = {
    "cudagraph": dict(mode="cudagraph"),
    "reduce-overhead": dict(mode="compile", compile_mode="reduce-overhead"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", list(GRAPH_MODES))  # ours, and torch's that the benchmark compares them with
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("batch", [1, 4])
def test_cudagraph_sampler_matches_eager(method, batch, graphs):
    model = _model("cuda")
    schedule = staged_schedule(STEPS, THRESHOLDS)
    eager = StagedSampler(model, schedule, method=method, **CFG)
    fast = FastStagedSampler(eager, **GRAPH_MODES[graphs])
    noise, y = _inputs(model, batch, device="cuda")
    want = eager.sample(noise, y)
    got = fast.sample(noise, y)
    ref_x, ref_previews = _reference64(model, schedule, noise, y, method)
    atol = 1e-7 * ref_x.abs().max().item()
    assert_parity(got.x, want.x, ref_x, atol, "final image")
    for s, (p_fast, p_eager, p_ref) in enumerate(zip(got.previews, want.previews, ref_previews)):
        assert_parity(p_fast, p_eager, p_ref, atol, f"preview after phase {s}")
    # Replays refresh the static buffers from the new inputs: new labels, new result; same inputs, same result.
    again = fast.sample(noise, y)
    assert torch.equal(again.x, got.x)
    other = fast.sample(noise, (y + 1) % CLASSES)
    want_other = eager.sample(noise, (y + 1) % CLASSES)
    assert (other.x - want_other.x).abs().max() <= 4 * (got.x - want.x).abs().max() + atol
    assert not torch.equal(other.x, got.x)


def test_model_sampler_is_the_samplers_of_the_config():
    """The one entry (ModelSampler) runs exactly the sampler its config names, in its flow space: the staged ODE
    sampler (eager, or through FastStagedSampler, which is eager on the host) and the SDE baseline."""
    from pathlib import Path

    from dfm.config import load_config
    from dfm.fast_sampling import ModelSampler
    from dfm.models import DFMSiT
    from dfm.normalization import FlowSpace
    from dfm.sampling import sample_sde

    root = Path(__file__).resolve().parent.parent
    tiny = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "data.resolution=8"]
    dfm_overrides = ["model=DFM-SiT-S/2", "sample.num_steps_per_scale=[3,2]", "dfm.stage_rms=[0.7,0.4]"]
    dfm_cfg = load_config(root / "configs" / "dfm_digits.yaml", tiny + dfm_overrides)
    torch.manual_seed(0)
    model = DFMSiT.from_config(dfm_cfg).eval()
    with torch.no_grad():  # zero-initialised heads would make every velocity zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    noise = stage_noise(3, model.input_shapes(), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 4, 9])
    want = StagedSampler.from_config(model, dfm_cfg).sample(noise, y)
    assert StagedSampler.from_config(model, dfm_cfg).flow == FlowSpace((0.7, 0.4))
    for mode in ("eager", "auto"):
        got = ModelSampler(model, dfm_cfg, mode=mode).sample(noise, y)
        assert torch.equal(got.x, want.x) and all(torch.equal(a, b) for a, b in zip(got.previews, want.previews))

    sit_cfg = load_config(root / "configs" / "sit_digits.yaml",
                          tiny + ["model=SiT-S/2", "sample.mode=sde", "sample.num_steps=4",
                                  "dfm.normalize_stages=true", "dfm.stage_rms=[0.6]"])  # fmt: skip
    sit = DFMSiT.from_config(sit_cfg).eval()
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    z = stage_noise(3, sit.input_shapes(), generator=torch.Generator().manual_seed(2))
    got = ModelSampler(sit, sit_cfg).sample(z, y, generator=torch.Generator().manual_seed(3))
    x = sample_sde(
        sit, z[0], y, num_steps=4, generator=torch.Generator().manual_seed(3), flow=FlowSpace.from_config(sit_cfg)
    )
    assert torch.equal(got.x, x) and got.bands[0] is got.x and got.previews[0] is got.x
    unscaled = sample_sde(sit, z[0], y, num_steps=4, generator=torch.Generator().manual_seed(3), flow=FlowSpace())
    assert not torch.allclose(got.x, unscaled)  # the flow space is not the identity here: dropping it would show
