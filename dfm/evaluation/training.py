"""Evaluation during training (``train.eval_every``), as k-diffusion's ``--evaluate-every``: the EMA samples a
fixed set of ``train.eval_samples`` images and scalars go to the run's metrics.

The set is the same at every evaluation: index ``i`` draws its noise from ``(seed, i)`` and its label is
``i % num_classes`` (``dfm.generation.IndexSampler``, balanced labels), so the curve moves with the model, not
with the draw. What scores it:

- the digits: the digits classifier (:func:`dfm.evaluation.digits.digit_scores`): ``eval/fd``, the Fréchet
  distance of its features to the 1,797 real digits, and ``eval/accuracy``, the share classified as the class
  asked for. 500 samples of the quickstart model at 50 NFE take about 18 s on 2 CPU cores;
- latents: decoded through the store's VAE and scored by ``dfm evaluate``'s ADM evaluator against
  ``train.eval_ref`` with the Inception weights ``train.eval_inception_weights``: ``eval/fid``, ``eval/sfid``,
  ``eval/inception_score``. Both are needed (nothing is downloaded); without them, or without a VAE, there is
  no latent evaluation and the start-up lines say so. A reference without statistics has them computed once
  from its images and cached under ``<run>/eval/``. FID from a few thousand samples is biased upwards:
  compare evaluations of one run with each other, not with published 50k-sample numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from dfm.evaluation.digits import digit_scores
from dfm.evaluation.evaluator import evaluate_npz
from dfm.evaluation.inception import load_inception
from dfm.evaluation.npz import read_reference_stats
from dfm.files import atomic_open
from dfm.generation import IndexSampler

# Samples per sampler batch: one batch of the digits' 500, and bounded activations for a large latent model.
EVAL_BATCH = 256


def eval_samples(
    model, cfg, decoder=None, count: int | None = None, seed: int | None = None, batch: int = EVAL_BATCH
) -> tuple[np.ndarray | torch.Tensor, torch.Tensor]:
    """The fixed evaluation set of ``model``: model-space samples (decoded uint8 images with ``decoder``)
    and their labels; ``count`` samples (default ``train.eval_samples``) from ``seed`` (default the run's),
    ``batch`` at a time (each index is seeded on its own, so the batch changes no sample)."""
    seed = cfg.seed if seed is None else seed
    sampler = IndexSampler(model, cfg, seed=seed, labels="balanced", decoder=decoder, sampler_mode="eager")
    n = cfg.train.eval_samples if count is None else count
    xs, ys = [], []
    for start in range(0, n, batch):
        indices = range(start, min(n, start + batch))
        x, y = sampler.sample(indices)
        xs.append(sampler.decode(x) if decoder is not None else x.cpu())
        ys.append(y)
    x = np.concatenate(xs) if decoder is not None else torch.cat(xs)
    return x, torch.cat(ys)


class DigitsEvaluator:
    """``eval/fd``, ``eval/accuracy`` and ``eval/fine_band_ratio`` of the digits classifier on the fixed evaluation
    set (:func:`dfm.evaluation.digits.digit_scores`)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, model) -> dict[str, float]:
        x, y = eval_samples(model, self.cfg)
        scores = digit_scores(x, y, self.cfg.data.resolution)
        return {f"eval/{k}": v for k, v in scores.items()}  # fd, accuracy, fine_band_ratio


class InceptionEvaluator:
    """``eval/fid``, ``eval/sfid`` and ``eval/inception_score`` of the decoded evaluation set against a reference."""

    def __init__(self, cfg, decoder, device):
        self.cfg, self.decoder, self.device = cfg, decoder, torch.device(device)
        self.inception = load_inception(cfg.train.eval_inception_weights, self.device)
        self.folder = cfg.run_dir / "eval"
        self.ref = Path(cfg.train.eval_ref)
        # The reference's statistics, computed once per run and named after the reference file (its path, size
        # and time), so a run given another train.eval_ref never scores against a stale cache.
        ref_id = self.ref.stat() if self.ref.exists() else None
        key = f"{self.ref.resolve()}|{ref_id.st_size if ref_id else ''}|{ref_id.st_mtime_ns if ref_id else ''}"
        self.ref_stats = self.folder / f"reference_stats-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"

    def __call__(self, model) -> dict[str, float]:
        images, labels = eval_samples(model, self.cfg, self.decoder)
        self.folder.mkdir(parents=True, exist_ok=True)
        samples = self.folder / "samples.npz"
        with atomic_open(samples, "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels.numpy())
        cached = self.ref_stats.is_file()
        has_stats = cached or "pool" in read_reference_stats(self.ref)
        metrics = evaluate_npz(
            samples,
            self.ref_stats if cached else self.ref,
            self.inception,
            device=self.device,
            save_ref_stats=None if has_stats else self.ref_stats,
            progress=False,  # the run's log gets the scalars, not bars
        )
        samples.unlink()
        keys = ("fid", "sfid", "inception_score")
        return {f"eval/{k}": float(metrics[k]) for k in keys if metrics.get(k) is not None}


def build_evaluator(cfg, decoder=None, device="cpu"):
    """``(evaluator or None, note)`` for ``train.eval_every``; the note says why a latent run is not evaluated."""
    t = cfg.train
    if not t.eval_every:
        return None, ""
    if cfg.data.kind == "digits":
        return DigitsEvaluator(cfg), f"eval: every {t.eval_every} steps, digits classifier on {t.eval_samples} samples"
    if t.eval_inception_weights is None:
        return None, (
            "eval: off for this latent run: train.eval_every needs train.eval_inception_weights and train.eval_ref "
            "(the Inception weights and a reference batch; see dfm evaluate)"
        )
    if decoder is None:
        return None, "eval: off: no VAE decodes the samples (see the samples line)"
    return InceptionEvaluator(cfg, decoder, device), (
        f"eval: every {t.eval_every} steps, FID/sFID/IS of {t.eval_samples} samples against {t.eval_ref}"
    )


__all__ = ["DigitsEvaluator", "InceptionEvaluator", "build_evaluator", "eval_samples"]
