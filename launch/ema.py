"""The EMA of the weights, as each ZeRO layout holds them: a full fp32 copy, or each rank's partition.

Both update from the fp32 master weights the optimizer has just written (the engine is fp32 at every stage,
``dfm.precision``), in one fused ``_foreach_lerp_`` per step and without per-step copies, and both give the
full EMA weights through ``state_dict()`` for checkpoints and ``module()`` for sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist


class ModelEMA:
    """An fp32, frozen full copy of the model holding the exponential moving average of its weights.

    Used wherever each rank holds the full weights (ZeRO 0-2), where the module's parameters are the fp32
    master weights the optimizer has just updated; :class:`ZeRO3EMA` is the partitioned counterpart.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._targets = list(self.model.parameters())

    @torch.no_grad()  # the lerp must not record autograd history: it would chain every step's EMA to the last
    def update_(self, model: torch.nn.Module, decay: float) -> None:
        # the module's parameters are the fp32 master weights just updated: read as they are, no copies
        torch._foreach_lerp_(self._targets, list(model.parameters()), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def module(self) -> torch.nn.Module:
        return self.model


class ZeRO3EMA:
    """EMA of a ZeRO-3 model, kept as each rank's fp32 EMA of its own parameter partitions.

    Each step is one local ``lerp`` of the fp32 partitions DeepSpeed has just updated (``param.ds_tensor``):
    no communication, and 1/world_size of the model's memory. :meth:`state_dict` gathers the full weights to
    rank 0 (a collective: every rank calls it), :meth:`load_state_dict` takes full weights on every rank and
    keeps this rank's slice, :meth:`module` builds the full EMA model on rank 0 for sampling.
    """

    def __init__(self, module: torch.nn.Module, make_module: Callable[[], torch.nn.Module]):
        self.make_module = make_module
        self.params = dict(module.named_parameters())
        missing = [name for name, p in self.params.items() if not hasattr(p, "ds_tensor")]
        if missing:
            raise ValueError(f"ZeRO3EMA needs ZeRO-3 partitioned parameters; not partitioned: {missing[:3]}")
        self.shards = {name: p.ds_tensor.detach().float().clone() for name, p in self.params.items()}
        self._targets = list(self.shards.values())
        self.buffers = {k: v.detach().float().clone() for k, v in module.state_dict().items() if k not in self.params}
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @torch.no_grad()
    def update_(self, model: torch.nn.Module, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * partition`` for this rank's partitions, in one foreach call."""
        # ds_tensor is read each step (DeepSpeed may rebind it, e.g. on load); fp32 as the engine is: no copies
        torch._foreach_lerp_(self._targets, [p.ds_tensor for p in self.params.values()], 1.0 - decay)

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights on rank 0 (CPU), an empty dict on the other ranks. Collective."""
        out = {}
        for name, p in self.params.items():
            shard = self.shards[name]
            parts = [torch.empty_like(shard) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(shard, parts, dst=0)
            if self.rank == 0:
                out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        if self.rank == 0:
            out.update({k: v.cpu() for k, v in self.buffers.items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of full EMA weights (the same dict on every rank)."""
        for name, shard in self.shards.items():
            flat = weights[name].reshape(-1).to(shard.device, torch.float32)
            piece = flat[self.rank * shard.numel() : (self.rank + 1) * shard.numel()]
            shard.zero_()  # the padding of the last partition
            shard[: piece.numel()].copy_(piece)
        for k, v in self.buffers.items():
            v.copy_(weights[k])

    def module(self) -> torch.nn.Module | None:
        """The full EMA model (eval, fp32) on rank 0, None elsewhere. Collective."""
        weights = self.state_dict()
        if self.rank != 0:
            return None
        device = next(iter(self.shards.values())).device
        model = self.make_module().to(device)
        model.load_state_dict(weights)
        return model.float().eval().requires_grad_(False)
