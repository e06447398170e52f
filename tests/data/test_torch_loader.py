"""The PyTorch DataLoader loader over a latent store: ranks' slots, the posterior draw, exact resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_testing import INDEX_STEP, decode_indices

from dfm.data import build_latent_loader
from dfm.data.store import LATENT_SCALE, open_store
from dfm.data.stream import ShardedStream, batch_seed, sample_posterior
from dfm.data.torch_loader import TorchLatentLoader


def take(loader, n_batches: int):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


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
    loader = TorchLatentLoader(store, ShardedStream(store.count, rank=1, world_size=2, seed=3, micro_batch=6), 0)
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


def test_stream_must_be_over_the_store(coded_store):
    store = open_store(coded_store(count=23))
    with pytest.raises(ValueError, match="a stream over 24 samples cannot read the 23"):
        TorchLatentLoader(store, ShardedStream(24, 0, 1, 0, 4))
