"""Fréchet distance: zero on itself, closed forms on known Gaussians, scipy's sqrtm, ADM's edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dfm.evaluation.frechet import FeatureStats, frechet_distance, frechet_distance_to_features, use_low_rank


def fd_symmetric(mu1, s1, mu2, s2) -> float:
    """Reference by a different route: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), all via eigh."""

    def psd_sqrt(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = psd_sqrt(s1)
    w = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w, 0, None))))


def random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1, cond, d)) @ q.T


def test_distance_of_a_set_to_itself_is_zero():
    rng = np.random.default_rng(0)
    stats = FeatureStats.from_features(rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)))
    assert abs(stats.frechet_distance(stats)) < 1e-10 * np.trace(stats.sigma)


def test_from_features_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(1).normal(size=(40, 5))
    stats = FeatureStats.from_features(x.astype(np.float32))
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 39, rtol=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStats.from_features(x[:1])


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_match_closed_form():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(np.zeros(6), (q * a) @ q.T, np.zeros(6), (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [1, 2, 32])
def test_general_gaussians_match_scipy_sqrtm_and_eigh_route(d):
    rng = np.random.default_rng(4 + d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=100)
    got = frechet_distance(mu1, s1, mu2, s2)
    by_sqrtm = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert got == pytest.approx(by_sqrtm, rel=1e-12)
    assert got == pytest.approx(fd_symmetric(mu1, s1, mu2, s2), rel=1e-9)


def test_rank_deficient_covariances_keep_the_real_part():
    # 20 samples in 64 dimensions: rank-19 covariances, so sqrtm returns a complex matrix with rounding-level
    # imaginary parts that ADM's procedure drops.
    rng = np.random.default_rng(5)
    a, b = FeatureStats.from_features(rng.normal(size=(20, 64))), FeatureStats.from_features(rng.normal(size=(20, 64)))
    assert np.iscomplexobj(linalg.sqrtm(a.sigma @ b.sigma))
    got = a.frechet_distance(b)
    assert np.isfinite(got)
    assert got == pytest.approx(fd_symmetric(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)


def test_large_imaginary_component_is_an_error():
    # Not a covariance (negative eigenvalue): sqrt of -1 is i, far beyond rounding noise.
    with pytest.raises(ValueError, match="imaginary component 1.0"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_product_without_square_root_retries_with_eps_on_both_diagonals():
    # [[0, 1], [0, 0]] @ I has no square root (scipy returns inf), so ADM's fallback runs:
    # sqrtm((S1 + eps I)(I + eps I)) = sqrtm((1 + eps) [[eps, 1], [0, eps]]), trace 2 sqrt(eps (1 + eps)).
    eps = 1e-6
    with pytest.warns(UserWarning, match="adding 1e-06 to the diagonal"):
        got = frechet_distance(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.zeros(2), np.eye(2), eps=eps)
    assert got == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_mismatched_shapes_are_errors():
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


@pytest.mark.parametrize("n, d", [(5, 40), (40, 40), (41, 40)])  # low-rank route for N <= D, ADM's above
def test_distance_to_features_matches_adm_route(n, d):
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    ref_features = rng.normal(loc=0.3, size=(3 * d, d))
    ref = FeatureStats.from_features(ref_features)
    got = frechet_distance_to_features(features, ref)
    assert use_low_rank(features) == (n <= d)
    stats = FeatureStats.from_features(features)
    assert got == pytest.approx(stats.frechet_distance(ref), rel=1e-7)
    # exact reference from both feature sets: tr((S1 S2)^1/2) = nuclear norm of A1 A2^T / sqrt((N1 - 1)(N2 - 1))
    a1, a2 = features - features.mean(0), ref_features - ref_features.mean(0)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((len(a1) - 1) * (len(a2) - 1))
    exact = np.sum((stats.mu - ref.mu) ** 2) + np.trace(stats.sigma) + np.trace(ref.sigma) - 2 * tr_sqrt
    assert got == pytest.approx(exact, rel=1e-12)


def test_distance_to_features_of_the_same_small_set_is_zero():
    features = np.random.default_rng(7).normal(size=(8, 2048))  # the shape of a smoke test's Inception features
    ref = FeatureStats.from_features(features)
    assert abs(frechet_distance_to_features(features, ref)) < 1e-12 * np.trace(ref.sigma)
