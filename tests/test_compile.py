"""Compiled training step vs eager: outputs and gradients, steady state without recompiles or graph breaks.

Compiling is slow on CPU (tens of seconds per graph, cold), so one compiled tiny model is shared by
every test here: all of them run the same (batch, shapes, grad mode), i.e. the same two graphs
(forward and backward of a block).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from dfm.kernels.reference import noise_stages
from parity import parity

from dfm.compile import compile_model, compile_stats, log_attention_backend
from dfm.models import build_model
from dfm.objective import DFMObjective
from dfm.optim import make_optimizer, optimizer_impl
from dfm.precision import autocast
from dfm.pyramid import decompose

BATCH, SIZE, CLASSES = 3, 16, 10


def _randomised(model):
    # adaLN-Zero and the zero heads make a fresh model output exactly zero with mostly zero gradients:
    # perturb every parameter so that each block and head really contributes.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    eager = _randomised(build_model("DFM-SiT-S/2", depth=2, input_size=SIZE, num_classes=CLASSES))
    compiled = compile_model(copy.deepcopy(eager), scope="blocks")
    return eager, compiled


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    objective = DFMObjective(stages=2, num_classes=CLASSES, per_sample_stage=True)
    bands = decompose(x, 2)
    draw = objective.draw(bands, y, generator=g)
    t, mask = objective.sample_t(torch.tensor([0, 1, 1]), generator=g)  # one sample with stage 1 masked
    return bands, dataclasses.replace(draw, t=t, mask=mask)


def _forward_backward(model, bands, draw, dtype):
    bands = [b.to(dtype) for b in bands]
    eps = [e.to(dtype) for e in draw.eps]
    x_t, v = noise_stages(bands, draw.t, draw.mask, eps)
    model.zero_grad(set_to_none=True)
    v_hat = model(x_t, draw.t, draw.y, draw.mask)
    # the objective computes its loss in fp32; the same masked loss in the model's dtype keeps the fp64 reference
    # exact.
    loss = sum(
        torch.where(draw.mask[:, s], (o.to(dtype) - t).square().mean(dim=(1, 2, 3)), 0.0).mean()
        for s, (o, t) in enumerate(zip(v_hat, v))
    )
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return [o.detach() for o in v_hat], loss.detach(), grads


def _within(fast, same_dtype, ref64, atol):
    """The parity rule (tests/parity.py); returns (ok, (error of the compiled path, error of eager))."""
    ok, err_fast, err_torch = parity(fast, same_dtype, ref64, atol)
    return ok, (err_fast, err_torch)


def test_compiled_forward_backward_matches_eager(models, batch):
    eager, compiled = models
    bands, draw = batch
    assert draw.mask.any(dim=0).all() and not draw.mask.all(), "want both masked and active stages in the batch"
    torch._dynamo.reset()  # counters and caches from this process's earlier tests: the count below is this test's
    out_c, loss_c, grads_c = _forward_backward(compiled, bands, draw, torch.float32)
    graphs = compile_stats()["graphs"]
    out_e, loss_e, grads_e = _forward_backward(eager, bands, draw, torch.float32)
    out_64, loss_64, grads_64 = _forward_backward(copy.deepcopy(eager).double(), bands, draw, torch.float64)

    for s, (c, e, r) in enumerate(zip(out_c, out_e, out_64)):
        ok, errs = _within(c, e, r, atol=1e-6 * r.abs().max().item())
        assert ok, f"stage {s} velocity: compiled/eager errors vs fp64 {errs}"
    # A scalar can be lucky in eager (errors cancel in the sum): allow a few fp32 ulps on top.
    ok, errs = _within(loss_c, loss_e, loss_64, atol=8 * torch.finfo(torch.float32).eps * loss_64.item())
    assert ok, f"loss {loss_64.item()}: compiled/eager errors vs fp64 {errs}"
    assert len(grads_c) == len(grads_64)
    for name, r in grads_64.items():
        ok, errs = _within(grads_c[name], grads_e[name], r, atol=1e-6 * r.abs().max().item() + 1e-12)
        assert ok, f"grad of {name}: compiled/eager errors vs fp64 {errs}"
    # The compiled path really ran inductor code, not a silent eager fallback: the blocks' graphs were
    # compiled by the compiled model's own forward and backward above.
    assert graphs >= 1


def test_compile_keeps_the_module_and_its_state_dict(models):
    eager, compiled = models
    assert log_attention_backend(compiled, "cpu") == "sdpa"  # what the blocks run on this machine
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod prefix: checkpoints interchange
    with pytest.raises(ValueError, match="scope"):
        compile_model(compiled, scope="everything")
    with pytest.raises(ValueError, match="blocks"):
        compile_model(torch.nn.Linear(2, 2), scope="blocks")


def test_steady_state_training_step_has_no_recompiles_or_graph_breaks(models, batch):
    eager, compiled = models
    model = copy.deepcopy(compiled)  # an EMA-style copy runs its own weights through the same graphs
    bands, _ = batch
    x = torch.randn(BATCH, 4, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (BATCH,))
    objective = DFMObjective(stages=2, num_classes=CLASSES)
    optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)

    def train_step():
        with autocast("cpu"):
            loss = objective.stage_losses(model, x, y, generator=g)[0].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(2):  # warm-up: the graphs exist after the first step
        train_step()
    before = compile_stats()
    with torch.compiler.set_stance("fail_on_recompile"):  # raises if any guard fails and a recompile is needed
        losses = [train_step() for _ in range(4)]
    after = compile_stats()
    assert after == before, f"compiler counters moved in the steady state: {before} -> {after}"
    assert after["graph_breaks"] == 0
    assert all(torch.isfinite(loss) for loss in losses)
    # The copy trained its own parameters; the shared fixture's weights are untouched.
    assert not torch.equal(model.blocks[0].attn.qkv.weight, compiled.blocks[0].attn.qkv.weight)
    assert torch.equal(compiled.blocks[0].attn.qkv.weight, eager.blocks[0].attn.qkv.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_compiled_step_matches_eager_and_uses_fused_adamw():
    torch.manual_seed(0)
    eager = _randomised(build_model("DFM-SiT-S/2", depth=2, input_size=SIZE, num_classes=CLASSES)).cuda()
    compiled = compile_model(copy.deepcopy(eager), scope="blocks")
    fp64 = copy.deepcopy(eager).double()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(BATCH, 4, SIZE, SIZE, device="cuda", generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), device="cuda", generator=g)
    objective = DFMObjective(stages=2, num_classes=CLASSES, per_sample_stage=True)
    bands = decompose(x, 2)
    draw = objective.draw(bands, y, generator=g)
    results = {}
    for name, model in (("compiled", compiled), ("eager", eager)):
        with autocast("cuda"):
            results[name] = _forward_backward(model, bands, draw, torch.float32)
    out_64, _, grads_64 = _forward_backward(fp64, bands, draw, torch.float64)
    for s, r in enumerate(out_64):
        ok, errs = _within(results["compiled"][0][s], results["eager"][0][s], r, atol=1e-3 * r.abs().max().item())
        assert ok, f"stage {s} velocity (bf16): {errs}"
    for name, r in grads_64.items():
        ok, errs = _within(results["compiled"][2][name], results["eager"][2][name], r, atol=1e-3 * r.abs().max().item())
        assert ok, f"grad of {name} (bf16): {errs}"
    opt = make_optimizer(compiled.parameters(), lr=1e-4)
    assert opt.defaults["fused"] and optimizer_impl("cuda") == "torch_fused"
