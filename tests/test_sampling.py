"""Staged sampler: the static schedule, integration accuracy on analytic fields, CFG, previews, SDE baseline.

Analytic velocity fields stand in for a trained model (same call signature):
- point mass: data is one point ``c`` per stage, so ``v = (x_t - c) / t`` exactly and every trajectory
  is a straight line towards ``c``: Euler is exact even along the staged schedule;
- linear ``dx/dt = lambda x``: the exact solution is known, so Euler and Heun show their orders;
- Gaussian data ``N(mu, sigma^2)``: the exact velocity and score are known, so the SDE sampler must
  reproduce the data distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from dfm import pyramid
from dfm.models import build_model
from dfm.sampling import StagedSampler, guided_table, sample_sde, stage_noise, staged_schedule

NUM_CLASSES = 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shapes_for(stages: int, channels: int = 3, size: int = 16) -> list[tuple[int, int, int]]:
    return [(channels, size >> (stages - 1 - s), size >> (stages - 1 - s)) for s in range(stages)]


class PointMass:
    """Exact velocity when the data of label y is the single point ``centres[s][y]`` in every stage."""

    def __init__(self, centres: list[torch.Tensor]):
        self.centres = centres  # per stage (NUM_CLASSES + 1, C, H_s, W_s); the last row is the null label
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, y, mask):
        self.batch_sizes.append(y.shape[0])
        return [(x_s - c[y]) / t[:, s].view(-1, 1, 1, 1) for s, (x_s, c) in enumerate(zip(x, self.centres))]


class Linear:
    """``dx/dt = lam * x`` in every stage."""

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, x, t, y, mask):
        return [self.lam * x_s for x_s in x]


def point_mass(stages: int, seed: int = 0) -> PointMass:
    g = gen(seed)
    return PointMass([torch.randn(NUM_CLASSES + 1, *shape, generator=g) for shape in shapes_for(stages)])


def tiny_model(stages: int = 2, seed: int = 0) -> torch.nn.Module:
    model = build_model(
        "DFM-SiT-S/2" if stages == 2 else "SiT-S/2",
        input_size=8,
        in_channels=3,
        num_classes=NUM_CLASSES,
        depth=1,
        hidden_size=64,
        num_heads=2,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=gen(seed + p.numel()))
    return model.eval()


# -- the static schedule ------------------------------------------------------------------------------


def test_default_schedule_is_the_reference():
    sched = staged_schedule([40, 10], [0.1])
    assert sched.t.shape == sched.t_next.shape == sched.active.shape == (50, 2)
    assert sched.t.dtype == torch.float64 and sched.active.dtype == torch.bool
    i = torch.arange(40, dtype=torch.float64)
    # Phase 0: stage 0 goes 1.0, 0.9775, ..., 0.1225 -> 0.1; stage 1 waits at 1, inactive.
    torch.testing.assert_close(sched.t[:40, 0], 1 - 0.0225 * i, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t_next[:40, 0], 1 - 0.0225 * (i + 1), rtol=0, atol=1e-12)
    assert sched.t[:3, 0].tolist() == pytest.approx([1.0, 0.9775, 0.955], abs=1e-12)
    assert sched.t[39, 0].item() == pytest.approx(0.1225, abs=1e-12)
    assert (sched.t[:40, 1] == 1).all() and (sched.t_next[:40, 1] == 1).all()
    assert sched.active[:40, 0].all() and not sched.active[:40, 1].any()
    # Phase 1: stage 1 goes 1.0, 0.9, ..., 0.1 -> 0; stage 0 goes 0.1, 0.09, ..., 0.01 -> 0; both active.
    j = torch.arange(10, dtype=torch.float64)
    torch.testing.assert_close(sched.t[40:, 1], 1 - 0.1 * j, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t[40:, 0], 0.1 - 0.01 * j, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t_next[40:, 1], 0.9 - 0.1 * j, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t_next[40:, 0], 0.09 - 0.01 * j, rtol=0, atol=1e-12)
    assert sched.active[40:].all()
    assert (sched.t_next[-1] == 0).all()
    assert sched.num_steps == 50 and sched.stages == 2 and sched.phase_ends() == [39, 49]


def test_one_stage_schedule_is_plain_linear():
    sched = staged_schedule([50], [])
    torch.testing.assert_close(sched.t[:, 0], torch.linspace(1, 0, 51, dtype=torch.float64)[:-1], rtol=0, atol=0)
    torch.testing.assert_close(sched.t_next[:, 0], torch.linspace(1, 0, 51, dtype=torch.float64)[1:], rtol=0, atol=0)
    assert sched.active.all()


@pytest.mark.parametrize(
    "steps, thresholds",
    [
        ([5, 4, 3], [0.3, 0.1]),
        ([4, 4, 4], [0.5, 0.05]),
        ([3, 3, 3, 3], [0.5, 0.2, 0.05]),
        ([2, 7, 1, 5], [0.9, 0.4, 0.3]),
    ],
)
def test_multi_stage_schedule_is_monotone_and_continuous(steps, thresholds):
    sched = staged_schedule(steps, thresholds)
    S, N = len(steps), sum(steps)
    assert sched.t.shape == (N, S)
    assert (sched.t[0] == 1).all() and (sched.t_next[-1] == 0).all()
    assert torch.equal(sched.t[1:], sched.t_next[:-1])  # each step starts where the last one ended
    assert (sched.t_next <= sched.t).all()  # every stage's t is non-increasing step to step
    start = 0
    for s, n in enumerate(steps):
        rows = slice(start, start + n)
        assert sched.active[rows, : s + 1].all() and not sched.active[rows, s + 1 :].any()
        assert (sched.t[rows, s + 1 :] == 1).all() and (sched.t_next[rows, s + 1 :] == 1).all()
        assert (sched.t_next[rows, s] < sched.t[rows, s]).all()  # the phase's own stage always moves
        end = thresholds[s] if s < S - 1 else 0.0
        assert sched.t_next[start + n - 1, s].item() == pytest.approx(end, abs=1e-12)
        for j in range(s):  # product rule for the stages already under way
            torch.testing.assert_close(sched.t[rows, j], thresholds[j] * sched.t[rows, j + 1], rtol=0, atol=1e-15)
        start += n


@pytest.mark.parametrize(
    "steps, thresholds, message",
    [
        ([], [], "at least one"),
        ([40, 0], [0.1], "positive integers, got \\[40, 0\\]"),
        ([40, 2.5], [0.1], "positive integers"),
        ([40, 10], [], "one entry per stage boundary \\(1\\), got 0"),
        ([40, 10], [0.1, 0.05], "one entry per stage boundary \\(1\\), got 2"),
        ([40, 10], [1.0], "strictly between 0 and 1"),
        ([40, 10], [0.0], "strictly between 0 and 1"),
        ([4, 4, 4], [0.1, 0.3], "strictly decreasing, got \\[0.1, 0.3\\]"),
        ([4, 4, 4], [0.2, 0.2], "strictly decreasing"),
    ],
)
def test_schedule_argument_errors(steps, thresholds, message):
    with pytest.raises(ValueError, match=message):
        staged_schedule(steps, thresholds)


def test_sampler_argument_errors():
    sched = staged_schedule([3, 2], [0.2])
    with pytest.raises(ValueError, match="method must be 'euler' or 'heun', got 'rk4'"):
        StagedSampler(Linear(1.0), sched, method="rk4")
    with pytest.raises(ValueError, match="schedule has 2 stages but got 1 noise tensors"):
        StagedSampler(Linear(1.0), sched).sample([torch.zeros(1, 1, 4, 4)], torch.zeros(1, dtype=torch.long))


# -- integration accuracy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, thresholds",
    [([12], []), ([40, 10], [0.1]), ([6, 4], [0.3]), ([4, 3, 2], [0.4, 0.1]), ([3, 3, 2, 2], [0.5, 0.2, 0.05])],
)
def test_euler_is_exact_on_a_point_mass(steps, thresholds):
    S = len(steps)
    field = point_mass(S)
    y = torch.tensor([0, 3, 7])
    noise = stage_noise(3, shapes_for(S), gen(1))
    result = StagedSampler(field, staged_schedule(steps, thresholds), null_class=NUM_CLASSES).sample(noise, y)
    for s in range(S):
        torch.testing.assert_close(result.bands[s], field.centres[s][y], rtol=0, atol=2e-5)
    torch.testing.assert_close(result.x, pyramid.recompose([c[y] for c in field.centres]), rtol=0, atol=1e-4)
    assert field.batch_sizes == [3] * sum(steps)  # one model call per step: NFE = sum(steps)


def test_stages_wait_untouched_until_their_phase():
    field = point_mass(3)
    y = torch.tensor([1, 2])
    noise = stage_noise(2, shapes_for(3), gen(2))
    sched = staged_schedule([3, 2, 2], [0.4, 0.1])
    sampler = StagedSampler(field, sched, null_class=NUM_CLASSES)
    x = [n.clone() for n in noise]
    for i in range(sched.num_steps):
        x, _ = sampler.step_at(x, y, i)
        for s in range(3):
            if not sched.active[: i + 1, s].any():
                assert torch.equal(x[s], noise[s])
        # On the straight path, a stage at time t sits at c + t * (noise - c).
        for s in range(3):
            t = sched.t_next[i, s].item()
            expected = field.centres[s][y] + t * (noise[s] - field.centres[s][y])
            torch.testing.assert_close(x[s], expected, rtol=0, atol=2e-5)


def linear_errors(method: str, steps: list[int], thresholds: list[float], lam: float = 1.5) -> list[float]:
    """Max error per stage of integrating dx/dt = lam * x from t = 1 to 0 (exact: x(0) = x(1) exp(-lam))."""
    S = len(steps)
    noise = stage_noise(2, shapes_for(S, size=4), gen(3))
    result = StagedSampler(Linear(lam), staged_schedule(steps, thresholds), method=method).sample(
        noise, torch.zeros(2, dtype=torch.long), previews=False
    )
    return [(result.bands[s].double() - noise[s].double() * math.exp(-lam)).abs().max().item() for s in range(S)]


@pytest.mark.parametrize(
    "method, order, steps, thresholds",
    [
        ("euler", 1, [20], []),
        ("heun", 2, [20], []),
        ("euler", 1, [16, 8], [0.25]),
        ("heun", 2, [16, 8], [0.25]),
        ("euler", 1, [8, 8, 8], [0.5, 0.2]),
        ("heun", 2, [8, 8, 8], [0.5, 0.2]),
    ],
)
def test_convergence_order_on_a_linear_field(method, order, steps, thresholds):
    coarse = linear_errors(method, steps, thresholds)
    fine = linear_errors(method, [2 * n for n in steps], thresholds)
    for e_coarse, e_fine in zip(coarse, fine):
        assert e_fine < e_coarse < 0.2
        # Halving every step divides the error by 2^order (to within the next-order term).
        assert 2**order * 0.85 <= e_coarse / e_fine <= 2**order * 1.15, (e_coarse, e_fine)


# -- classifier-free guidance -------------------------------------------------------------------------


def guided_point_mass_states(field, noise, y, sched, w, low, high) -> list[list[torch.Tensor]]:
    """The exact state after every step: a stage moves straight towards the guided centre on its guided
    steps and towards the conditional one otherwise (``x_next - c = (x - c) * t_next / t``)."""
    x = [n.double() for n in noise]
    states = []
    for i in range(sched.num_steps):
        for s in range(sched.stages):
            if not sched.active[i, s]:
                continue
            t, t_next = sched.t[i, s].item(), sched.t_next[i, s].item()
            c_cond, c_null = field.centres[s][y].double(), field.centres[s][NUM_CLASSES].double()
            c = c_null + w * (c_cond - c_null) if w != 1 and low <= t <= high else c_cond
            x[s] = c + (x[s] - c) * (t_next / t)
        states.append(list(x))
    return states


def test_cfg_on_a_point_mass_reaches_the_guided_point():
    field = point_mass(2)
    y = torch.tensor([0, 4])
    noise = stage_noise(2, shapes_for(2), gen(4))
    w = 3.0
    result = StagedSampler(field, staged_schedule([6, 4], [0.3]), cfg_scale=w, null_class=NUM_CLASSES).sample(noise, y)
    for s in range(2):
        c_cond, c_null = field.centres[s][y], field.centres[s][NUM_CLASSES]
        torch.testing.assert_close(result.bands[s], c_null + w * (c_cond - c_null), rtol=0, atol=1e-4)
    assert field.batch_sizes == [4] * 10  # every step guided: the batch is doubled on each


def test_guidance_interval_and_doubling_only_on_guided_steps():
    field = point_mass(2)
    y = torch.tensor([2, 5, 9])
    noise = stage_noise(3, shapes_for(2), gen(5))
    sched = staged_schedule([8, 4], [0.3])
    low, high, w = 0.2, 0.6, 2.5
    # Stage 0: 1, .9125, ..., .65, .5625, .475, .3875 | .3, .225, .15, .075; stage 1: (1) | 1, .75, .5, .25.
    # Guided where an active stage's own t lies in [0.2, 0.6]: steps 5-7 (stage 0), 8-9 (stage 0), 10-11 (stage 1).
    expected_guided = [[False, False]] * 5 + [[True, False]] * 3 + [[True, False]] * 2 + [[False, True]] * 2
    assert guided_table(sched, w, low, high).tolist() == expected_guided
    sampler = StagedSampler(field, sched, cfg_scale=w, guidance_low=low, guidance_high=high, null_class=NUM_CLASSES)
    expected = guided_point_mass_states(field, noise, y, sched, w, low, high)
    x = noise
    for i in range(sched.num_steps):
        x, _ = sampler.step_at(x, y, i)
        for s in range(2):
            torch.testing.assert_close(x[s].double(), expected[i][s], rtol=0, atol=1e-4)
    assert field.batch_sizes == [3] * 5 + [6] * 7
    # The interval matters: guided everywhere, stage 0 (unguided on its last step here) ends elsewhere.
    everywhere = StagedSampler(point_mass(2), sched, cfg_scale=w, null_class=NUM_CLASSES).sample(noise, y)
    assert (everywhere.bands[0] - x[0]).abs().max() > 0.1
    torch.testing.assert_close(x[0], field.centres[0][y], rtol=0, atol=1e-4)


def test_heun_calls_the_model_twice_per_step_and_doubles_only_guided_steps():
    field = point_mass(1)
    sched = staged_schedule([6], [])
    # Guide only t in [0.4, 0.9]: steps at t = 5/6, 4/6, 3/6 (the step at t = 1 is outside).
    sampler = StagedSampler(
        field, sched, method="heun", cfg_scale=2.0, guidance_low=0.4, guidance_high=0.9, null_class=NUM_CLASSES
    )
    x = stage_noise(2, shapes_for(1), gen(6))
    for i in range(5):  # the last Heun step would evaluate the point-mass field at t = 0
        x, _ = sampler.step_at(x, torch.tensor([1, 2]), i)
    assert field.batch_sizes == [2, 2, 4, 4, 4, 4, 4, 4, 2, 2]


def test_cfg_scale_one_equals_no_cfg():
    model = tiny_model()
    sched = staged_schedule([3, 2], [0.2])
    noise = stage_noise(2, shapes_for(2, size=8), gen(7))
    y = torch.tensor([1, 6])
    calls = []

    def counted(x, t, y_, mask):
        calls.append(y_.shape[0])
        return model(x, t, y_, mask)

    plain = StagedSampler(counted, sched, cfg_scale=1.0, null_class=NUM_CLASSES)
    out = plain.sample(noise, y)
    assert calls == [2] * 5  # scale 1: never doubled
    # The doubled-batch path at scale 1 returns the conditional velocity (halves in the right order).
    with torch.no_grad():
        tables = plain._tables(noise[0].device)
        for i in range(sched.num_steps):
            args = (noise, tables["t"][i], y, tables["active"][i], torch.ones(2, dtype=torch.bool))
            for a, b in zip(plain.velocity(*args, double_batch=True), plain.velocity(*args, double_batch=False)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A scale above 1 whose interval no step reaches is no CFG either.
    unreached = StagedSampler(model, sched, cfg_scale=4.0, guidance_low=2.0, guidance_high=3.0, null_class=NUM_CLASSES)
    assert not any(unreached.step_is_guided)
    for a, b in zip(unreached.sample(noise, y).bands, out.bands):
        assert torch.equal(a, b)


def test_cfg_combines_the_two_branches_of_a_real_model():
    model = tiny_model()
    sched = staged_schedule([3, 2], [0.2])
    w = 4.0
    sampler = StagedSampler(model, sched, cfg_scale=w, null_class=NUM_CLASSES)
    x = stage_noise(2, shapes_for(2, size=8), gen(8))
    y = torch.tensor([3, 8])
    i = 3  # a step of phase 1: both stages active and guided
    t = sched.t[i].float().expand(2, -1)
    mask = sched.active[i].expand(2, -1)
    with torch.no_grad():
        x_next, v = sampler.step_at(x, y, i)
        v_cond = model(x, t, y, mask)
        v_null = model(x, t, torch.full_like(y, NUM_CLASSES), mask)
    dt = (sched.t_next[i] - sched.t[i]).float()
    for s in range(2):
        expected_v = v_null[s] + w * (v_cond[s] - v_null[s])
        torch.testing.assert_close(v[s], expected_v, rtol=0, atol=1e-5)
        torch.testing.assert_close(x_next[s], x[s] + dt[s] * expected_v, rtol=0, atol=1e-5)


# -- previews, seeds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, thresholds", [([6, 4], [0.3]), ([3, 3, 2], [0.4, 0.1])])
def test_previews_count_shape_and_content(steps, thresholds):
    S = len(steps)
    field = point_mass(S)
    y = torch.tensor([0, 5])
    noise = stage_noise(2, shapes_for(S), gen(9))
    sampler = StagedSampler(field, staged_schedule(steps, thresholds), null_class=NUM_CLASSES)
    result = sampler.sample(noise, y)
    assert len(result.previews) == S
    centres = [c[y] for c in field.centres]
    for s, shot in enumerate(result.previews):
        assert shot.shape == (2, 3, 16, 16)
        # On a point mass the denoised estimate after phase s is exactly the data's stages 0..s.
        torch.testing.assert_close(shot, pyramid.preview(centres, s, full_size=True), rtol=0, atol=1e-4)
    torch.testing.assert_close(result.previews[-1], result.x, rtol=0, atol=1e-5)
    assert sampler.sample(noise, y, previews=False).previews == []


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    sched = staged_schedule([3, 2], [0.2])
    sampler = StagedSampler(model, sched, method="heun", cfg_scale=2.0, null_class=NUM_CLASSES)
    y = torch.tensor([0, 9])
    runs = [sampler.sample(stage_noise(2, shapes_for(2, size=8), gen(10)), y).x for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = sampler.sample(stage_noise(2, shapes_for(2, size=8), gen(11)), y).x
    assert not torch.allclose(other, runs[0])


# -- SDE baseline -------------------------------------------------------------------------------------


class Gaussian:
    """Exact single-stage velocity for data ~ N(mu, sigma^2) per element: v = E[eps | x_t] - E[x | x_t]."""

    def __init__(self, mu: float, sigma: float):
        self.mu, self.sigma = mu, sigma

    def __call__(self, x, t, y, mask):
        t = t[:, 0].view(-1, 1, 1, 1).double()
        x_t = x[0].double()
        var = (1 - t) ** 2 * self.sigma**2 + t**2  # Var[x_t]
        centred = x_t - (1 - t) * self.mu
        e_eps = t / var * centred
        e_x = self.mu + (1 - t) * self.sigma**2 / var * centred
        return [(e_eps - e_x).float()]


def test_sde_converges_to_a_point_mass():
    field = point_mass(1)
    y = torch.tensor([0, 1, 2, 3])
    noise = stage_noise(4, shapes_for(1), gen(12))[0]
    target = field.centres[0][y]
    errors = [
        (sample_sde(field, noise, y, num_steps=n, generator=gen(13)) - target).abs().max().item()
        for n in (25, 100, 400)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_sde_samples_the_data_distribution():
    mu, sigma = 0.3, 0.5
    noise = torch.randn(16, 1, 64, 64, generator=gen(14))
    y = torch.zeros(16, dtype=torch.long)
    sde = sample_sde(Gaussian(mu, sigma), noise, y, num_steps=200, generator=gen(15))
    ode = sample_sde(Gaussian(mu, sigma), noise, y, num_steps=200, diffusion_norm=0.0)
    for out in (sde, ode):
        assert out.mean().item() == pytest.approx(mu, abs=0.01)
        assert out.std().item() == pytest.approx(sigma, rel=0.02)
    # Noise is really injected: the SDE path ends elsewhere than the ODE path from the same start.
    assert (sde - ode).abs().mean() > 0.05


def test_sde_is_reproducible_with_a_seed():
    field = Gaussian(0.0, 1.0)
    noise = torch.randn(2, 1, 8, 8, generator=gen(16))
    y = torch.zeros(2, dtype=torch.long)
    a = sample_sde(field, noise, y, num_steps=20, generator=gen(17))
    b = sample_sde(field, noise, y, num_steps=20, generator=gen(17))
    c = sample_sde(field, noise, y, num_steps=20, generator=gen(18))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_guidance_interval_is_checked_once_for_each_property():
    """The order of the interval is the sampler's check, routed to the key by the config; the range [0, 1] is the
    config's (a sampler accepts an interval no step reaches: it guides nothing)."""
    from pathlib import Path

    from dfm.config import ConfigError, load_config

    digits = Path(__file__).resolve().parent.parent / "configs" / "dfm_digits.yaml"
    with pytest.raises(ValueError, match=r"^guidance_low \(0.8\) must not exceed guidance_high \(0.2\)"):
        StagedSampler(None, staged_schedule([2], []), guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ConfigError, match=r"config key 'sample.guidance_low' \(0.8\) must not exceed guidance_high"):
        load_config(digits, ["sample.guidance_low=0.8", "sample.guidance_high=0.2"])
    for key, value in (("guidance_low", -0.1), ("guidance_high", 1.5)):
        with pytest.raises(ConfigError, match=r"'sample.guidance_low' <= 'sample.guidance_high' must lie in \[0, 1\]"):
            load_config(digits, [f"sample.{key}={value}"])
    assert load_config(digits, ["sample.guidance_low=0.3", "sample.guidance_high=0.3"]).sample.guidance_low == 0.3
