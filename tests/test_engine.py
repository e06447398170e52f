"""The DeepSpeed wiring (``dfm.launch.engine``): the generated config, who clips, the device, the layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dfm.launch.engine import (
    StepPlan,
    batch_layout,
    build_engine,
    client_optimizer,
    deepspeed_config,
    setup_distributed,
    step_plan,
    training_device,
)

from dfm.config import ConfigError, load_config
from dfm.models import DFMSiT
from dfm.optim import ClippedAdamW

ROOT = Path(__file__).resolve().parent.parent
TINY = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8"]


def tiny(*extra):
    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + list(extra))


def test_the_generated_config_follows_the_run_config():
    cfg = tiny("train.global_batch_size=64", "train.micro_batch_size=8", "train.zero_stage=2")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 2
    # fp32 engine (bf16 only under autocast); clipping is the optimizer's, so DeepSpeed reads no norm back
    assert "bf16" not in ds and "data_types" not in ds
    assert ds["gradient_clipping"] == 0.0 and not ds["zero_optimization"]["compute_grad_norm"]
    assert ds["timers"]["throughput"]["enabled"] is False  # it would synchronise twice per micro-step
    assert ds["zero_optimization"]["overlap_comm"] and ds["zero_optimization"]["reduce_bucket_size"] == 5e7
    zero3 = deepspeed_config(tiny("train.zero_stage=3"), world_size=2)
    assert zero3["gradient_clipping"] == 1.0 and "compute_grad_norm" not in zero3["zero_optimization"]
    assert deepspeed_config(tiny(), 1)["zero_optimization"] == {"stage": 0}  # no ZeRO keys where none apply
    assert deepspeed_config(tiny("train.zero_stage=1"), 2, load_universal=True)["checkpoint"]["load_universal"]


def test_batch_layout_keeps_the_global_batch_at_every_world_size():
    cfg = tiny("train.global_batch_size=256", "train.micro_batch_size=32")
    for world, accum in ((1, 8), (2, 4), (8, 1)):
        assert batch_layout(cfg, world) == (32, accum)
        ds = deepspeed_config(cfg, world)
        assert ds["train_batch_size"] == 256 == 32 * world * ds["gradient_accumulation_steps"]
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        batch_layout(cfg, 16)  # 32 x 16 > 256
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        deepspeed_config(tiny("train.global_batch_size=60", "train.micro_batch_size=8"), world_size=2)


def test_who_clips_at_each_stage():
    setup_distributed()  # the one-rank group dfm train makes; the ZeRO 1/2 norm is reduced over it
    model = torch.nn.Linear(4, 4)
    for stage in (0, 1, 2):
        cfg = tiny(f"train.zero_stage={stage}")
        opt = client_optimizer(cfg, model)
        plan = step_plan(cfg)
        assert plan.client_optimizer and plan.optimizer_clips and plan.norm_from_optimizer
        assert isinstance(opt, ClippedAdamW) and opt.max_norm == 1.0
        assert (opt.norm_group is not None) == (stage > 0)  # partitioned gradients: the norm is summed over ranks
    zero3 = client_optimizer(tiny("train.zero_stage=3"), model)
    zero3_plan = step_plan(tiny("train.zero_stage=3"))
    assert not zero3_plan.optimizer_clips and not zero3_plan.norm_from_optimizer and zero3.max_norm is None
    assert zero3_plan.client_optimizer  # DeepSpeed clips our optimizer's gradients
    offload = tiny("train.zero_stage=2", "train.offload=true")
    ds = deepspeed_config(offload, 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == offload.train.lr and client_optimizer(offload, model) is None
    assert step_plan(offload) == StepPlan(client_optimizer=False, optimizer_clips=False, norm_from_optimizer=False)
    assert ds["gradient_clipping"] == offload.train.grad_clip
    with pytest.raises(ConfigError, match="train.offload"):
        tiny("train.offload=true")  # ZeRO-0 has nothing to offload


def test_multi_gpu_recipes_reduce_gradients_during_backward():
    for name in ("dfm_sit_xl_256", "dfm_sit_xl_512", "sit_xl_256", "sit_xl_512"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["data.data_dir=/data/latents"])
        zero = deepspeed_config(cfg, world_size=8)["zero_optimization"]
        assert zero["stage"] == 2 and zero["overlap_comm"] and cfg.train.precision == "bf16"


def test_the_device_follows_ds_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert training_device() == torch.device("cpu")  # a CPU rank on a machine that may have GPUs
    if torch.cuda.is_available():
        monkeypatch.delenv("DS_ACCELERATOR")
        monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
        with pytest.raises(RuntimeError, match="has no GPU of its own"):
            training_device()


def test_one_rank_at_zero_0_skips_the_gradient_all_reduce():
    setup_distributed()
    assert dist.get_world_size() == 1
    cfg = tiny()
    model = DFMSiT.from_config(cfg)
    engine, ema, _ = build_engine(cfg, model, world_size=1)
    assert engine.enable_backward_allreduce is False  # nothing to reduce: no flatten-and-copy of the gradients
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert ema.state_dict().keys() == model.state_dict().keys()
