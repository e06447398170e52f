"""AdamW for training: the fastest implementation for the device, with gradient clipping that stays on device.

:func:`make_optimizer` returns a :class:`ClippedAdamW`: ``torch.optim.AdamW`` (torch's fused multi-tensor
kernel by default, on CUDA and CPU alike) whose ``step`` first clips the global gradient norm to
``max_norm``. The norm is one fused ``_foreach_norm`` over the gradients plus, for partitioned optimizer
state (ZeRO 1/2, where each rank steps only its slice), an all-reduce of its square over ``norm_group``;
the clip factor ``min(1, max_norm / (norm + 1e-6))`` multiplies the gradients on device. Nothing is read
back to the host, and the last norm stays available as a device tensor (``grad_norm``) for logging.

Why clipping lives here and not in DeepSpeed (0.19): its fp32 clipping (ZeRO 0) loops over every gradient
and builds ``torch.tensor([...], device=...)`` twice per step (blocking host-to-device copies), and its
ZeRO 1/2/3 optimizers read the norm back to the host (``is_invalid_grad_norm``) to skip non-finite steps.
``dfm.launch.engine`` therefore turns DeepSpeed's clipping off where this optimizer can do it.

On a 2-core AMD EPYC, torch's fused AdamW step took 0.085 s on the DFM-SiT-B/2 parameters against 0.51 s
for the per-tensor loop that ``torch.optim.AdamW`` runs on CPU by default (which also calls ``.item()``
once per parameter). NVIDIA apex's ``FusedAdam`` is not used: torch's fused kernel is the same multi-tensor
update, and one implementation keeps one set of numerics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

OPTIMIZER_IMPLS = ("auto", "torch", "torch_fused")


def _first_device(params: list) -> torch.device:
    for p in params:
        tensors = p["params"] if isinstance(p, dict) else [p]
        for tensor in tensors:
            return tensor.device
    raise ValueError("make_optimizer got no parameters")


def optimizer_impl(device: torch.device | str, impl: str = "auto") -> str:
    """The one predicate for the AdamW implementation on parameters living on ``device``.

    ``auto`` is torch's fused kernel (``torch_fused``) on every device torch has it for (CUDA and CPU);
    ``torch`` is the plain per-tensor loop (the reference the fused kernel is tested against).
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    return "torch_fused" if impl == "auto" else impl


class ClippedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that clips the global gradient norm on device before each step.

    Args:
        params, lr, betas, eps, weight_decay, fused: as for ``torch.optim.AdamW``.
        max_norm: clip threshold; 0 measures the norm (``grad_norm``) without clipping; None does neither
            (the engine clips, e.g. under ZeRO 3).
        norm_group: process group over which the squared norm is summed: the data-parallel group when each
            rank holds one slice of the gradients (ZeRO 1/2), None when every rank holds all of them.

    With ``norm_group`` the optimizer must hold one parameter group: DeepSpeed's ZeRO 1/2 steps the groups
    one at a time, so a norm over several groups could not be global.
    """

    def __init__(self, params, *, max_norm: float | None = None, norm_group=None, **adamw):
        super().__init__(params, **adamw)
        if norm_group is not None and len(self.param_groups) != 1:
            raise ValueError("ClippedAdamW with a norm_group needs exactly one parameter group")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_group = norm_group
        self.grad_norm: torch.Tensor | None = None  # the last step's global norm (device tensor, before clipping)

    @torch.no_grad()
    def clip_(self) -> torch.Tensor | None:
        """Clip the gradients in place; returns the global norm before clipping (None if there are no grads)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.max_norm is None or not grads:
            return None
        # The foreach ops directly: torch.nn.utils' clipping helpers fall back to a Python loop per tensor on
        # CPU, while these run one C++ loop there and one multi-tensor kernel on CUDA.
        square = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(square, group=self.norm_group)
        norm = square.sqrt()
        if self.max_norm > 0:
            # min(1, max_norm / norm) as a tensor: an `if norm > max_norm` would read the norm on the host
            torch._foreach_mul_(grads, (self.max_norm / (norm + 1e-6)).clamp(max=1.0))
        self.grad_norm = norm
        return norm

    def step(self, closure=None):
        self.clip_()
        return super().step(closure)


def make_optimizer(
    params: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    impl: str = "auto",
    max_norm: float | None = None,
    norm_group=None,
) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors or param-group dicts) with the fastest implementation for their device.

    Every implementation computes the same decoupled-weight-decay AdamW update; only the kernels differ.
    ``impl`` forces one of ``OPTIMIZER_IMPLS`` (see :func:`optimizer_impl`); ``max_norm`` / ``norm_group`` set
    the on-device clipping of :class:`ClippedAdamW`.
    """
    params = list(params)
    chosen = optimizer_impl(_first_device(params), impl)
    logger.info("AdamW implementation: %s", chosen)
    return ClippedAdamW(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        fused=True if chosen == "torch_fused" else None,
        max_norm=max_norm,
        norm_group=norm_group,
    )


__all__ = ["ClippedAdamW", "OPTIMIZER_IMPLS", "make_optimizer", "optimizer_impl"]
