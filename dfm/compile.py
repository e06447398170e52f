"""Compiled execution for training: torch.compile of the model, bf16 autocast, fused AdamW.

The model stays pure eager PyTorch; these functions wrap it from the outside, the way the training loop
and the sampler want it:

- :func:`compile_model` compiles each repeated transformer block in place (``nn.Module.compile``), so
  parameter names, ``state_dict`` keys and the module object itself are unchanged and DeepSpeed wraps the
  model exactly as it wraps the eager one. Identical blocks share one compiled graph (their parameters
  are graph inputs), so compile time does not grow with depth.
- :func:`autocast` is the mixed-precision context: bf16 on CUDA, fp32 on CPU by default (bf16 matmuls
  have no native support on AVX2 CPUs and run ~40x slower than fp32 there).
- :func:`make_optimizer` picks the AdamW implementation: torch's fused kernel on CUDA, NVIDIA apex's
  ``FusedAdam`` when asked for and importable, plain ``torch.optim.AdamW`` on CPU.
- :func:`compile_stats` reads torch's compile counters so that a training loop or a test can check that
  the steady state neither recompiles nor breaks graphs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from dfm import attention as attention_backends

# NVIDIA apex is built from source; the PyPI package named "apex" is unrelated and has no optimizers.
try:
    from apex.optimizers import FusedAdam as ApexFusedAdam
except Exception:
    ApexFusedAdam = None

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("blocks", "model")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
OPTIMIZER_IMPLS = ("auto", "torch", "torch_fused", "apex")
# torch's fused AdamW updates every tensor of a group in one multi-tensor kernel, as apex's FusedAdam
# does; ``auto`` takes apex only once ``benchmarks/bench_train_step.py::test_optimizer_step`` shows it
# faster on the card at hand (set this flag then).
APEX_FASTER = False


def compile_model(
    model: nn.Module,
    scope: str = "blocks",
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool = False,
) -> nn.Module:
    """Compile ``model`` in place with ``torch.compile`` and return it (the same object).

    Args:
        model: a module with a ``blocks`` ``nn.ModuleList`` of repeated transformer blocks (``DFMSiT``).
        scope: ``"blocks"`` compiles each block (the embedders and heads, a few small ops, stay eager);
            ``"model"`` compiles the whole forward as one graph.
        mode: ``torch.compile`` mode (``None``/``"default"``, ``"max-autotune-no-cudagraphs"``, ...). Leave
            ``"reduce-overhead"`` out when the caller captures CUDA graphs itself.
        fullgraph: raise on a graph break instead of silently splitting the graph.
        dynamic: ``False`` specialises on shapes (a new batch size compiles a new graph once).

    The first call of each distinct input shape pays the compile (tens of seconds on CPU); later calls
    run the cached graph. Checkpoints are unaffected: ``state_dict`` keys carry no ``_orig_mod`` prefix.
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    options: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    if scope == "model":
        model.compile(**options)
    else:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"scope='blocks' needs a model with a non-empty `blocks` ModuleList, got {type(model)}")
        for block in blocks:
            block.compile(**options)
    logger.info("compiled %s (scope=%s, mode=%s, dynamic=%s)", type(model).__name__, scope, mode, dynamic)
    return model


def default_precision(device: torch.device | str) -> str:
    """``"bf16"`` on CUDA, ``"fp32"`` elsewhere (CPU bf16 is emulated and far slower than fp32)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: torch.device | str, precision: str | None = None) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass: ``torch.autocast`` in bf16/fp16, a no-op for fp32.

    ``precision`` defaults to :func:`default_precision`. Parameters and optimizer state stay fp32; the
    loss should be computed in fp32 (``stage_loss`` casts its inputs).
    """
    precision = default_precision(device) if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _first_device(params: list) -> torch.device:
    for p in params:
        tensors = p["params"] if isinstance(p, dict) else [p]
        for tensor in tensors:
            return tensor.device
    raise ValueError("make_optimizer got no parameters")


def optimizer_impl(device: torch.device | str, impl: str = "auto") -> str:
    """The one predicate for the AdamW implementation on parameters living on ``device``.

    ``auto``: ``torch_fused`` on CUDA (``apex`` instead when importable and ``APEX_FASTER``), ``torch``
    elsewhere. On CPU torch's fused kernel also exists and measured 2-4x faster than the plain loop for
    the DFM-SiT-B/2 parameters on a 2-core AVX2 CPU (``benchmarks/bench_train_step.py``); ``auto`` keeps
    the plain loop there, the implementation DeepSpeed's CPU path is validated with, and ``torch_fused``
    selects the fused one. A forced ``apex`` that cannot run raises.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    cuda = torch.device(device).type == "cuda"
    if impl == "apex":
        if ApexFusedAdam is None:
            raise RuntimeError("optimizer impl 'apex' was forced but NVIDIA apex (apex.optimizers) is not importable")
        if not cuda:
            raise RuntimeError("optimizer impl 'apex' was forced but apex FusedAdam needs CUDA parameters")
        return impl
    if impl != "auto":
        return impl
    if cuda:
        return "apex" if ApexFusedAdam is not None and APEX_FASTER else "torch_fused"
    return "torch"


def make_optimizer(
    params: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    impl: str = "auto",
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors or param-group dicts) with the fastest implementation for their device.

    Every implementation computes the same decoupled-weight-decay AdamW update; only the kernels differ.
    ``impl`` forces one of ``OPTIMIZER_IMPLS`` (see :func:`optimizer_impl`). The optimizer never reads
    values back to the host, so a step adds no host sync.
    """
    params = list(params)
    chosen = optimizer_impl(_first_device(params), impl)
    logger.info("AdamW implementation: %s", chosen)
    if chosen == "apex":
        return ApexFusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True if chosen == "torch_fused" else None
    )


def compile_stats() -> dict[str, int]:
    """Counters of torch's compiler since the process started (or ``torch._dynamo.reset()``).

    ``graphs``: graphs compiled (a recompile adds one); ``graph_breaks``: graph breaks seen. Unchanged
    values across steady-state training steps mean no recompiles and no breaks.
    """
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def log_attention_backend(model: nn.Module, device: torch.device | str, precision: str | None = None) -> str:
    """Log (once) and return the attention backend the blocks of ``model`` will use on ``device``."""
    precision = default_precision(device) if precision is None else precision
    dtype = PRECISIONS[precision] or next(model.parameters()).dtype
    block = model.blocks[0]
    head_dim = block.attn.qkv.in_features // block.attn.num_heads
    return attention_backends.backend_for(device, dtype, head_dim)


__all__ = [
    "APEX_FASTER",
    "autocast",
    "compile_model",
    "compile_stats",
    "default_precision",
    "log_attention_backend",
    "make_optimizer",
    "optimizer_impl",
]
