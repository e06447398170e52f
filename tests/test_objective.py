"""DFM objective: stage and timestep distributions, masking, S = 1 is SiT flow matching, injectable draw, no sync.

Statistical tests use fixed seeds (so they are deterministic) and bounds that a wrong distribution breaks:
binomial counts within 5 sigma, Kolmogorov-Smirnov tests at p > 1e-3 on 10^5 draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from dfm.kernels.reference import noise_stages
from scipy import stats
from torch.overrides import TorchFunctionMode

from dfm import pyramid
from dfm.models import build_model
from dfm.objective import DFMObjective, StageDraw, _stage_terms

CPU = torch.device("cpu")
NUM_CLASSES = 10
N_DRAWS = 100_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_binomial(count: int, n: int, p: float) -> None:
    """``count`` successes out of ``n`` is within 5 sigma of a Binomial(n, p)."""
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 5 * sigma + 1e-9, f"{count}/{n} is more than 5 sigma from p={p}"


def logit(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return torch.log(t) - torch.log1p(-t)


def small_model(name: str = "DFM-SiT-S/2", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny (DFM-)SiT with random weights everywhere, so that no output is trivially zero."""
    config = dict(input_size=8, in_channels=3, num_classes=NUM_CLASSES, depth=1, hidden_size=64, num_heads=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = build_model(name, **config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=gen(seed + p.numel()))
    return model


# -- main stage ---------------------------------------------------------------------------------------


def test_main_stage_frequencies_per_sample():
    obj = DFMObjective(3, stage_weights=[5, 3, 2], per_sample_stage=True, num_classes=NUM_CLASSES)
    assert obj.stage_weights == pytest.approx([0.5, 0.3, 0.2])
    k = obj.sample_main_stage(N_DRAWS, CPU, gen(1))
    assert k.shape == (N_DRAWS,) and k.dtype == torch.long
    counts = torch.bincount(k, minlength=3).tolist()
    assert len(counts) == 3
    for count, p in zip(counts, obj.stage_weights):
        assert_binomial(count, N_DRAWS, p)


def test_main_stage_per_batch_is_shared_and_matches_weights():
    obj = DFMObjective(2, num_classes=NUM_CLASSES)  # reference default [0.9, 0.1], one k per batch
    g = gen(2)
    draws = 4000
    ks = torch.stack([obj.sample_main_stage(8, CPU, g) for _ in range(draws)])  # (draws, 8)
    assert (ks == ks[:, :1]).all(), "per-batch sampling must give the whole batch the same main stage"
    assert_binomial(int((ks[:, 0] == 1).sum()), draws, 0.1)


@pytest.mark.parametrize("weights, only", [([0.0, 1.0, 0.0], 1), ([1.0, 0.0], 0), ([0.0, 0.0, 2.0], 2)])
def test_zero_weight_stages_are_never_drawn(weights, only):
    obj = DFMObjective(len(weights), stage_weights=weights, per_sample_stage=True, num_classes=NUM_CLASSES)
    k = obj.sample_main_stage(20_000, CPU, gen(3))
    assert (k == only).all()


def test_bad_objective_arguments():
    with pytest.raises(ValueError, match="stage_weights has 1 entries for 2 stages"):
        DFMObjective(2, stage_weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        DFMObjective(2, stage_weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="t_sampler must be one of"):
        DFMObjective(1, t_sampler="cosine")
    with pytest.raises(ValueError, match="class_dropout"):
        DFMObjective(1, class_dropout=1.0)


# -- timesteps ----------------------------------------------------------------------------------------


def test_main_stage_t_is_logit_normal():
    obj = DFMObjective(1, num_classes=NUM_CLASSES)
    t, mask = obj.sample_t(torch.zeros(N_DRAWS, dtype=torch.long), gen(4))
    assert t.shape == (N_DRAWS, 1) and mask.all()
    assert ((t > 0) & (t < 1)).all()
    assert stats.kstest(logit(t[:, 0]).numpy(), "norm").pvalue > 1e-3
    assert_binomial(int((t < 0.5).sum()), N_DRAWS, 0.5)  # median 0.5


def test_earlier_stage_t_is_shifted_to_low_noise():
    obj = DFMObjective(2, num_classes=NUM_CLASSES)
    t, mask = obj.sample_t(torch.ones(N_DRAWS, dtype=torch.long), gen(5))  # k = 1: stage 0 is earlier
    assert mask.all()
    assert stats.kstest(logit(t[:, 0]).numpy(), "norm", args=(-2.0, 1.0)).pvalue > 1e-3
    median = 1 / (1 + math.exp(2.0))  # sigmoid(-2) = 0.1192
    assert median == pytest.approx(0.119, abs=1e-3)
    assert_binomial(int((t[:, 0] < median).sum()), N_DRAWS, 0.5)
    # The main stage keeps its own unshifted logit-normal, independent of the earlier stage.
    assert stats.kstest(logit(t[:, 1]).numpy(), "norm").pvalue > 1e-3
    assert abs(stats.pearsonr(logit(t[:, 0]).numpy(), logit(t[:, 1]).numpy()).statistic) < 5 / math.sqrt(N_DRAWS)


def test_the_earlier_stage_location_comes_from_the_config():
    from pathlib import Path

    from dfm.config import ConfigError, load_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    paper = DFMObjective.from_config(load_config(configs / "dfm_digits.yaml", ["dfm.earlier_stage_location=1.5"]))
    t, _ = paper.sample_t(torch.ones(N_DRAWS, dtype=torch.long), gen(6))
    assert stats.kstest(logit(t[:, 0]).numpy(), "norm", args=(-1.5, 1.0)).pvalue > 1e-3
    assert stats.kstest(logit(t[:, 0]).numpy(), "norm", args=(-2.0, 1.0)).pvalue < 1e-6  # not the default's
    assert DFMObjective.from_config(load_config(configs / "dfm_digits.yaml")).earlier_shift == -2.0
    with pytest.raises(ConfigError, match="dfm.earlier_stage_location"):
        load_config(configs / "dfm_digits.yaml", ["dfm.earlier_stage_location=nan"])


def test_uniform_sampler():
    obj = DFMObjective(2, t_sampler="uniform", num_classes=NUM_CLASSES)
    t, _ = obj.sample_t(torch.ones(N_DRAWS, dtype=torch.long), gen(6))
    assert stats.kstest(t[:, 1].double().numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(t[:, 1].double().numpy(), "logistic").pvalue < 1e-6  # the test tells them apart
    # Earlier stages stay on the shifted logit-normal whatever the main sampler.
    assert stats.kstest(logit(t[:, 0]).numpy(), "norm", args=(-2.0, 1.0)).pvalue > 1e-3


def test_later_stages_are_masked_at_t_one():
    obj = DFMObjective(4, per_sample_stage=True, num_classes=NUM_CLASSES)
    k = obj.sample_main_stage(4000, CPU, gen(7))
    assert set(k.unique().tolist()) == {0, 1, 2, 3}
    t, mask = obj.sample_t(k, gen(8))
    stage = torch.arange(4).view(1, -1)
    assert torch.equal(mask, stage <= k.view(-1, 1))
    assert (t[~mask] == 1.0).all()
    assert (t[mask] < 1.0).all()


def test_class_dropout_rate():
    obj = DFMObjective(1, num_classes=NUM_CLASSES, class_dropout=0.1)
    y = torch.randint(0, NUM_CLASSES, (N_DRAWS,), generator=gen(9))
    y_drop = obj.drop_labels(y, gen(10))
    dropped = y_drop == NUM_CLASSES
    assert_binomial(int(dropped.sum()), N_DRAWS, 0.1)
    assert torch.equal(y_drop[~dropped], y[~dropped])
    assert torch.equal(DFMObjective(1, num_classes=NUM_CLASSES, class_dropout=0.0).drop_labels(y, gen(10)), y)


def test_draw_shapes():
    obj = DFMObjective(3, num_classes=NUM_CLASSES)
    x = torch.randn(5, 3, 16, 8, dtype=torch.float64)
    bands = pyramid.decompose(x, 3)
    draw = obj.draw(bands, torch.zeros(5, dtype=torch.long), gen(11))
    assert draw.t.shape == draw.mask.shape == (5, 3)
    assert draw.mask.dtype == torch.bool
    assert [e.shape for e in draw.eps] == [b.shape for b in bands]
    assert all(e.dtype == torch.float64 for e in draw.eps)


# -- masking ------------------------------------------------------------------------------------------


def fixed_draw(bands: list[torch.Tensor], mask_rows: list[list[bool]], seed: int = 12) -> StageDraw:
    g = gen(seed)
    B = bands[0].shape[0]
    mask = torch.tensor(mask_rows)
    t = torch.where(mask, torch.rand(B, len(bands), generator=g), torch.ones(B, len(bands)))
    eps = [torch.randn(b.shape, generator=g) for b in bands]
    return StageDraw(t=t, mask=mask, eps=eps, y=torch.randint(0, NUM_CLASSES + 1, (B,), generator=g))


def loss_of(obj, *args, **kwargs):
    """(loss, draw) through the objective's one entry: the loss is the sum of its per-stage terms."""
    terms, draw = obj.stage_losses(*args, **kwargs)
    return terms.sum(), draw


def test_masked_stage_adds_zero_loss_and_zero_gradient_to_its_head():
    model = small_model()
    x = torch.randn(4, 3, 8, 8, generator=gen(13))
    obj = DFMObjective(2, num_classes=NUM_CLASSES)
    bands = pyramid.decompose(x, 2)
    draw = fixed_draw(bands, [[True, False]] * 4)  # main stage 0 for the whole batch
    loss, _ = loss_of(obj, model, x, None, draw=draw)
    loss.backward()

    x_t, v = noise_stages(bands, draw.t, draw.mask, draw.eps)
    with torch.no_grad():
        v_hat = model(x_t, draw.t, draw.y, draw.mask)
    expected = (v_hat[0] - v[0]).square().mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert v_hat[1].abs().max() > 0  # the masked head does predict something; its loss is dropped

    for p in model.final_layers[1].parameters():
        assert p.grad is None or (p.grad == 0).all()
    for p in model.final_layers[0].parameters():
        assert p.grad is not None and p.grad.abs().max() > 0


def test_masked_stage_stays_zero_even_when_its_head_outputs_inf():
    g = gen(14)
    v = [torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 8, 8, generator=g)]
    v_hat = [torch.randn(3, 2, 4, 4, generator=g, requires_grad=True), torch.full((3, 2, 8, 8), math.inf)]
    v_hat[1].requires_grad_(True)
    mask = torch.tensor([[True, False], [True, False], [True, False]])
    loss = _stage_terms(v_hat, v, mask).sum()
    loss.backward()
    torch.testing.assert_close(loss, (v_hat[0] - v[0]).square().mean(), rtol=1e-6, atol=0)
    assert torch.equal(v_hat[1].grad, torch.zeros_like(v_hat[1]))


def test_loss_with_mixed_mask_matches_formula():
    g = gen(15)
    shapes = [(4, 3, 2, 2), (4, 3, 4, 4), (4, 3, 8, 8)]
    v = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    v_hat = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    mask = torch.tensor([[True, False, False], [True, True, False], [True, True, True], [True, False, False]])
    expected = sum(((v_hat[s][b] - v[s][b]) ** 2).mean().item() for b in range(4) for s in range(3) if mask[b, s]) / 4
    assert _stage_terms(v_hat, v, mask).sum().item() == pytest.approx(expected, rel=1e-6)
    # each stage's term: its share of the loss, the masked samples counting as zero in the batch mean
    terms = _stage_terms(v_hat, v, mask)
    for s in range(3):
        share = sum(((v_hat[s][b] - v[s][b]) ** 2).mean().item() for b in range(4) if mask[b, s]) / 4
        assert terms[s].item() == pytest.approx(share, rel=1e-6), s


def test_inactive_inputs_are_zeroed_before_embedding():
    model = small_model()
    g = gen(16)
    x = torch.randn(4, 3, 8, 8, generator=g)
    bands = pyramid.decompose(x, 2)
    draw = fixed_draw(bands, [[True, False], [True, True], [True, False], [True, True]])
    x_t, v = noise_stages(bands, draw.t, draw.mask, draw.eps)
    masked_rows = ~draw.mask[:, 1]
    assert (x_t[1][masked_rows] == 0).all() and (x_t[1][~masked_rows] != 0).all()

    # The model itself ignores whatever a masked stage's input holds ...
    junk = [x_t[0], x_t[1] + 10.0 * torch.randn(x_t[1].shape, generator=g)]
    with torch.no_grad():
        out = model(x_t, draw.t, draw.y, draw.mask)
        out_junk = model(junk, draw.t, draw.y, draw.mask)
    for a, b in zip(out, out_junk):
        assert torch.equal(a[masked_rows], b[masked_rows])
        assert not torch.allclose(a[~masked_rows], b[~masked_rows])  # ... but not an active one's.

    # ... and the loss ignores a masked stage's noise and target.
    obj = DFMObjective(2, num_classes=NUM_CLASSES)
    loss, _ = loss_of(obj, model, x, None, draw=draw)
    eps1 = torch.where(masked_rows.view(-1, 1, 1, 1), torch.randn(draw.eps[1].shape, generator=g), draw.eps[1])
    other = StageDraw(t=draw.t, mask=draw.mask, eps=[draw.eps[0], eps1], y=draw.y)
    assert torch.equal(loss_of(obj, model, x, None, draw=other)[0], loss)


# -- S = 1, injected draws ----------------------------------------------------------------------------


def test_one_stage_is_plain_sit_flow_matching():
    model = small_model("SiT-S/2", seed=1)
    obj = DFMObjective(1, num_classes=NUM_CLASSES)
    x = torch.randn(6, 3, 8, 8, generator=gen(17))
    y = torch.randint(0, NUM_CLASSES, (6,), generator=gen(18))
    loss, draw = loss_of(obj, model, x, y, gen(19))

    # SiT flow matching by hand: t ~ sigmoid(N(0, 1)), x_t = (1 - t) x + t eps, v = eps - x, MSE.
    assert draw.mask.all() and draw.t.shape == (6, 1)
    t = draw.t[:, 0].view(-1, 1, 1, 1)
    eps = draw.eps[0]
    assert eps.shape == x.shape
    x_t = (1 - t) * x + t * eps
    with torch.no_grad():
        v_hat = model([x_t], draw.t, draw.y)[0]
    expected = ((v_hat - (eps - x)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


def test_injected_draw_reproduces_the_loss_exactly():
    model = small_model()
    obj = DFMObjective(2, per_sample_stage=True, num_classes=NUM_CLASSES)
    x = torch.randn(4, 3, 8, 8, generator=gen(20))
    y = torch.randint(0, NUM_CLASSES, (4,), generator=gen(21))
    loss, draw = loss_of(obj, model, x, y, gen(22))
    again, same = loss_of(obj, model, x, y, draw=draw)
    assert same is draw
    assert torch.equal(again, loss)
    # The same seed gives the same draw; another seed another loss.
    assert torch.equal(loss_of(obj, model, x, y, gen(22))[0], loss)
    assert not torch.equal(loss_of(obj, model, x, y, gen(23))[0], loss)


# -- no device-to-host sync ---------------------------------------------------------------------------

# Python-level calls that stall the host on a GPU. Reading a value back (item, tolist, bool, cpu, ...) or
# data-dependent shapes are caught by running on the meta device, where tensors hold no data; the two
# below work on meta but synchronise on CUDA: building a tensor from host data on the device (a pageable
# copy followed by a stream sync) and torch.multinomial, which validates its probabilities with .item()
# when drawing one sample or drawing without replacement.
HOST_DATA_FACTORIES = {torch.tensor, torch.as_tensor}


class RejectSyncingCalls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_DATA_FACTORIES and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            raise AssertionError(f"{func.__name__}(host data, device={kwargs['device']}) synchronises the stream")
        if func is torch.multinomial:
            n = args[1] if len(args) > 1 else kwargs["num_samples"]
            replacement = args[2] if len(args) > 2 else kwargs.get("replacement", False)
            if n == 1 or not replacement:
                raise AssertionError("torch.multinomial checks its input with .item() on CUDA")
        return func(*args, **kwargs)


@pytest.mark.parametrize("per_sample_stage", [False, True])
def test_loss_step_has_no_host_sync(per_sample_stage):
    with torch.device("meta"):
        model = small_model()
        x = torch.randn(4, 3, 8, 8)
        y = torch.zeros(4, dtype=torch.long)
    obj = DFMObjective(2, per_sample_stage=per_sample_stage, num_classes=NUM_CLASSES)
    with RejectSyncingCalls():
        loss, draw = loss_of(obj, model, x, y)
        loss.backward()
    assert loss.device.type == "meta" and draw.t.device.type == "meta"
    assert next(model.parameters()).grad is not None
    # The guard itself bites: the usual sync points fail here.
    with pytest.raises((RuntimeError, NotImplementedError)):
        loss.item()
    with pytest.raises(AssertionError):
        with RejectSyncingCalls():
            torch.multinomial(torch.ones(2, device="meta"), 1)


def test_noising_and_loss_capture_as_one_graph():
    def step(bands, t, mask, eps, v_hat_scale):
        x_t, v = noise_stages(bands, t, mask, eps)
        return _stage_terms([v_hat_scale * x for x in x_t], v, mask).sum()

    g = gen(24)
    bands = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g)]
    eps = [torch.randn(b.shape, generator=g) for b in bands]
    t, mask = torch.rand(2, 2, generator=g), torch.tensor([[True, False], [True, True]])
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # a graph break (e.g. .item()) raises
    torch.testing.assert_close(compiled(bands, t, mask, eps, 0.5), step(bands, t, mask, eps, 0.5), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_sample_stage", [False, True])
def test_loss_step_has_no_host_sync_cuda(per_sample_stage):
    device = torch.device("cuda")
    model = small_model().to(device)
    obj = DFMObjective(2, per_sample_stage=per_sample_stage, num_classes=NUM_CLASSES)
    x = torch.randn(4, 3, 8, 8, device=device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    loss_of(obj, model, x, y)  # warm-up: lazy CUDA init and library handles are not part of a steady-state step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = loss_of(obj, model, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
