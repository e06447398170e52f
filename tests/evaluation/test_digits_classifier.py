"""The digits feature network: trained on the real digits, cached, and a Fréchet distance / accuracy that
separate real digits from corrupted ones."""

from __future__ import annotations

import pytest
import torch

from dfm.data.digits import load_digits_tensor
from dfm.evaluation import digits
from dfm.evaluation.digits import digit_scores, digits_classifier

RESOLUTION = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return digits_classifier(RESOLUTION, cache_dir)  # trains (seconds on CPU) and writes the cache


def test_classifier_generalises_to_held_out_digits(classifier):
    assert classifier.heldout_accuracy >= 0.97


def test_cache_file_reloads_the_same_network(classifier, cache_dir):
    files = list(cache_dir.glob(f"digits_classifier_r{RESOLUTION}_*.pt"))
    assert len(files) == 1
    digits._MODELS.clear()  # forget the in-memory copy: the next call must read the file, not retrain
    reloaded = digits_classifier(RESOLUTION, cache_dir)
    assert reloaded is not classifier and reloaded.heldout_accuracy == classifier.heldout_accuracy
    for (name, a), b in zip(classifier.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_features_and_logits_shapes(classifier):
    x = torch.zeros(3, 1, RESOLUTION, RESOLUTION)
    assert classifier.features(x).shape == (3, 64) and classifier(x).shape == (3, 10)


def test_real_digits_score_zero_distance_and_high_accuracy(classifier, cache_dir):
    x, y = load_digits_tensor(RESOLUTION)
    scores = digit_scores(x, y, RESOLUTION, cache_dir)
    assert set(scores) == {"fd", "accuracy", "fine_band_ratio"}
    assert abs(scores["fd"]) < 1e-6  # the reference set itself
    assert scores["accuracy"] >= 0.98 and scores["fine_band_ratio"] == pytest.approx(1.0)


def test_native_8x8_digits_are_scored_by_the_16x16_classifier(classifier, cache_dir):
    x8, y = load_digits_tensor(8)
    x16, _ = load_digits_tensor(RESOLUTION)  # the same originals, resized as the scores resize them
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(x8), generator=g)[:500]
    small = digit_scores(x8[subset], y[subset], 8, cache_dir)
    large = digit_scores(x16[subset], y[subset], 16, cache_dir)
    assert small["fd"] == pytest.approx(large["fd"], rel=1e-5) and small["accuracy"] == large["accuracy"]
    assert small["accuracy"] >= 0.98


def test_distance_grows_with_corruption_and_accuracy_falls(classifier, cache_dir):
    x, y = load_digits_tensor(RESOLUTION)
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(x), generator=g)[:600]
    x, y = x[subset], y[subset]
    clean = digit_scores(x, y, RESOLUTION, cache_dir)
    noisy = digit_scores(x + 0.5 * torch.randn(x.shape, generator=g), y, RESOLUTION, cache_dir)
    noise = digit_scores(torch.rand(x.shape, generator=g) * 2 - 1, y, RESOLUTION, cache_dir)
    assert 0 < clean["fd"] < noisy["fd"] < noise["fd"]
    assert noisy["fd"] > 4 * clean["fd"]  # 600 real digits sit at FD ~5 from all 1,797 (sample-size bias)
    assert clean["accuracy"] > noisy["accuracy"] and noise["accuracy"] < 0.3
    shuffled = digit_scores(x, y.roll(1), RESOLUTION, cache_dir)  # right images, wrong labels
    assert shuffled["fd"] == pytest.approx(clean["fd"]) and shuffled["accuracy"] < 0.3


def test_wrong_shapes_are_errors(cache_dir):
    with pytest.raises(ValueError, match="expected images"):
        digit_scores(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), RESOLUTION, cache_dir)
    with pytest.raises(ValueError, match="expected labels"):
        digit_scores(torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.long), RESOLUTION, cache_dir)


def test_training_works_when_called_under_no_grad():
    """Scoring code runs under no_grad; a cache miss there must still train the classifier."""
    with torch.no_grad():
        model = digits.train_digits_classifier(8, epochs=1)
    # it did learn: one epoch reaches ~0.35 held-out; chance is 0.1 and 0.2 is six standard errors above it
    assert model.heldout_accuracy > 0.2 and all(p.grad is not None for p in model.parameters())
