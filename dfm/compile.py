"""Compiled execution: torch.compile of the model, from the outside.

The model stays pure eager PyTorch; these functions wrap it the way the training loop and the sampler want
it (precision lives in ``dfm.precision``, the optimizer in ``dfm.optim``):

- :func:`compile_model` compiles each repeated transformer block in place (``nn.Module.compile``), so
  parameter names, ``state_dict`` keys and the module object itself are unchanged and DeepSpeed wraps the
  model exactly as it wraps the eager one. Identical blocks share one compiled graph (their parameters
  are graph inputs), so compile time does not grow with depth.
- :func:`compile_stats` reads torch's compile counters so that a training loop or a test can check that
  the steady state neither recompiles nor breaks graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from dfm import attention as attention_backends
from dfm.precision import AUTOCAST_DTYPES, resolve_precision

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("blocks", "model")


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


def log_attention_backend(model: nn.Module, device: torch.device | str, precision: str = "auto") -> str:
    """Log (once) and return the attention backend the blocks of ``model`` will use on ``device``."""
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)] or next(model.parameters()).dtype
    block = model.blocks[0]
    head_dim = block.attn.qkv.in_features // block.attn.num_heads
    return attention_backends.backend_for(device, dtype, head_dim)


__all__ = ["compile_model", "compile_stats", "log_attention_backend"]
