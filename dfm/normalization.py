"""Per-stage normalisation of the pyramid (spec §2, ours): every stage divided by its data-set RMS.

The Laplacian bands of real data carry very different energy: on the digits at 8x8 the coarse 4x4 stage has
an RMS of 0.72 and the 8x8 band 0.46 (at 16x16, 0.73 and 0.12: the band of upsampled 8x8 originals is
small). With ``x_t = (1 - t) x + t eps`` an equal ``t`` then means a very different signal-to-noise ratio per
stage. With ``dfm.normalize_stages`` the flow runs on ``bands[s] / rms[s]``, so every stage has unit second
moment and equal ``t`` means equal SNR; the sampler multiplies by ``rms[s]`` before recomposing. The map is
diagonal, one positive scalar per stage: exactly invertible (up to one float rounding each way).

``rms`` is measured once from the training data (:func:`measure_stage_rms`) when a run starts and stored in
the run's config (``dfm.stage_rms``, in ``config.yaml`` and every checkpoint's copy), with the counts
behind it in ``<run>/stage_stats.json``; sampling reads it from there and never measures again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dfm import pyramid

STATS_FILE = "stage_stats.json"
# Latent stores are large: the statistics read the first this many items (each with one posterior draw).
LATENT_STATS_ITEMS = 4096


def stage_rms_of(x: Tensor, stages: int) -> list[float]:
    """Root mean square of every pyramid stage of ``x`` (N, C, H, W), coarsest first, in float64."""
    bands = pyramid.decompose(x.double(), stages)
    return [float(b.square().mean().sqrt()) for b in bands]


def stage_std_of(x: Tensor, stages: int) -> list[float]:
    """Standard deviation of every pyramid stage of ``x`` (about each stage's mean), coarsest first."""
    return [float(b.std()) for b in pyramid.decompose(x.double(), stages)]


def training_images(data_cfg, limit: int = LATENT_STATS_ITEMS) -> Tensor:
    """The images (digits) or latents (the first ``limit`` items of the store, one seeded posterior draw each)
    whose stage statistics a run normalises by: the same for every rank and every run of this data."""
    if data_cfg.kind == "digits":
        from dfm.data.digits import load_digits_tensor

        return load_digits_tensor(data_cfg.resolution)[0]
    from dfm.data.store import open_store
    from dfm.data.stream import sample_posterior

    store = open_store(data_cfg.data_dir)
    moments = torch.from_numpy(np.ascontiguousarray(store.gather(np.arange(min(limit, store.count)))))
    return sample_posterior(moments.float(), store.scale, torch.Generator().manual_seed(0), store.shift)


def measure_stage_rms(data_cfg, stages: int) -> dict:
    """``{"rms": [...], "std": [...], "items": N, "stages": S}`` of the training data (see :func:`training_images`)."""
    x = training_images(data_cfg)
    return {"rms": stage_rms_of(x, stages), "std": stage_std_of(x, stages), "items": len(x), "stages": stages}


def check_stage_rms(rms: list[float] | None, stages: int) -> None:
    """Raise ValueError (naming ``stage_rms``) unless ``rms`` holds one finite positive value per stage."""
    if rms is None:
        return
    if len(rms) != stages:
        raise ValueError(f"stage_rms has {len(rms)} entries for {stages} stages: {list(rms)}")
    if not all(math.isfinite(r) and r > 0 for r in rms):
        raise ValueError(f"stage_rms must be finite and positive, got {list(rms)}")


def normalize(bands: list[Tensor], rms: list[float] | None) -> list[Tensor]:
    """Data-space bands -> flow space: ``bands[s] / rms[s]`` (unchanged without ``rms``)."""
    return bands if rms is None else [b / r for b, r in zip(bands, rms, strict=True)]


def denormalize(bands: list[Tensor], rms: list[float] | None) -> list[Tensor]:
    """Flow-space bands -> data space: ``bands[s] * rms[s]`` (unchanged without ``rms``); inverts :func:`normalize`."""
    return bands if rms is None else [b * r for b, r in zip(bands, rms, strict=True)]


def flow_scale(cfg) -> list[float] | None:
    """The per-stage scale the flow of run config ``cfg`` runs in: ``dfm.stage_rms`` when
    ``dfm.normalize_stages``, else None (the reference: the bands as they are). A normalised config whose
    statistics were never measured cannot be sampled: ValueError naming the key."""
    if not cfg.dfm.normalize_stages:
        return None
    if cfg.dfm.stage_rms is None:
        raise ValueError(
            "stage_rms is not set although dfm.normalize_stages is true: a run measures it from its data when it "
            "starts (dfm train) and stores it in its config.yaml"
        )
    return list(cfg.dfm.stage_rms)


__all__ = [
    "STATS_FILE",
    "check_stage_rms",
    "denormalize",
    "flow_scale",
    "measure_stage_rms",
    "normalize",
    "stage_rms_of",
    "stage_std_of",
    "training_images",
]
