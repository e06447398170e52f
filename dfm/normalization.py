"""Per-stage normalisation of the pyramid (spec §2, ours): every stage divided by its data-set RMS.

The Laplacian bands of real data carry very different energy: on the digits at 8x8 the coarse 4x4 stage has
an RMS of 0.72 and the 8x8 band 0.46 (at 16x16, 0.73 and 0.12: the band of upsampled 8x8 originals is
small). With ``x_t = (1 - t) x + t eps`` an equal ``t`` then means a very different signal-to-noise ratio per
stage. With ``dfm.normalize_stages`` the flow runs on ``bands[s] / rms[s]``, so every stage has unit second
moment and equal ``t`` means equal SNR; the sampler multiplies by ``rms[s]`` before recomposing. The map is
diagonal, one positive scalar per stage: exactly invertible (up to one float rounding each way). One object,
:class:`FlowSpace`, holds the map (to the flow, back, the recomposed preview); the objective and every sampler take
it, so no caller scales a band by hand.

``rms`` is measured once from the training data (:func:`measure_stage_rms`) when a run starts and stored in
the run's config (``dfm.stage_rms``, in ``config.yaml`` and every checkpoint's copy), with the counts
behind it in ``<run>/stage_stats.json``; sampling reads it from there and never measures again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dfm import pyramid
from dfm.errors import ArgumentError

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


@dataclass(frozen=True)
class FlowSpace:
    """The space the flow runs in, built once from the run config and taken by the objective and every sampler.

    ``rms`` holds one positive scale per stage (``dfm.stage_rms``): the flow runs on ``bands[s] / rms[s]`` and
    the samplers multiply back before recomposing. ``FlowSpace()`` (``rms`` None) is the reference: the bands
    as they are, every map the identity (the very same tensors come back).
    """

    rms: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rms is None:
            return
        rms = tuple(float(r) for r in self.rms)
        if not all(math.isfinite(r) and r > 0 for r in rms):
            raise ArgumentError("stage_rms", f"must be finite and positive, got {list(self.rms)}")
        object.__setattr__(self, "rms", rms)

    @classmethod
    def from_config(cls, cfg) -> FlowSpace:
        """The flow space of run config ``cfg``: ``dfm.stage_rms`` when ``dfm.normalize_stages``, else the
        identity. A normalised config whose statistics were never measured cannot be sampled or trained:
        ValueError naming the key."""
        if not cfg.dfm.normalize_stages:
            return cls()
        if cfg.dfm.stage_rms is None:
            raise ArgumentError(
                "stage_rms",
                "is not set although dfm.normalize_stages is true: a run measures it from its data when it starts "
                "(dfm train) and stores it in its config.yaml",
            )
        return cls(tuple(cfg.dfm.stage_rms))

    def check_stages(self, stages: int) -> FlowSpace:
        """``self``, after checking that it holds one scale per stage (ValueError naming ``stage_rms``)."""
        if self.rms is not None and len(self.rms) != stages:
            raise ArgumentError("stage_rms", f"has {len(self.rms)} entries for {stages} stages: {list(self.rms)}")
        return self

    @property
    def is_identity(self) -> bool:
        return self.rms is None

    def to_flow(self, bands: list[Tensor]) -> list[Tensor]:
        """Data-space bands -> flow space: ``bands[s] / rms[s]``."""
        return bands if self.rms is None else [b / r for b, r in zip(bands, self.rms, strict=True)]

    def to_data(self, bands: list[Tensor]) -> list[Tensor]:
        """Flow-space bands -> data space: ``bands[s] * rms[s]``; inverts :meth:`to_flow` (one rounding each way)."""
        return bands if self.rms is None else [b * r for b, r in zip(bands, self.rms, strict=True)]

    def preview(self, bands: list[Tensor], s: int) -> Tensor:
        """Full-size preview of stages ``0..s`` of flow-space ``bands`` (``dfm.pyramid.preview`` in data space)."""
        return pyramid.preview(self.to_data(bands), s, full_size=True)


__all__ = [
    "STATS_FILE",
    "FlowSpace",
    "measure_stage_rms",
    "stage_rms_of",
    "stage_std_of",
    "training_images",
]
