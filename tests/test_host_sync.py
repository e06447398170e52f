"""No device-to-host synchronisation in a training or sampling step, counted on the real code paths.

``dfm.host_sync.HostSyncCounter`` sees, below autograd and whoever the caller is (our code, DeepSpeed,
torch's optimizers), every operator that reads device memory on the host, every device-to-host or blocking
host-to-device copy, every tensor built from host data and every explicit barrier. On a CPU-only machine
each of these is what becomes a sync on an accelerator. One kind only exists on an asynchronous device:
DeepSpeed's ``overlap_comm`` (ZeRO 1/2) waits for its reduction stream at the end of backward, a branch its
CPU accelerator never takes; ``test_overlap_comm_waits_once_per_backward_on_cuda`` pins it on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm import objective as objective_module
from dfm.config import load_config
from dfm.host_sync import HostSyncCounter

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "arch.depth=2",
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",  # two accumulated micro-batches per step: the accumulation path too
    "train.max_steps=100",
    "train.log_every=100",
    "train.sample_every=1000",
    "train.ckpt_every=1000",
    "sample.num_steps_per_scale=[2,1]",
    "sample.per_class=1",
]
STEPS = 3

# DeepSpeed 0.19's ZeRO-3 optimizer computes the gradient norm and checks it on the host in every step,
# whatever the config says (ZeRO 0-2 clip in our optimizer instead, dfm.optim): per step one bool() of the
# norm (is_invalid_grad_norm, to skip non-finite steps) and one torch.tensor(-1.0, device=...) sentinel
# (get_grad_norm_direct). Pinned so that any new one fails the test.
ZERO3_SYNCS = {("aten._local_scalar_dense", "is_invalid_grad_norm"): STEPS,
               ("torch.tensor from host data", "get_grad_norm_direct"): STEPS}  # fmt: skip


def build(tmp_path, *extra):
    pytest.importorskip("deepspeed", reason="needs deepspeed: the trainer runs on its engine")
    from dfm.launch.train import build_trainer

    cfg = load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", *extra])
    return build_trainer(cfg)


def count_steps(trainer, steps: int = STEPS) -> HostSyncCounter:
    data = iter(trainer.loader)
    for _ in range(2):  # warm-up: optimizer state and DeepSpeed's buffers are created lazily
        trainer.train_step(data)
    with HostSyncCounter() as syncs:
        for _ in range(steps):
            trainer.train_step(data)
    return syncs


def by_function(syncs: HostSyncCounter) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for record in syncs.report.records:
        key = (record.what, record.where.rsplit(" in ", 1)[-1])
        out[key] = out.get(key, 0) + 1
    return out


def test_counter_sees_every_kind_of_host_sync():
    deepspeed_accelerator = pytest.importorskip("deepspeed.accelerator")
    x = torch.randn(4)
    with HostSyncCounter() as syncs:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0]  # boolean-mask indexing: nonzero
        torch.tensor([1.0, 2.0])  # built from host data
        x.tolist()
        deepspeed_accelerator.get_accelerator().synchronize()
    whats = [r.what for r in syncs.report.records]
    assert whats.count("aten._local_scalar_dense") == 2 and "aten.index with a boolean mask" in whats
    assert "torch.tensor from host data" in whats and "Tensor.tolist" in whats
    assert any(w.endswith(".synchronize") for w in whats) and syncs.report.count == 6
    assert all(__file__ in r.where for r in syncs.report.records)  # each names the line that made it
    with HostSyncCounter() as quiet:  # device-side work alone reads nothing back
        (x * 2).add_(1).clamp_(max=1.0)
        torch.where(x > 0, x, 0.0)
    assert quiet.report.count == 0, quiet.report


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_step_has_no_host_sync(tmp_path, stage, precision):
    """Three non-logging steps of ``Trainer.train_step`` on the engine ``dfm train`` builds."""
    name, zero, prec = f"exp_name=z{stage}{precision}", f"train.zero_stage={stage}", f"train.precision={precision}"
    trainer = build(tmp_path, name, zero, prec)
    assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())  # fp32 master weights
    syncs = count_steps(trainer)
    if stage < 3:
        assert syncs.report.count == 0, syncs.report
    else:
        assert by_function(syncs) == ZERO3_SYNCS, syncs.report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: only an asynchronous device takes this path")
@pytest.mark.parametrize("stage, overlap", [(1, True), (1, False), (2, True), (2, False)])
def test_overlap_comm_waits_once_per_backward_on_cuda(tmp_path, stage, overlap):
    """DeepSpeed's overlap_comm synchronises the device when it closes each gradient reduction (ZeRO 2: every
    micro-step; ZeRO 1: the accumulation boundary): the price of reducing on a side stream during backward.
    Without overlap there is none."""
    trainer = build(
        tmp_path, f"exp_name=o{stage}{overlap}", f"train.zero_stage={stage}", f"train.overlap_comm={overlap}"
    )
    syncs = count_steps(trainer)
    if not overlap:
        assert syncs.report.count == 0, syncs.report
        return
    expected = STEPS * (trainer.accum_steps if stage == 2 else 1)
    assert syncs.report.count == expected, syncs.report
    assert all("independent_gradient_partition_epilogue" in r.callers for r in syncs.report.records)


def test_an_item_added_to_the_step_is_caught(tmp_path, monkeypatch):
    """The counter sees a read-back inside the real step, not only in code written for the test."""
    trainer = build(tmp_path, "exp_name=item")
    real = objective_module._stage_terms

    def stage_terms_with_item(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.sum().item()
        return terms

    monkeypatch.setattr(objective_module, "_stage_terms", stage_terms_with_item)
    syncs = count_steps(trainer)
    assert by_function(syncs) == {("aten._local_scalar_dense", "stage_terms_with_item"): STEPS * trainer.accum_steps}


def test_the_loop_reads_only_at_log_sample_eval_and_checkpoint_steps(tmp_path):
    """A whole ``fit`` with every metric, a warmup, a decaying schedule, EMA warmup and evaluation: every host
    read happens inside logging, sampling, evaluating or saving, none in the steps."""
    schedule = ["train.lr_warmup_steps=2", "train.lr_schedule=cosine", "train.ema_warmup_power=0.75"]
    evaluation = ["train.eval_every=3", "train.eval_samples=10"]
    trainer = build(tmp_path, "exp_name=fit", "train.max_steps=2", "train.log_every=3", "train.sample_every=3",
                    *schedule, *evaluation)  # fmt: skip
    assert trainer.evaluator is not None and trainer.read_grad_norm is not None
    trainer.fit()  # warm-up, and a final log, sample, evaluation and save at step 2
    trainer.cfg.train.max_steps = 7
    with HostSyncCounter() as syncs:
        trainer.fit()  # steps 3..7: log, sample and evaluate at 3 and 6, and at the end (7) all of it and a save
    allowed = {"log_metrics", "write_samples", "evaluate", "save"}
    outside = [r for r in syncs.report.records if not allowed & set(r.callers)]
    assert not outside, "\n".join(f"{r.what} at {r.where}" for r in outside)
    for helper in ("log_metrics", "evaluate"):  # they did read: the check above is not vacuous
        assert any(helper in r.callers for r in syncs.report.records), helper
    reads = [r for r in syncs.report.records if "log_metrics" in r.callers]
    assert len(reads) == 3, reads  # one host read per log step (steps 3, 6, 7), whatever is logged


def test_staged_sampler_step_has_no_host_sync():
    from dfm.fast_sampling import FastStagedSampler
    from dfm.models import build_model
    from dfm.sampling import StagedSampler, stage_noise, staged_schedule

    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10).eval()
    sampler = StagedSampler(model, staged_schedule([2, 1], [0.1]), cfg_scale=2.0, null_class=10)
    noise, y = stage_noise(2, model.input_shapes()), torch.tensor([1, 2])
    sampler.sample(noise, y)  # tables are built once, on the first call
    with HostSyncCounter() as syncs, torch.no_grad():
        sampler.step_at(noise, y, 0)
        result = FastStagedSampler(sampler, mode="eager").sample(noise, y)
    assert syncs.report.count == 0, syncs.report
    assert len(result.previews) == 2


def test_generate_batch_has_no_host_sync_until_the_images(tmp_path):
    """``dfm generate``'s batch: per-index draws on the host, then the device part reads nothing back."""
    from dfm.launch.train import measure_stage_statistics

    from dfm.generation import IndexSampler
    from dfm.models import DFMSiT

    cfg = load_config(ROOT / "configs" / "dfm_digits.yaml", TINY)
    assert measure_stage_statistics(cfg) is not None  # the digits config normalises its stages, as a run would
    torch.manual_seed(0)
    model = DFMSiT.from_config(cfg).eval()
    sampler = IndexSampler(model, cfg, seed=3)
    draws = sampler.draw(range(5), pad_to=8)
    sampler.run(draws)  # warm-up
    with HostSyncCounter() as syncs:
        x = sampler.run(draws)
    assert syncs.report.count == 0, syncs.report
    assert x.shape[0] == 5
