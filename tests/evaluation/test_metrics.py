"""Inception Score and precision / recall against their definitions and ADM's procedure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfm.evaluation.metrics import inception_score, manifold_radii, precision_recall


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score on softmax outputs, written out in float64 numpy."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_uniform_classifier_output_scores_one():
    assert inception_score(np.zeros((37, 1008))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("confidence", [50.0, 1000.0])  # 1000: probabilities underflow to exactly 0
def test_confident_distinct_outputs_score_the_class_count(confidence):
    classes = 10
    logits = confidence * np.eye(classes)[np.arange(40) % classes]
    assert inception_score(logits) == pytest.approx(classes, rel=1e-12)


def test_matches_adm_formula_with_ragged_splits():
    logits = np.random.default_rng(0).normal(scale=3, size=(23, 7))
    # splits of 5, 5, 5, 5, 3 as ADM cuts them; the split size changes the value
    got = inception_score(logits, split_size=5)
    assert got == pytest.approx(adm_inception_score(logits, 5), rel=1e-12)
    assert got != pytest.approx(inception_score(logits, split_size=23), rel=1e-3)
    assert inception_score(torch.from_numpy(logits).float(), split_size=5) == pytest.approx(got, rel=1e-6)


def test_manifold_radii_are_squared_kth_neighbour_distances():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # distances sorted, self first: from 0: (0, 1, 3, 6, 10); from 3: (0, 2, 3, 3, 7); from 10: (0, 4, 7, 9, 10)
    torch.testing.assert_close(manifold_radii(x, k=1), torch.tensor([1.0, 1.0, 4.0, 9.0, 16.0]))
    torch.testing.assert_close(
        manifold_radii(x, k=3, row_batch_size=2, col_batch_size=3), torch.tensor([36.0, 25.0, 9.0, 25.0, 81.0])
    )


def test_identical_sets_have_precision_and_recall_one():
    x = np.random.default_rng(1).normal(size=(200, 32)).astype(np.float32)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_far_apart_sets_have_precision_and_recall_zero():
    rng = np.random.default_rng(2)
    ref, sample = rng.normal(size=(100, 16)), rng.normal(size=(80, 16)) + 100.0
    assert precision_recall(ref, sample) == (0.0, 0.0)


def brute_force_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition in float64 with full distance matrices."""

    def sq_dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq_dist(ref, ref), axis=1)[:, k]
    r_sample = np.sort(sq_dist(sample, sample), axis=1)[:, k]
    d = sq_dist(ref, sample)  # (refs, samples)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_sample[None, :]).any(axis=1))
    return float(precision), float(recall)


def test_partial_overlap_matches_brute_force_definition_across_blocks():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(150, 8))
    sample = rng.normal(loc=0.7, scale=0.6, size=(110, 8))  # narrower and shifted: high precision, lower recall
    expected = brute_force_precision_recall(ref, sample, k=3)
    assert 0.0 < expected[1] < expected[0] < 1.0
    assert precision_recall(ref, sample, row_batch_size=7, col_batch_size=11) == expected
    assert precision_recall(ref, sample) == expected
