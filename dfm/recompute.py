"""Activation checkpointing of the transformer blocks, applied from the outside (as ``dfm.compile`` compiles).

A checkpointed block keeps only its inputs during the forward pass and recomputes its activations in the
backward pass: at 512 and 1,024 px (1,024 and 4,096 tokens) the blocks' activations, not the weights, decide
the micro-batch. :func:`checkpoint_blocks` wraps the ``forward`` of every ``every``-th block in
``torch.utils.checkpoint.checkpoint`` (non-reentrant: it composes with autocast, ``torch.compile``, ZeRO's
gradient hooks and ``no_grad`` evaluation). The module tree, parameter names and ``state_dict`` keys are
unchanged, so checkpoints, the EMA and DeepSpeed see the same model with it on or off, and a run may turn it
on or off when it resumes. The recomputed forward runs the same kernels on the same inputs: on a CPU in fp32
the gradients are bitwise those of the plain step (``tests/test_recompute.py``).
"""

from __future__ import annotations

import types

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: nn.Module, every: int) -> nn.Module:
    """Checkpoint blocks 0, ``every``, 2 ``every``, ... of ``model.blocks`` in place and return ``model``.

    ``every``: 0 leaves the model as it is; 1 checkpoints every block (the least memory, one extra forward of
    the blocks in the backward pass); k > 1 every k-th block (memory and recompute in between).
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"activation checkpointing must be 0 (off) or a block interval >= 1, got {every!r}")
    if every == 0:
        return model
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"activation checkpointing needs a model with a non-empty `blocks` ModuleList, got {type(model)}"
        )
    for i, block in enumerate(blocks):
        if i % every == 0 and not getattr(block, "_dfm_checkpointed", False):
            block.forward = types.MethodType(_checkpointed_forward, block)
            block._dfm_checkpointed = True
    return model


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    # A plain function bound to the block, not functools.partial(checkpoint, ...): torch.compile traces it and
    # turns the checkpoint call into its higher-order op (a partial of the dynamo-disabled checkpoint left a
    # compiled block with no frame to compile), and a deepcopy of the block binds the copy, not the original.
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks :func:`checkpoint_blocks` wrapped (for the run's start line and for tests)."""
    return [i for i, block in enumerate(getattr(model, "blocks", [])) if getattr(block, "_dfm_checkpointed", False)]


__all__ = ["checkpoint_blocks", "checkpointed_blocks"]
