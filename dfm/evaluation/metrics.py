"""Inception Score and improved precision / recall, as ADM's evaluation suite defines them.

- Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` on consecutive splits of ``split_size`` = 5000 samples
  (10 splits for 50k; the last split takes the remainder), averaged over splits (ADM after improved-gan).
- Precision / recall (Kynkäänniemi et al., 2019, ADM's ``ManifoldEstimator``): each feature vector's
  manifold radius is its squared distance to its k-th nearest neighbour (k = 3) within its own set, self
  included at distance 0; precision is the fraction of samples within the radius of some reference
  feature, recall the fraction of references within the radius of some sample. Pairwise squared distances
  come from ``|u|^2 - 2 u.v + |v|^2`` clamped at 0, in row x column blocks so that 50k x 50k never sits in
  memory at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3


def inception_score(logits: np.ndarray | Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of class logits (N, C), with ADM's splits of ``split_size`` consecutive samples.

    Computed in float64 from log-softmax, so a confident classifier whose probabilities underflow to 0
    contributes 0 (``0 * log 0``) instead of NaN.
    """
    logits = torch.as_tensor(logits).to(torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"expected logits of shape (N, C) with N >= 1, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part_log_p = log_p[start : start + split_size]
        p = part_log_p.exp()
        log_p_y = torch.log(p.mean(dim=0, keepdim=True))  # log of the split's marginal p(y)
        kl = torch.where(p > 0, p * (part_log_p - log_p_y), torch.zeros_like(p)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def pairwise_sq_distances(u: Tensor, v: Tensor) -> Tensor:
    """Squared Euclidean distances (n, m) between rows of u (n, D) and v (m, D), as ADM's DistanceBlock.

    ADM evaluates them in float16 when that stays finite; float32 here, which only removes rounding from
    comparisons against the radii.
    """
    norm_u = (u * u).sum(dim=1, keepdim=True)  # (n, 1)
    norm_v = (v * v).sum(dim=1)[None]  # (1, m)
    return (norm_u - 2 * u @ v.T + norm_v).clamp_min(0)


def manifold_radii(
    features: Tensor, k: int = PR_NEIGHBOURS, row_batch_size: int = 10000, col_batch_size: int = 10000
) -> Tensor:
    """Squared distance (N,) from each feature vector to its k-th nearest neighbour in ``features`` (self is 0th)."""
    n = len(features)
    if n < k + 1:
        raise ValueError(f"manifold radii with k={k} need at least {k + 1} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0 : r0 + row_batch_size]
        d = torch.cat(
            [pairwise_sq_distances(rows, features[c0 : c0 + col_batch_size]) for c0 in range(0, n, col_batch_size)],
            dim=1,
        )  # (rows, N)
        radii[r0 : r0 + len(rows)] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def precision_recall(
    ref_features: np.ndarray | Tensor,
    sample_features: np.ndarray | Tensor,
    k: int = PR_NEIGHBOURS,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """(precision, recall) of samples against references, ADM's ``ManifoldEstimator.evaluate_pr``.

    Features (N, D) are moved to ``device`` (default: where they are) as float32; the comparisons run
    in ``row_batch_size x col_batch_size`` blocks.
    """
    ref = torch.as_tensor(ref_features, device=device).float()
    sample = torch.as_tensor(sample_features, device=device).float()
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"feature sets must be (N, D) with the same D, got {tuple(ref.shape)} and {tuple(sample.shape)}"
        )
    radii_ref = manifold_radii(ref, k, row_batch_size, col_batch_size)
    radii_sample = manifold_radii(sample, k, row_batch_size, col_batch_size)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # within some sample's radius
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)  # within some reference's radius
    for r0 in range(0, len(ref), row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, len(sample), col_batch_size):
            c1 = c0 + col_batch_size
            d = pairwise_sq_distances(ref[r0:r1], sample[c0:c1])  # (refs, samples)
            ref_in[r0:r1] |= (d <= radii_sample[None, c0:c1]).any(dim=1)
            sample_in[c0:c1] |= (d <= radii_ref[r0:r1, None]).any(dim=0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()
