"""Latent store and loaders: sharding, per-epoch shuffling, the posterior draw, exact resumption, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_testing import INDEX_STEP, decode_indices, index_coded_moments

from dfm.data.latents import (
    LATENT_SCALE,
    ShardedStream,
    StoreError,
    TorchLatentLoader,
    batch_seed,
    build_latent_loader,
    open_store,
    sample_posterior,
    use_dali,
    validate_store,
    write_store,
)


def take(loader, n_batches: int):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


@pytest.mark.parametrize("count,world_size,micro,accum", [(23, 1, 4, 1), (23, 2, 4, 1), (23, 3, 2, 2), (24, 4, 3, 1)])
def test_shards_are_disjoint_cover_and_reshuffle(count, world_size, micro, accum):
    streams = [ShardedStream(count, r, world_size, 7, micro, accum) for r in range(world_size)]
    global_batch = micro * world_size * accum
    steps = -(-3 * count // global_batch)  # enough global batches for three epochs
    starts = [s.micro_start(0, k) for s in streams for k in range(steps * accum)]
    positions = np.concatenate([np.arange(p, p + micro) for p in starts])
    assert sorted(positions.tolist()) == list(range(steps * global_batch))  # ranks disjoint, nothing skipped
    s = streams[0]
    for epoch in range(3):  # so every epoch is covered exactly once
        assert sorted(s.indices(epoch * count, count).tolist()) == list(range(count))
    assert not np.array_equal(s.epoch_permutation(0), s.epoch_permutation(1))
    # A read across the epoch boundary joins the two permutations.
    np.testing.assert_array_equal(
        s.indices(count - 3, 5), np.concatenate([s.epoch_permutation(0)[-3:], s.epoch_permutation(1)[:2]])
    )


def test_global_batch_does_not_depend_on_the_rank_split():
    two_ranks = [ShardedStream(23, r, 2, 7, 4, 1) for r in range(2)]
    one_rank_two_micro = ShardedStream(23, 0, 1, 7, 4, 2)
    for step in range(5):
        split = [two_ranks[r].micro_start(0, step) for r in range(2)]
        assert split == [one_rank_two_micro.micro_start(0, 2 * step + j) for j in range(2)]


def test_torch_loader_ranks_read_their_slots(coded_store):
    root = coded_store(count=23)
    got = {}
    for rank in range(2):
        loader = build_latent_loader(
            root, micro_batch=4, rank=rank, world_size=2, seed=5, loader="torch", num_workers=0
        )
        batches = take(loader, 3)  # 3 global batches of 8: epoch 0 (23 samples) and one sample of epoch 1
        for k, (x, y) in enumerate(batches):
            got[loader.stream.micro_start(0, k)] = decode_indices(x)
            np.testing.assert_array_equal(y.numpy(), decode_indices(x) % 5)
        x, y = batches[0]
        assert x.dtype == torch.float32 and x.shape == (4, 4, 4, 4) and y.dtype == torch.int64 and y.shape == (4,)
    stream = ShardedStream(23, 0, 2, 5, 4)
    order = np.concatenate([got[p] for p in sorted(got)])
    np.testing.assert_array_equal(order, stream.indices(0, 24))
    assert sorted(order[:23].tolist()) == list(range(23))


def test_posterior_draw_is_the_seeded_formula(coded_store):
    root = coded_store(count=23, std=0.5)
    store = open_store(root)
    loader = TorchLatentLoader(store, micro_batch=6, rank=1, world_size=2, seed=3, num_workers=0)
    batches = take(loader, 4)
    for b, (x, _) in enumerate(batches):
        start = loader.stream.micro_start(0, b)
        idx = loader.stream.indices(start, 6)
        g = torch.Generator().manual_seed(batch_seed(3, start))
        ref = sample_posterior(torch.from_numpy(store.gather(idx)), LATENT_SCALE, g)
        torch.testing.assert_close(x, ref, rtol=0, atol=0)
    # And the noise is standard normal: n = (x / scale - mean) / std.
    x = torch.cat([x for x, _ in batches]).double()
    idx = decode_indices(x)
    n = (x / LATENT_SCALE - INDEX_STEP * torch.from_numpy(idx).view(-1, 1, 1, 1)) / 0.5
    assert abs(n.mean()) < 4 / n.numel() ** 0.5 and abs(n.std() - 1) < 0.06


def test_workers_and_layouts_give_the_same_stream(coded_store):
    packed = coded_store(count=23, std=0.25)
    files = coded_store(count=23, std=0.25, layout="files", name="files")
    half = coded_store(count=23, std=0.25, dtype=np.float16, name="half")
    ref = take(build_latent_loader(packed, 5, 0, 2, seed=1, loader="torch", num_workers=0), 4)
    for root, workers in ((packed, 2), (files, 0), (half, 0)):
        got = take(build_latent_loader(root, 5, 0, 2, seed=1, loader="torch", num_workers=workers), 4)
        for (x, y), (x_ref, y_ref) in zip(got, ref):
            # fp16 holds 10 * index exactly (< 2048) and 0.25 exactly: the same draw to the last bit.
            torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("cut", [1, 3, 5])  # mid-epoch, just into epoch two (24 > 23), further on
def test_torch_loader_resumes_exactly(coded_store, cut):
    root = coded_store(count=23, std=0.5)
    full = {r: take(build_latent_loader(root, 4, r, 2, seed=9, loader="torch", num_workers=0), 7) for r in range(2)}
    first = build_latent_loader(root, 4, 0, 2, seed=9, loader="torch", num_workers=0)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["samples_seen"] == 8 * cut and divmod(8 * cut, 23) == (state["epoch"], state["position"])
    # At a step boundary the state is the same on every rank: rank 1 resumes from rank 0's.
    for rank in range(2):
        resumed = build_latent_loader(root, 4, rank, 2, seed=9, loader="torch", num_workers=2)
        resumed.load_state_dict(state)
        for (x, y), (x_ref, y_ref) in zip(take(resumed, 7 - cut), full[rank][cut:]):
            torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # noise included
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    # (epoch, position) alone are enough too.
    legacy = build_latent_loader(root, 4, 0, 2, seed=9, loader="torch", num_workers=0)
    legacy.load_state_dict({"epoch": state["epoch"], "position": state["position"]})
    assert legacy.state_dict()["samples_seen"] == state["samples_seen"]


def test_resume_at_another_world_size_continues_the_global_stream(coded_store):
    root = coded_store(count=23, std=0.5)
    ranks = [build_latent_loader(root, 4, r, 2, seed=9, loader="torch", num_workers=0) for r in range(2)]
    for loader in ranks:
        take(loader, 3)
    state = ranks[0].state_dict()
    nxt = [take(loader, 2) for loader in ranks]  # two more steps on two ranks
    alone = build_latent_loader(root, 4, 0, 1, seed=9, loader="torch", num_workers=0, accum_steps=2)
    alone.load_state_dict(state)
    got = take(alone, 4)  # the same two steps as one rank accumulating two micro-batches
    for step in range(2):
        for j in range(2):
            torch.testing.assert_close(got[2 * step + j][0], nxt[j][step][0], rtol=0, atol=0)
    assert alone.state_dict()["samples_seen"] == ranks[0].state_dict()["samples_seen"] == 40


def test_resume_refuses_mid_accumulation_layout_change_or_another_store(coded_store):
    root = coded_store(count=23)
    accumulating = build_latent_loader(root, 4, 0, 1, loader="torch", num_workers=0, accum_steps=2)
    take(accumulating, 3)
    state = accumulating.state_dict()
    assert (state["samples_seen"], state["micro"]) == (8, 1)
    with pytest.raises(ValueError, match="1 micro-batches into an accumulation of global batch 8 on 1 ranks"):
        build_latent_loader(root, 4, 0, 2, loader="torch", num_workers=0).load_state_dict(state)
    same = build_latent_loader(root, 4, 0, 1, loader="torch", num_workers=0, accum_steps=2)
    same.load_state_dict(state)
    assert same.state_dict() == state
    other = coded_store(count=24, name="other")
    with pytest.raises(ValueError, match="count=23"):
        build_latent_loader(other, 4, 0, 2, loader="torch", num_workers=0).load_state_dict(state)


def test_loader_predicate():
    assert use_dali("torch", "cuda") is False
    assert use_dali("auto", "cpu") is False  # the DataLoader is the CPU choice
    with pytest.raises(ValueError, match="'auto', 'dali' or 'torch'"):
        use_dali("fast", "cpu")


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
    validate_store(root)  # the cheap check reads metadata only
    with pytest.raises(StoreError, match=r"moments.npy: sample 4 has non-finite moments or std < 0"):
        validate_store(root, deep=True)
    m[4, 5, 1, 1], m[2, 0, 0, 0] = 0.1, np.nan
    root = write_store(tmp_path / "f", m, np.zeros(6), 3, layout="files")
    with pytest.raises(StoreError, match=r"img-mean-std-00000002.npy: sample 0 has non-finite"):
        validate_store(root, deep=True)


def test_bad_files_store_names_the_file(tmp_path):
    root = write_store(tmp_path / "f", index_coded_moments(6), np.arange(6) % 3, 3, layout="files")
    one = root / "00000" / "img-mean-std-00000003.npy"
    one.unlink()
    with pytest.raises(StoreError, match=r"missing latent file .*img-mean-std-00000003.npy \(1 of 6 missing\)"):
        build_latent_loader(root, 2, loader="torch")
    one.write_bytes(b"\x93NUMPY\x01\x00garbage")
    loader = build_latent_loader(root, 6, loader="torch", num_workers=0)  # the header is read when the batch is
    with pytest.raises(StoreError, match=r"corrupt latent file .*img-mean-std-00000003.npy"):
        take(loader, 1)
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
