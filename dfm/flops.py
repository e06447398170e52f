"""Model FLOPs per image for any (DFM-)SiT config, and bf16 peaks of common GPUs for MFU.

Counted like ``torch.utils.flop_counter.FlopCounterMode`` and the usual transformer accounting: matmuls
and convolutions at 2 FLOPs per multiply-add; normalisation, activations, softmax, modulation and
embedding lookups are left out (they are memory-bound and a few percent of the total). A DFM model runs
every stage's patch embedding and head on every step (masked stages enter as zeros), so its cost is
fixed per image: the shared token grid ``T = (H/p) (W/p)`` plus the small per-stage embedders and heads.
Training is counted as 3x the forward pass (backward = 2x forward).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence

import torch

from dfm.models import ModelConfig, model_config

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's product data sheets (which
# quote the sparse figure, twice these). Matched in order against the upper-cased device name, so the
# more specific names come first (GH200 before H200, NVL/PCIe before the SXM default).
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], str, float]] = [
    (("GH200",), "GH200", 989.4),
    (("H200", "NVL"), "H200 NVL", 835.5),
    (("H200",), "H200 SXM", 989.4),
    (("H100", "NVL"), "H100 NVL", 835.5),
    (("H100", "PCIE"), "H100 PCIe", 756.5),
    (("H100",), "H100 SXM", 989.4),
    (("A100",), "A100", 312.0),  # SXM4 and PCIe share the bf16 peak
]


def _config(config: ModelConfig | str) -> ModelConfig:
    return model_config(config) if isinstance(config, str) else config


def flops_breakdown(config: ModelConfig | str) -> dict[str, int]:
    """Forward FLOPs per image, by part: ``x_embed``, ``t_embed``, ``blocks``, ``attention``, ``heads``.

    ``blocks`` holds the linear layers of all blocks (adaLN, qkv, projection, MLP) and ``attention``
    the two attention matmuls ``q k^T`` and ``softmax(.) v`` (``4 T^2 D`` per block).
    """
    cfg = _config(config)
    H, W = cfg.hw
    T = (H // cfg.patch_size) * (W // cfg.patch_size)  # tokens, the same for every stage
    D, C, depth = cfg.hidden_size, cfg.in_channels, cfg.depth
    D_mlp = int(D * cfg.mlp_ratio)
    patch_pixels = [p * p for p in cfg.stage_patch_sizes]
    frequency_size = 256  # TimestepEmbedder's sinusoid width
    per_block_linear = 2 * D * 6 * D + T * 2 * D * (3 * D + D + 2 * D_mlp)  # adaLN + qkv, proj, fc1 + fc2
    return {
        "x_embed": sum(2 * T * C * pp * D for pp in patch_pixels),
        "t_embed": cfg.stages * 2 * (frequency_size * D + D * D),
        "blocks": depth * per_block_linear,
        "attention": depth * 4 * T * T * D,
        "heads": sum(2 * D * 2 * D + 2 * T * D * pp * C for pp in patch_pixels),
    }


def forward_flops(config: ModelConfig | str) -> int:
    """FLOPs of one forward pass per image (one sample of the batch, no CFG doubling)."""
    return sum(flops_breakdown(config).values())


def training_flops(config: ModelConfig | str) -> int:
    """FLOPs of one training step per image: forward + backward = 3x forward."""
    return 3 * forward_flops(config)


def sampling_flops(config: ModelConfig | str, step_is_guided: Sequence[bool], method: str = "euler") -> int:
    """FLOPs of one sampled image along a schedule: one forward per step (two with CFG, twice for Heun)."""
    evals_per_step = 2 if method == "heun" else 1
    return sum((2 if guided else 1) * evals_per_step for guided in step_is_guided) * forward_flops(config)


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of ``device``: the GPU's name on CUDA, the CPU model otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bf16_flops(name: str) -> float | None:
    """Dense bf16 peak in FLOP/s of the card called ``name`` (``torch.cuda.get_device_name``), None if unknown."""
    upper = name.upper()
    for needles, _, tflops in PEAK_BF16_TFLOPS:
        if all(needle in upper for needle in needles):
            return tflops * 1e12
    return None


def mfu(flops_per_image: float, images_per_s: float, name: str) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the card's bf16 peak (None for an unknown card)."""
    peak = peak_bf16_flops(name)
    return None if peak is None else flops_per_image * images_per_s / peak


__all__ = [
    "PEAK_BF16_TFLOPS",
    "device_name",
    "flops_breakdown",
    "forward_flops",
    "mfu",
    "peak_bf16_flops",
    "sampling_flops",
    "training_flops",
]
