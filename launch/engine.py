"""DeepSpeed wiring: process groups, the engine config generated from the run config, the engine and its EMA.

Launching (``launch/scripts/`` has the ImageNet recipes)::

    one process:  dfm train --config C
    one node:     deepspeed --num_gpus 8 launch/train.py --config C --data-dir D
                  torchrun --nproc_per_node 8 launch/train.py --config C --data-dir D
    many nodes:   deepspeed --hostfile launch/hostfile.example --master_addr HOST0 --master_port 29500 \\
                      launch/train.py --config C --data-dir D
                  torchrun --nnodes 4 --node_rank I --master_addr HOST0 --master_port 29500 \\
                      --nproc_per_node 8 launch/train.py --config C --data-dir D   (on every node)

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`setup_distributed`
reads them (and makes a one-rank group for a plain process), so the same loop runs at every scale. Each choice
of the generated config is explained beside its line in :func:`deepspeed_config`; measured step times per
ZeRO stage are in ``benchmarks/results/`` (``bench_zero.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from dfm.launch.ema import ModelEMA, ZeRO3EMA

from dfm.compile import compile_model
from dfm.config import Config, ConfigError
from dfm.models import DFMSiT
from dfm.optim import make_optimizer
from dfm.precision import resolve_precision
from dfm.recompute import checkpoint_blocks

logger = logging.getLogger(__name__)


def training_device() -> torch.device:
    """The one decision of where this process trains: its local GPU, or the host.

    ``DS_ACCELERATOR=cpu`` (DeepSpeed's own switch) keeps a process on the host even where CUDA exists, so
    that several CPU ranks can run on a machine with fewer GPUs than ranks; otherwise CUDA when available.
    """
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); start at most "
            "that many processes per node, or set DS_ACCELERATOR=cpu to train on the host"
        )
    return torch.device("cuda", local_rank)


# DeepSpeed's console output that says nothing a user can act on, each matched exactly. Records of its logger
# are demoted to this module's logger at DEBUG; the warnings are deprecations inside DeepSpeed's own calls
# into torch.distributed (torch 2.13), filtered by message.
DEMOTED_RECORDS = ("You are using ZeRO with an untested optimizer",)  # torch's AdamW, handed over on purpose
IGNORED_WARNINGS = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",)


class _Demote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in DEMOTED_RECORDS):
            logger.debug("DeepSpeed: %s", message)
            return False
        return True


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's known noise off the console (see ``DEMOTED_RECORDS``); idempotent."""
    from deepspeed.utils import logger as ds_logger  # local: see setup_distributed

    if not any(isinstance(f, _Demote) for f in ds_logger.filters):
        ds_logger.addFilter(_Demote())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def setup_distributed() -> tuple[int, int]:
    """Initialise the process group (gloo on the host, nccl on CUDA); returns (rank, world_size).

    Under ``torchrun`` / ``deepspeed`` the launcher sets RANK, WORLD_SIZE and MASTER_*; a plain single
    process gets a one-rank group on a free local port, so one code path serves every scale.
    """
    device = training_device()
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's accelerator must agree
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # Local: importing DeepSpeed takes ~4 s (2-core EPYC) and `dfm generate` reads training_device from here.
    import deepspeed

    quiet_deepspeed()
    if not torch.distributed.is_initialized():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # "DeepSpeed ...shm_comm_op built successfully" on the host
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        if printed.getvalue().strip():
            logger.debug("DeepSpeed: %s", printed.getvalue().strip())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for the configured global batch.

    ``global = micro * world_size * accumulation`` at every world size: ``train.micro_batch_size`` fixes the
    micro batch (accumulation absorbs a change of world size), otherwise it is ``global / world_size``.
    """
    g = cfg.train.global_batch_size
    micro = cfg.train.micro_batch_size or g // world_size
    if micro < 1 or g % (micro * world_size) != 0:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({g}) is not a multiple of micro batch ({micro}) x world size "
            f"({world_size}); set 'train.micro_batch_size' to a divisor"
        )
    return micro, g // (micro * world_size)


@dataclass(frozen=True)
class StepPlan:
    """The decisions of an optimizer step, made by :func:`step_plan`."""

    client_optimizer: bool  # our AdamW is handed to DeepSpeed (else the generated config declares DeepSpeed's)
    optimizer_clips: bool  # dfm.optim.ClippedAdamW clips, on device (else DeepSpeed's gradient_clipping)
    norm_from_optimizer: bool  # the logged norm is ClippedAdamW.grad_norm (else engine.get_global_grad_norm)


def step_plan(cfg: Config) -> StepPlan:
    """Which optimizer steps, who clips, and where the logged gradient norm comes from: the three decisions of a
    step, made here for every ZeRO stage and read by :func:`deepspeed_config`, :func:`client_optimizer` and
    :func:`grad_norm_reader`.

    - Optimizer: torch's fused AdamW as ``dfm.optim.ClippedAdamW``, handed to DeepSpeed as its client
      optimizer. ZeRO-Offload refuses a client optimizer; there the generated config declares DeepSpeed's (CPU
      Adam on CUDA machines, torch's AdamW on a CPU-only one).
    - Clipping: ClippedAdamW's at ZeRO 0-2, on device with no host read (DeepSpeed's own clipping reads the
      norm back to the host every step, see ``dfm.optim``). ZeRO 3 computes and checks the norm inside its
      optimizer whatever the config says, and under ZeRO-Offload DeepSpeed's optimizer steps: there DeepSpeed
      clips (``gradient_clipping``).
    - Gradient norm before clipping (``train/grad_norm``): from whoever clips, ``ClippedAdamW.grad_norm`` (a
      device tensor, measured also when ``grad_clip`` is 0) or ``engine.get_global_grad_norm``. Reading either
      queues nothing and waits for nothing; the loop sums it on device and reads it at log steps.
    """
    ours = cfg.train.zero_stage < 3 and not cfg.train.offload
    return StepPlan(client_optimizer=not cfg.train.offload, optimizer_clips=ours, norm_from_optimizer=ours)


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run, derived from the run config (never hand-kept).

    ``load_universal`` makes the engine read a universal checkpoint: how a run resumes at another world size.
    A plain step of ZeRO 0-2 reads nothing back to the host (``tests/test_host_sync.py`` counts on the real
    step); the lines below that keep it so say so.
    """
    micro, accum = batch_layout(cfg, world_size)
    t = cfg.train
    ours = step_plan(cfg).optimizer_clips
    # ZeRO 0 is plain data parallelism (one process, the digits, defaults to it); 1 partitions the optimizer
    # state, 2 the gradients too, 3 the parameters too. The multi-GPU recipes (configs/*xl*.yaml) use ZeRO 2:
    # ZeRO 0 reduces the gradients in one exposed all-reduce after backward (2.7 GB of fp32 gradients per
    # SiT-XL/2 step), ZeRO 2 reduce-scatters each bucket as backward produces it and keeps 1/N of the gradients
    # and AdamW state per rank, leaving exposed only the all-gather of the updated weights. Reasoned, not yet
    # measured on GPUs: the CPU numbers (benchmarks/results/*-zero.md) cannot show overlap.
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage > 0:
        zero.update(
            # On CUDA overlap_comm synchronises the device once per backward (ZeRO 2; per step at ZeRO 1) to
            # close the reduction it ran on a side stream: a wait at the end of backward, when the reduction is
            # queued anyway, kept because it hides the gradient traffic; off, each bucket reduces on the compute
            # stream instead.
            overlap_comm=t.overlap_comm,
            contiguous_gradients=t.contiguous_gradients,  # DeepSpeed's default: no fragmented gradient memory
            reduce_bucket_size=t.reduce_bucket_size,  # why 5e7: beside the default in dfm.config.TrainConfig
        )
        if t.zero_stage < 3:
            zero["allgather_bucket_size"] = t.allgather_bucket_size
            if ours:
                zero["compute_grad_norm"] = False  # the norm is ClippedAdamW's
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if ours else t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # progress is ours; DeepSpeed's report reads values back to the host
        "wall_clock_breakdown": False,
        # On by default, the throughput timer synchronises the device at the start and end of every micro-step.
        "timers": {"throughput": {"enabled": False}},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
    }
    # The engine's weights, optimizer state and gradients are fp32 at every stage; bf16 comes only from autocast
    # around the model's forward (dfm.precision), as in the reference. DeepSpeed's `bf16` section would cast the
    # module (bf16 residual stream, an EMA of bf16 weights) and at ZeRO 0 step the optimizer per tensor with a
    # host read per parameter. The autocast is this section rather than one around the call because
    # engine.forward switches an outer CUDA autocast off; an empty lower_precision_safe_modules gives no
    # parameter a bf16 communication dtype, so gradients are reduced in fp32 like the reference's DDP.
    if resolve_precision(t.precision, training_device()) == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if t.offload:
        # no client optimizer under ZeRO-Offload (step_plan): DeepSpeed's is declared here
        on_gpu = training_device().type == "cuda"
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # DeepSpeed's CPU Adam on CUDA machines; on a CPU-only machine torch's AdamW (same update),
                # because the CPU Adam op takes ~80 s to build there and gains nothing on a host "device"
                "torch_adam": not on_gpu,
            },
        }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def use_compile(cfg: Config) -> bool:
    """The one predicate for the compiled model path: ``train.compile`` and a ZeRO stage that allows it.

    Stages 0-2 leave the module untouched, so its blocks compile (``dfm.compile.compile_model``). Stage 3
    gathers parameters in forward pre-hooks that DeepSpeed marks ``torch.compiler.disable``, on which a
    ``fullgraph`` block fails ("Skip calling torch.compiler.disable()d function"): it runs eager and says so.
    """
    if not cfg.train.compile:
        return False
    if cfg.train.zero_stage == 3:
        logger.warning(
            "train.compile: running eager under ZeRO-3, whose parameter-gathering forward hooks are "
            "torch.compiler.disable'd and break the compiled blocks' graphs"
        )
        return False
    return True


