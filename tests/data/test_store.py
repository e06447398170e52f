"""The latent store format: writing (in one piece or chunk by chunk), and bad input, each case naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_testing import decode_indices, index_coded_moments

from dfm.data import build_latent_loader
from dfm.data.store import StoreError, StoreWriter, open_store, validate_store, write_store


def take(loader, n_batches: int):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


@pytest.mark.parametrize("layout", ["packed", "files"])
def test_writer_in_chunks_writes_the_store_write_store_writes(tmp_path, layout):
    moments = index_coded_moments(7, std=0.5)
    labels = np.arange(7) % 3
    whole = open_store(write_store(tmp_path / "whole", moments, labels, 3, layout=layout))
    writer = StoreWriter(tmp_path / "chunked", layout, 7, moments.shape[1:], moments.dtype)
    for lo, hi in ((0, 3), (3, 3), (3, 7)):  # an empty chunk too (a part whose images were all skipped)
        writer.add(moments[lo:hi], labels[lo:hi])
    assert not (tmp_path / "chunked" / "manifest.json").exists()  # no manifest, no store: until finish
    manifest = writer.finish(3, source="here")
    chunked = validate_store(tmp_path / "chunked", deep=True)
    assert manifest["source"] == "here" and manifest["count"] == 7 and chunked.layout == layout
    np.testing.assert_array_equal(chunked.gather(np.arange(7)), whole.gather(np.arange(7)))
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    assert chunked.stats == whole.stats  # sums of exactly representable values: equal to the bit
    # Statistics of z = mean + std * n are exact: mean 10 * index (0..60), variance of the means + 0.5^2.
    np.testing.assert_allclose(chunked.stats["mean"], [30.0] * 4, rtol=1e-12)
    np.testing.assert_allclose(chunked.stats["std"], [np.sqrt(400.0 + 0.25)] * 4, rtol=1e-12)


def test_writer_refuses_an_incomplete_or_mismatched_store(tmp_path):
    writer = StoreWriter(tmp_path / "s", "packed", 6, (8, 4, 4), np.float32)
    writer.add(index_coded_moments(4), np.zeros(4))
    with pytest.raises(ValueError, match="cannot add 3 samples"):
        writer.add(index_coded_moments(3), np.zeros(3))  # 7 > 6
    with pytest.raises(ValueError, match="cannot add 2 samples of \\(8, 4, 5\\)"):
        writer.add(np.zeros((2, 8, 4, 5), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="4 of 6 samples written, the store is incomplete"):
        writer.finish(3)
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(ValueError, match="layout must be 'packed' or 'files'"):
        StoreWriter(tmp_path / "t", "lmdb", 6, (8, 4, 4), np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each case names the file


def _packed(tmp_path, count=6, **kw):
    return write_store(tmp_path / "s", index_coded_moments(count), np.arange(count) % 3, 3, **kw)


def _edit_manifest(root, **changes):
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def _corrupt_header(root):
    (root / "moments.npy").write_bytes(b"\x93NUMPY garbage that is no header" + bytes(64))


def _truncate(root):
    data = (root / "moments.npy").read_bytes()
    (root / "moments.npy").write_bytes(data[: len(data) - 100])


def _wrong_dtype(root):
    np.save(root / "moments.npy", index_coded_moments(6).astype(np.float64))
    _edit_manifest(root, dtype="float64")


BAD_PACKED = {
    "missing dir": (lambda r: __import__("shutil").rmtree(r), r"latent store directory .*/s does not exist"),
    "no manifest": (lambda r: (r / "manifest.json").unlink(), r"/s holds no manifest.json or dataset.json"),
    "corrupt manifest": (lambda r: (r / "manifest.json").write_text("{not json"), r"corrupt JSON in .*manifest.json"),
    "manifest keys": (lambda r: (r / "manifest.json").write_text('{"layout": "packed"}'), r"manifest.json lacks"),
    "missing moments": (lambda r: (r / "moments.npy").unlink(), r"missing moments file .*moments.npy"),
    "corrupt moments": (_corrupt_header, r"corrupt moments file .*moments.npy"),
    "truncated moments": (_truncate, r"corrupt moments file .*moments.npy"),
    "wrong shape": (lambda r: _edit_manifest(r, shape=[8, 4, 5]), r"moments.npy has shape \(6, 8, 4, 4\)"),
    "wrong dtype": (_wrong_dtype, r"moments.npy has dtype float64; a latent store holds float16 or float32"),
    "missing labels": (lambda r: (r / "labels.npy").unlink(), r"missing labels file .*labels.npy"),
    "label range": (lambda r: np.save(r / "labels.npy", np.array([0, 1, 2, 3, 0, 1])), r"labels.npy out of range"),
    "negative label": (lambda r: np.save(r / "labels.npy", np.array([0, 1, -1, 0, 0, 1])), r"sample 2 has label -1"),
    "float labels": (lambda r: np.save(r / "labels.npy", np.zeros(6)), r"labels.npy have dtype float64"),
    "label count": (lambda r: np.save(r / "labels.npy", np.zeros(5, np.int64)), r"labels.npy has shape \(5,\)"),
    "layout": (lambda r: _edit_manifest(r, layout="lmdb"), r"manifest.json: unknown layout 'lmdb'"),
    "dtype mismatch": (
        lambda r: _edit_manifest(r, dtype="float16"),
        r"moments.npy has dtype float32, the manifest says",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PACKED))
def test_bad_packed_store_names_the_file(tmp_path, case):
    root = _packed(tmp_path)
    break_it, message = BAD_PACKED[case]
    break_it(root)
    with pytest.raises(StoreError, match=message):
        build_latent_loader(root, 2, loader="torch")


def test_empty_store_and_empty_shard(tmp_path):
    empty = write_store(tmp_path / "e", np.zeros((0, 8, 4, 4), np.float32), np.zeros(0), 3)
    with pytest.raises(StoreError, match=r"moments.npy holds no samples"):
        validate_store(empty)
    small = _packed(tmp_path, count=3)
    validate_store(small, world_size=3)
    with pytest.raises(StoreError, match=r"moments.npy holds 3 samples, fewer than the 4 ranks"):
        build_latent_loader(small, 1, rank=0, world_size=4, loader="torch")


def test_non_finite_moments_found_by_deep_validation(tmp_path):
    m = index_coded_moments(6, std=0.1)
    m[4, 5, 1, 1] = -0.1  # a negative std
    root = write_store(tmp_path / "s", m, np.zeros(6), 3)
    for deep in (False, True):  # a store this small is read whole by the cheap check's sample too
        with pytest.raises(StoreError, match=r"moments.npy: sample 4 has non-finite moments or std < 0"):
            validate_store(root, deep=deep)
    m[4, 5, 1, 1], m[2, 0, 0, 0] = 0.1, np.nan
    root = write_store(tmp_path / "f", m, np.zeros(6), 3, layout="files")
    with pytest.raises(StoreError, match=r"img-mean-std-00000002.npy: sample 0 has non-finite"):
        validate_store(root, deep=True)


def test_every_training_start_reads_a_sample_of_the_values(tmp_path, monkeypatch):
    """A NaN store must not train to a NaN model: validation reads VALUE_SAMPLE samples spread over it."""
    from dfm.data import store as store_module

    monkeypatch.setattr(store_module, "VALUE_SAMPLE", 4)  # 4 of 40 samples: indices 0, 13, 26, 39
    m = index_coded_moments(40, std=0.1)
    m[26, 0, 0, 0] = np.inf
    with pytest.raises(StoreError, match=r"sample 26 has non-finite"):
        validate_store(write_store(tmp_path / "a", m, np.zeros(40), 3))
    m[26, 0, 0, 0], m[5, 0, 0, 0] = 0.0, np.nan  # between the sampled ones: only the deep check reads it
    root = write_store(tmp_path / "b", m, np.zeros(40), 3)
    validate_store(root)
    with pytest.raises(StoreError, match=r"sample 5 has non-finite"):
        validate_store(root, deep=True)


def test_bad_files_store_names_the_file(tmp_path):
    root = write_store(tmp_path / "f", index_coded_moments(6), np.arange(6) % 3, 3, layout="files")
    one = root / "00000" / "img-mean-std-00000003.npy"
    one.unlink()
    with pytest.raises(StoreError, match=r"missing latent file .*img-mean-std-00000003.npy \(1 of 6 missing\)"):
        build_latent_loader(root, 2, loader="torch")
    one.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(StoreError, match=r"corrupt latent file .*img-mean-std-00000003.npy"):
        build_latent_loader(root, 6, loader="torch", num_workers=0)  # the sampled value check reads it at start
    with pytest.raises(StoreError, match=r"corrupt latent file .*img-mean-std-00000003.npy"):
        validate_store(root, deep=True)
    np.save(one, np.zeros((8, 4, 5), np.float32))
    with pytest.raises(StoreError, match=r"img-mean-std-00000003.npy has shape \(8, 4, 5\) and dtype float32"):
        validate_store(root, deep=True)
    index = json.loads((root / "dataset.json").read_text())
    index["labels"][1][1] = 7
    (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match=r"labels in .*dataset.json out of range \[0, 3\): sample 1 has label 7"):
        validate_store(root)


def test_seed_layout_without_manifest_is_read(tmp_path):
    # The seed's vae-sd/: dataset.json + per-image .npy, no manifest; data_dir is its parent.
    root = write_store(tmp_path / "data" / "vae-sd", index_coded_moments(6), np.arange(6) % 4, 4, layout="files")
    (root / "manifest.json").unlink()
    store = validate_store(tmp_path / "data")
    assert (store.layout, store.count, store.shape, store.num_classes) == ("files", 6, (8, 4, 4), 4)
    x, y = take(build_latent_loader(tmp_path / "data", 6, loader="torch", num_workers=0), 1)[0]
    assert sorted(decode_indices(x).tolist()) == list(range(6))
