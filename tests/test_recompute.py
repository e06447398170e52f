"""Activation checkpointing (``dfm.recompute``): the same gradients, fewer saved activations."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from dfm.models import build_model
from dfm.recompute import checkpoint_blocks, checkpointed_blocks


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model("DFM-SiT-S/2", depth=4, hidden_size=64, num_heads=2, input_size=16, num_classes=10)
    with torch.no_grad():  # leave adaLN-Zero, so every block's gradients are non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(3, *shape, generator=g) for shape in model.input_shapes()]
    t, y = torch.rand(3, 2, generator=g), torch.tensor([1, 4, 7])
    return model, (x, t, y, torch.tensor([[True, False], [True, True], [True, True]]))


def _grads_and_saved_bytes(model, inputs):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(*inputs)
    sum(o.square().mean() for o in out).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointed_gradients_equal_the_plain_ones_bitwise_and_save_less(every):
    model, inputs = _model_and_batch()
    plain_grads, plain_saved = _grads_and_saved_bytes(copy.deepcopy(model), inputs)
    wrapped = checkpoint_blocks(copy.deepcopy(model), every)
    assert checkpointed_blocks(wrapped) == list(range(0, 4, every))
    assert wrapped.state_dict().keys() == model.state_dict().keys()  # checkpoints and the EMA see one model
    grads, saved = _grads_and_saved_bytes(wrapped, inputs)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name  # fp32 on a CPU: the recomputed forward is the same
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.startswith("blocks.0."))
    # Each checkpointed block keeps only its inputs; four blocks hold most of the activations here.
    assert saved < plain_saved * (0.5 if every == 1 else 0.9), (saved, plain_saved)


def test_a_copy_of_a_checkpointed_model_runs_its_own_weights():
    model, inputs = _model_and_batch()
    copied = copy.deepcopy(checkpoint_blocks(model, 1))
    with torch.no_grad():
        for p in copied.blocks.parameters():
            p.mul_(0.5)  # the copy's blocks differ from the original's
        assert not torch.equal(copied(*inputs)[1], model(*inputs)[1])
    assert checkpointed_blocks(copied) == [0, 1, 2, 3]


def test_off_and_bad_intervals():
    model, _ = _model_and_batch()
    assert checkpoint_blocks(model, 0) is model and checkpointed_blocks(model) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="activation checkpointing"):
            checkpoint_blocks(model, bad)
    checkpoint_blocks(model, 2)
    checkpoint_blocks(model, 2)  # applying twice does not nest the recomputation
    assert checkpointed_blocks(model) == [0, 2]


TINY_RUN = ["arch.depth=3", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.max_steps=100", "train.log_every=100", "train.sample_every=1000",
            "train.ckpt_every=1000", "sample.num_steps_per_scale=[2,1]", "sample.per_class=1"]  # fmt: skip


def _trained_weights(tmp_path, name: str, *extra: str, steps: int = 3, count_syncs: bool = True):
    """The engine's weights after ``steps`` steps of ``Trainer.train_step`` (two accumulated micro-batches each),
    and the host reads the last step made."""
    pytest.importorskip("deepspeed", reason="needs deepspeed: the trainer runs on its engine")
    from pathlib import Path

    from dfm.launch.train import build_trainer

    from dfm.config import load_config
    from dfm.host_sync import HostSyncCounter

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(
        root / "configs" / "dfm_digits.yaml", TINY_RUN + [f"output_dir={tmp_path}", f"exp_name={name}", *extra]
    )
    torch.manual_seed(0)
    trainer = build_trainer(cfg)
    data = iter(trainer.loader)
    for _ in range(steps - 1):
        trainer.train_step(data)
    # the counter is a dispatch mode, which torch.compile does not trace through: compiled runs go uncounted
    with HostSyncCounter() if count_syncs else contextlib.nullcontext() as syncs:
        trainer.train_step(data)
    import deepspeed

    module = trainer.engine.module
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3: gather to compare whole
    with deepspeed.zero.GatheredParameters(partitioned) if partitioned else contextlib.nullcontext():
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert all(w.numel() > 0 for w in weights.values())  # not the empty placeholders of partitioned parameters
    return weights, syncs.report.count if count_syncs else None, checkpointed_blocks(trainer.engine.module)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_checkpointed_run_trains_bitwise_as_the_plain_one_without_host_syncs(tmp_path, stage):
    zero = f"train.zero_stage={stage}"
    plain, _, none = _trained_weights(tmp_path, f"plain{stage}", zero)
    recomputed, syncs, blocks = _trained_weights(tmp_path, f"ckpt{stage}", zero, "train.activation_checkpointing=2")
    assert none == [] and blocks == [0, 2]
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name
    # the recomputation reads nothing back to the host either (ZeRO-3: DeepSpeed's own two per step, see
    # tests/test_host_sync.py, whatever the checkpointing)
    assert syncs == (2 if stage == 3 else 0)


@pytest.mark.slow
def test_checkpointing_composes_with_compiled_blocks(tmp_path):
    """train.compile compiles each block, whose forward is then the checkpointed one: the compiled run trains
    bitwise as the compiled run without checkpointing (compiled block by block, about 10 s on 2 cores)."""
    compiled, _, _ = _trained_weights(tmp_path, "compiled", "train.compile=true", count_syncs=False)
    both, _, blocks = _trained_weights(tmp_path, "both", "train.compile=true", "train.activation_checkpointing=1",
                                       count_syncs=False)  # fmt: skip
    assert blocks == [0, 1, 2]
    for name in compiled:
        assert torch.equal(compiled[name], both[name]), name


def test_the_config_refuses_a_negative_interval(tmp_path):
    from pathlib import Path

    from dfm.config import ConfigError, load_config

    root = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(root / "configs" / "dfm_digits.yaml", ["train.activation_checkpointing=-1"])