def client_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """AdamW handed to DeepSpeed; None under ZeRO-Offload, whose optimizer comes from the generated config.

    Under ZeRO 1/2 each rank steps its slice of the flat fp32 master weights, so the clipping norm is
    summed over the data-parallel group (here every rank: there is no model parallelism).
    """
    plan = step_plan(cfg)
    if not plan.client_optimizer:
        return None
    t = cfg.train
    clip = t.grad_clip if plan.optimizer_clips else None
    group = dist.group.WORLD if t.zero_stage in (1, 2) else None
    return make_optimizer(
        model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, max_norm=clip, norm_group=group
    )


def grad_norm_reader(cfg: Config, engine, optimizer):
    """A function returning the last step's global gradient norm before clipping, from where :func:`step_plan`
    says it comes: the clipping optimizer's ``grad_norm``, or DeepSpeed's."""
    if step_plan(cfg).norm_from_optimizer and hasattr(optimizer, "grad_norm"):
        return lambda: optimizer.grad_norm
    return engine.get_global_grad_norm


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, load_universal: bool = False):
    """``deepspeed.initialize`` with the generated config; returns ``(engine, ema, read_grad_norm)``, the last from
    :func:`grad_norm_reader`.

    The EMA of stages 0-2 is a full fp32 copy taken before compiling, so it stays a plain eager module that
    samples without a compile of its own; under ZeRO-3 it is made of the partitions after initialize.
    """
    import deepspeed  # local: see setup_distributed

    ema = ModelEMA(model) if cfg.train.zero_stage < 3 else None
    # After the EMA copy, as compiling: the EMA only samples, without gradients, and keeps the plain blocks.
    checkpoint_blocks(model, cfg.train.activation_checkpointing)
    if use_compile(cfg):
        compile_model(model)
    optimizer = client_optimizer(cfg, model)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, load_universal=load_universal)
    )
    if world_size == 1 and cfg.train.zero_stage == 0:
        # Nothing to reduce on one rank, but DeepSpeed would still flatten every gradient into a buffer of the
        # model's size, "all-reduce" it and copy it back: three passes over the gradients per step.
        engine.enable_backward_allreduce = False
    if ema is None:
        # Under ZeRO-3 each rank keeps the EMA of its own parameter partition: a full EMA updated inside
        # GatheredParameters would all-gather every parameter once more per step and hold the whole model on
        # every rank, the two costs ZeRO-3 exists to avoid. The partitions are gathered only to save, sample
        # or export.
        ema = ZeRO3EMA(engine.module, lambda: DFMSiT.from_config(cfg))
    return engine, ema, grad_norm_reader(cfg, engine, optimizer)
