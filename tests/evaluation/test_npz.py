"""ADM .npz reading: streamed batches equal the stored array; every error names the file and the key."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest

from dfm.evaluation.frechet import FeatureStats
from dfm.evaluation.npz import NpzImages, read_reference_stats, write_reference_stats


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_batches_stream_the_stored_images_in_order(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    save(path, images, np.arange(5))  # arr_0 images, arr_1 labels, as ADM writes them
    reader = NpzImages(path)
    assert len(reader) == 5 and reader.shape == (5, 8, 6, 3)
    batches = list(reader.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(reader.read_all(), images)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.npz"))):
        NpzImages(tmp_path / "nope.npz")


def test_non_archive_names_the_path(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not an .npz archive"):
        NpzImages(path)


def test_missing_key_names_the_file_the_key_and_what_is_there(tmp_path):
    path = tmp_path / "stats_only.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no array 'arr_0'.*mu, sigma"):
        NpzImages(path)


@pytest.mark.parametrize(
    "array, what",
    [
        (np.zeros((2, 4, 4, 3), np.float32), "float32 of shape \\(2, 4, 4, 3\\)"),
        (np.zeros((2, 4, 4), np.uint8), "uint8 of shape \\(2, 4, 4\\)"),
        (np.zeros((2, 4, 4, 1), np.uint8), "uint8 of shape \\(2, 4, 4, 1\\)"),
    ],
)
def test_wrong_images_name_file_key_dtype_and_shape(tmp_path, array, what):
    path = tmp_path / "bad.npz"
    np.savez(path, images=array)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'images'.*" + what):
        NpzImages(path, key="images")


def test_truncated_array_is_an_error_naming_the_file(tmp_path):
    # A header promising 3 images followed by the bytes of 2 (e.g. a sampler killed while writing).
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (3, 2, 2, 3)})
    buf.write(np.zeros((2, 2, 2, 3), np.uint8).tobytes())
    path = tmp_path / "cut.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue())
    reader = NpzImages(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated.*expected 3 images, data ends at image 2"):
        list(reader.batches(2))


def test_batch_size_below_one_is_rejected(tmp_path):
    path = tmp_path / "ok.npz"
    np.savez(path, np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="batch size"):
        next(NpzImages(path).batches(0))


def test_reference_statistics_round_trip_under_adm_keys(tmp_path):
    rng = np.random.default_rng(1)
    stats = {
        "pool": FeatureStats.from_features(rng.normal(size=(10, 4))),
        "spatial": FeatureStats.from_features(rng.normal(size=(10, 3))),
    }
    path = tmp_path / "ref_stats.npz"
    write_reference_stats(path, stats)
    assert sorted(np.load(path).files) == ["mu", "mu_s", "sigma", "sigma_s"]
    back = read_reference_stats(path)
    assert sorted(back) == ["pool", "spatial"]
    for name in stats:
        np.testing.assert_array_equal(back[name].mu, stats[name].mu)
        np.testing.assert_array_equal(back[name].sigma, stats[name].sigma)


def test_images_only_reference_has_no_statistics(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, np.zeros((2, 4, 4, 3), np.uint8))
    assert read_reference_stats(path) == {}


def test_half_statistics_name_the_missing_key(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'mu_s' but not 'sigma_s'"):
        read_reference_stats(path)


def test_statistics_of_wrong_shape_name_the_keys(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'mu' \\(3,\\) and 'sigma' \\(4, 4\\)"):
        read_reference_stats(path)
