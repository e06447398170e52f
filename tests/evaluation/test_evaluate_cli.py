"""`dfm evaluate` end to end on real files: random-weight networks, tiny ADM batches, JSON output.

Every image costs a 299x299 Inception forward on CPU, so the batches hold 3 images (the fewest that
k = 2 nearest-neighbour radii allow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dfm.launch.evaluate import format_table, main
from test_dinov2 import TINY, tiny_model

from dfm.evaluation.npz import read_reference_stats


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """A reference batch of 3 images; "same" repeats it; "samples" copies 2 of them and adds 1 other."""
    root = tmp_path_factory.mktemp("batches")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    np.savez(root / "ref.npz", ref)
    np.savez(root / "same.npz", ref)
    other = rng.integers(0, 256, size=(1, 20, 20, 3), dtype=np.uint8)
    samples = np.concatenate([ref[:2], np.pad(other, ((0, 0), (2, 2), (2, 2), (0, 0)))])
    np.savez(root / "samples.npz", samples, np.arange(len(samples)))  # arr_1: labels, ignored
    return root


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "dinov2_tiny.pth"
    torch.save(tiny_model(TINY).state_dict(), path)
    return str(path)


def run(samples, ref, inception_weights, *extra) -> dict:
    argv = ["--samples", str(samples), "--ref", str(ref), "--inception-weights", inception_weights]
    return main([*argv, "--batch-size", "2", "--device", "cpu", "--k", "2", *extra])


def test_identical_batches_score_zero_distance_and_full_precision_recall(
    batches, inception_weights, dinov2_weights, capsys
):
    out = batches / "same.json"
    extra = ["--dinov2-weights", dinov2_weights, "--out", str(out)]
    results = run(batches / "same.npz", batches / "ref.npz", inception_weights, *extra)
    assert json.loads(out.read_text()) == results
    assert results["num_samples"] == results["num_reference"] == 3
    for key in ("fid", "sfid", "fdd"):
        assert abs(results[key]) < 1e-6, key
    assert results["precision"] == results["recall"] == 1.0
    assert results["inception_score"] > 1.0
    printed = capsys.readouterr().out
    assert format_table(results) in printed and str(out) in printed


def test_saved_reference_statistics_give_the_same_scores_without_precision_recall(batches, inception_weights):
    stats_path = batches / "ref_stats.npz"
    save = ["--save-ref-stats", str(stats_path)]
    with_images = run(batches / "samples.npz", batches / "ref.npz", inception_weights, *save)
    assert json.loads((batches / "samples.metrics.json").read_text()) == with_images
    assert with_images["fid"] > 1.0 and with_images["sfid"] > 1.0 and with_images["fdd"] is None
    # the two copies lie at distance 0 from a point of the other set, whatever the radii
    assert with_images["precision"] >= 2 / 3 and with_images["recall"] >= 2 / 3
    assert sorted(read_reference_stats(stats_path)) == ["pool", "spatial"]

    stats_only = run(batches / "samples.npz", stats_path, inception_weights, "--out", str(batches / "stats.json"))
    for key in ("fid", "sfid", "inception_score"):
        assert stats_only[key] == pytest.approx(with_images[key], rel=1e-9), key
    assert stats_only["precision"] is None and stats_only["recall"] is None and stats_only["num_reference"] is None
    assert "n/a" in format_table(stats_only)


def test_unusable_reference_is_an_error_naming_it(batches, inception_weights):
    path = batches / "labels_only.npz"
    np.savez(path, labels=np.arange(3))
    with pytest.raises(ValueError, match="labels_only.npz: holds neither reference images"):
        run(batches / "samples.npz", path, inception_weights)


def test_missing_weights_say_where_they_come_from(batches, tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=r"no such file\. Nothing is downloaded here: fetch .*pytorch-fid"):
        run(batches / "samples.npz", batches / "ref.npz", str(missing))


def test_a_file_whose_content_does_not_match_the_hash_in_its_name_is_refused(batches, inception_weights, tmp_path):
    import shutil

    renamed = tmp_path / "pt_inception-2015-12-05-6726825d.pth"  # the release's name over other content
    shutil.copy(inception_weights, renamed)
    with pytest.raises(ValueError, match=r"its SHA-256 starts with [0-9a-f]{8}, not with the 6726825d its name"):
        run(batches / "samples.npz", batches / "ref.npz", str(renamed))


def test_small_batches_and_foreign_weights_are_warned_about(batches, inception_weights, capsys):
    import hashlib
    from pathlib import Path

    results = run(batches / "samples.npz", batches / "ref.npz", inception_weights, "--out", str(batches / "w.json"))
    assert results["inception_sha256"] == hashlib.sha256(Path(inception_weights).read_bytes()).hexdigest()
    warnings = results["warnings"]
    assert len(warnings) == 3 and "not the released InceptionV3" in warnings[0]
    assert "3 samples: FID/sFID from far fewer than the 50,000" in warnings[1]
    assert "the reference batch holds 3 images" in warnings[2]
    err = capsys.readouterr().err
    assert all(f"dfm evaluate: warning: {w}" in err for w in warnings)
