"""AdamW as training runs it (``dfm.optim``): torch's fused kernel by default, clipping on device.

Parity follows the project's rule: the fast path's error against a float64 reference is at most twice that
of the plain implementation in the same dtype, plus a small ``atol``.
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_parity, max_err

from dfm.host_sync import HostSyncCounter
from dfm.optim import ClippedAdamW, make_optimizer, optimizer_impl

SHAPES = [(5, 4), (7,), (3, 2, 2)]  # a weight, a bias-like vector and an odd 3-D tensor
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)


def params(dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def run(optimizer, ps, steps=4, scale=1.0, seed=4):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)
        optimizer.step()
    return [p.detach().double() for p in ps]


def test_auto_is_the_fused_kernel_on_every_device():
    assert optimizer_impl("cpu") == optimizer_impl("cuda") == "torch_fused"
    opt = make_optimizer(params(), lr=1e-3)
    assert isinstance(opt, ClippedAdamW) and opt.defaults["fused"]
    assert not make_optimizer(params(), lr=1e-3, impl="torch").defaults["fused"]


def test_fused_update_matches_the_reference_adamw():
    ref = run(torch.optim.AdamW(ps := params(torch.float64), **HYPER), ps)
    loop = run(torch.optim.AdamW(ps := params(), **HYPER), ps)
    fused = run(make_optimizer(ps := params(), **HYPER), ps)
    assert_parity(fused, loop, ref, 1e-7, "fused AdamW")
    assert max_err(fused, ref) > 0 or max_err(loop, ref) == 0  # fp32 vs fp64: the comparison is not vacuous
    groups = make_optimizer([{"params": params(), "weight_decay": 0.0}], lr=1e-3)  # param groups work too
    assert groups.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below and above the threshold
def test_clipping_matches_torch_clip_grad_norm(scale):
    max_norm = 0.5
    ref_params, ours_params = params(), params()
    ref = torch.optim.AdamW(ref_params, **HYPER)
    ours = make_optimizer(ours_params, max_norm=max_norm, **HYPER)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        for a, b in zip(ref_params, ours_params):
            a.grad = scale * torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        ref.step()
        ours.step()
        assert torch.allclose(ours.grad_norm, expected_norm, rtol=1e-6)
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours_params]))
        assert clipped <= max_norm * (1 + 1e-5) and (scale > 1 or torch.allclose(clipped, expected_norm))
    # fused (ours) vs the per-tensor loop (ref) on identical clipped gradients: fp32 rounding apart
    assert max_err(ours_params, ref_params) < 1e-6


def test_max_norm_none_does_not_compute_a_norm_and_zero_only_measures():
    off = make_optimizer(ps := params(), lr=1e-3)
    run(off, ps, steps=1)
    assert off.grad_norm is None
    measure = make_optimizer(ps := params(), lr=1e-3, max_norm=0.0)
    before = [p.detach().clone() for p in ps]
    run(measure, ps, steps=1, scale=100.0)
    assert measure.grad_norm > 100  # measured, not clipped: the step moved as plain AdamW would
    assert all(not torch.equal(a, b) for a, b in zip(before, ps))


def test_step_reads_nothing_back_to_the_host():
    opt = make_optimizer(ps := params(), max_norm=0.5, **HYPER)
    run(opt, ps, steps=1)  # lazy state
    with HostSyncCounter() as syncs:
        run(opt, ps, steps=2)
    assert syncs.report.count == 0, syncs.report
    plain = torch.optim.AdamW(ps := params(), foreach=False, **HYPER)  # torch's per-tensor loop on CPU ...
    run(plain, ps, steps=1)
    with HostSyncCounter() as syncs:
        run(plain, ps, steps=1)
    assert syncs.report.count == len(SHAPES)  # ... reads each parameter's step count back (.item())


def test_unknown_impls_and_group_layouts_fail_clearly():
    with pytest.raises(ValueError, match="impl"):
        optimizer_impl("cpu", "lamb")
    with pytest.raises(ValueError, match="one parameter group"):
        ClippedAdamW([{"params": params()[:1]}, {"params": params()[1:]}], norm_group=object(), lr=1e-3)
