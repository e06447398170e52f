"""Fréchet distance of N sample features against reference statistics: ADM's sqrtm route vs the exact
low-rank route that ``frechet_distance_to_features`` takes when N <= D.

``pytest benchmarks/bench_frechet.py --benchmark-enable``; see ``benchmarks/conftest.py``. ``eager`` is
ADM's procedure (``scipy.linalg.sqrtm`` of the D x D product, O(D^3) whatever N); ``low_rank`` is an
N x N symmetric eigenproblem. D = 512 keeps a run short: at Inception's D = 2048 one sqrtm alone took
55-93 s on a 2-core CPU shared with other jobs.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run

from dfm.evaluation.frechet import FeatureStats, frechet_distance_to_features

CASES = [(64, 512), (256, 512)]  # (N samples, D)


@pytest.mark.parametrize("provider", ["eager", "low_rank"])
@pytest.mark.parametrize("n,d", CASES, ids=[f"N{n}-D{d}" for n, d in CASES])
def test_frechet_to_reference(benchmark, n, d, provider):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, d))
    ref = FeatureStats.from_features(rng.normal(loc=0.1, size=(4 * d, d)))
    if provider == "eager":
        fn = lambda: FeatureStats.from_features(features).frechet_distance(ref)
    else:
        fn = lambda: frechet_distance_to_features(features, ref)
    assert fn() == pytest.approx(FeatureStats.from_features(features).frechet_distance(ref), rel=1e-6)
    run(benchmark, f"frechet N={n} D={d}", provider, fn, features.nbytes + ref.sigma.nbytes)
