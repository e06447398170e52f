"""ADM's evaluation of a sample batch against a reference batch: IS, FID, sFID, precision, recall (+ FDD).

Follows guided-diffusion ``evaluations/evaluator.py``: Inception features of both batches; reference
statistics read from the reference ``.npz`` when it carries ``mu``/``sigma`` (and ``mu_s``/``sigma_s``),
computed from its images otherwise; IS from the sample logits; precision / recall need the reference
images. FDD runs the same Fréchet distance on DINOv2 CLS features when DINOv2 weights are given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfm.evaluation.frechet import FeatureStats, frechet_distance_to_features
from dfm.evaluation.metrics import IS_SPLIT_SIZE, PR_NEIGHBOURS, inception_score, precision_recall
from dfm.evaluation.npz import IMAGES_KEY, NpzImages, npz_keys, read_reference_stats, write_reference_stats


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Plain fp32 convolutions and matmuls on CUDA for the duration (cuDNN convs default to TF32, whose
    10-bit mantissa would move the features away from the fp32 TF graph's); restores the settings."""
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if device.type != "cuda" or not hasattr(conv, "fp32_precision"):
        yield
        return
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@torch.no_grad()
def batched_features(
    fn: Callable[[Tensor], dict[str, Tensor]],
    images: NpzImages,
    batch_size: int,
    device: torch.device,
    desc: str | None,
) -> dict[str, np.ndarray]:
    """Run ``fn`` on uint8 batches of ``images`` moved to ``device``; concatenate its outputs as float32 numpy.
    A progress bar labelled ``desc`` (none without)."""
    out: dict[str, list[np.ndarray]] = {}
    total = -(-len(images) // batch_size)
    pin = device.type == "cuda"
    for batch in tqdm(images.batches(batch_size), total=total, desc=desc, unit="batch", disable=desc is None):
        x = torch.from_numpy(batch.copy())  # frombuffer arrays are read-only
        x = x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)
        for name, value in fn(x).items():
            out.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


def inception_features(model: nn.Module, images: NpzImages, batch_size: int, device: torch.device, desc: str):
    """pool (N, 2048), spatial (N, 2023) and logits (N, 1008) of every image, float32 numpy."""
    return batched_features(lambda x: model(x)._asdict(), images, batch_size, device, desc)


def dinov2_features(model: nn.Module, images: NpzImages, batch_size: int, device: torch.device, desc: str):
    """DINOv2 CLS features (N, D) of every image, float32 numpy, under key ``"dinov2"``."""
    return batched_features(lambda x: {"dinov2": model.forward_images(x)}, images, batch_size, device, desc)


def open_batches(
    sample_path: str | Path, ref_path: str | Path
) -> tuple[NpzImages, dict[str, FeatureStats], NpzImages | None]:
    """``(samples, reference statistics, reference images or None)`` with every header checked, so that a wrong
    file is refused before a feature network runs: a missing ``arr_0``, a reference with neither images nor
    statistics, or reference images of another size than the samples (Inception would resize both to 299 and
    score them against each other without a word)."""
    samples = NpzImages(sample_path)
    ref_stats = read_reference_stats(ref_path)
    ref_images = NpzImages(ref_path) if IMAGES_KEY in npz_keys(ref_path) else None
    if ref_images is None and "pool" not in ref_stats:
        raise ValueError(f"{ref_path}: holds neither reference images ('{IMAGES_KEY}') nor statistics ('mu', 'sigma')")
    if ref_images is not None and ref_images.shape[1:] != samples.shape[1:]:
        h, w, _ = samples.shape[1:]
        rh, rw, _ = ref_images.shape[1:]
        raise ValueError(
            f"--samples {sample_path} holds {h}x{w} images but --ref {ref_path} holds {rh}x{rw} images: "
            "score samples against a reference batch of their own size"
        )
    return samples, ref_stats, ref_images


def evaluate_npz(
    sample_path: str | Path,
    ref_path: str | Path,
    inception: nn.Module,
    dinov2: nn.Module | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    split_size: int = IS_SPLIT_SIZE,
    k: int = PR_NEIGHBOURS,
    pr_batch_size: int = 10000,
    save_ref_stats: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """All metrics of the samples in ``sample_path`` against ``ref_path``; models already on ``device``.

    Returns ``{"inception_score", "fid", "sfid", "precision", "recall", "fdd", "num_samples",
    "num_reference"}``; a metric the reference cannot support (no images for precision / recall, no
    spatial statistics for sFID, no DINOv2 weights for FDD) is ``None``. ``save_ref_stats`` writes the
    reference statistics used (ADM's keys) to an ``.npz`` that can serve as ``ref_path`` later. Fréchet
    distances follow ADM's sqrtm route, or its exact low-rank equivalent when there are no more samples than
    feature dimensions (see :func:`dfm.evaluation.frechet.frechet_distance_to_features`). ``progress``: bars
    while features are computed.
    """
    device = torch.device(device)
    bar = (lambda text: text) if progress else (lambda text: None)
    samples, ref_stats, ref_images = open_batches(sample_path, ref_path)

    with ieee_fp32(device):
        sample_feats = inception_features(inception, samples, batch_size, device, bar("Inception: samples"))
        ref_feats = (
            inception_features(inception, ref_images, batch_size, device, bar("Inception: reference"))
            if ref_images is not None
            else {}
        )
        if dinov2 is not None:
            sample_feats |= dinov2_features(dinov2, samples, batch_size, device, bar("DINOv2: samples"))
            if ref_images is not None and "dinov2" not in ref_stats:
                ref_feats |= dinov2_features(dinov2, ref_images, batch_size, device, bar("DINOv2: reference"))

    # Reference statistics stored in the file take precedence over those of its images, as in ADM.
    for name in ("pool", "spatial", "dinov2"):
        if name not in ref_stats and name in ref_feats:
            ref_stats[name] = FeatureStats.from_features(ref_feats[name])
    if save_ref_stats is not None:
        write_reference_stats(save_ref_stats, ref_stats)

    def frechet(name: str) -> float | None:
        if name not in ref_stats or name not in sample_feats:
            return None
        return frechet_distance_to_features(sample_feats[name], ref_stats[name])

    precision = recall = None
    if "pool" in ref_feats:
        blocks = {"row_batch_size": pr_batch_size, "col_batch_size": pr_batch_size}
        precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], k=k, device=device, **blocks)
    return {
        "inception_score": inception_score(sample_feats["logits"], split_size),
        "fid": frechet("pool"),
        "sfid": frechet("spatial"),
        "precision": precision,
        "recall": recall,
        "fdd": frechet("dinov2"),
        "num_samples": len(samples),
        "num_reference": len(ref_images) if ref_images is not None else None,
    }
