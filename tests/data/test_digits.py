"""The embedded digits and the in-memory loader: real data, exact sharding and exact resume."""

import torch

from dfm.data.digits import InMemoryLoader, load_digits_tensor
from dfm.data.stream import ShardedStream


def test_digits_are_real_and_scaled():
    x, y = load_digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background is -1
    assert set(y.tolist()) == set(range(10))
    x8, _ = load_digits_tensor(8)
    assert torch.equal(torch.unique(((x8 + 1) / 2 * 16).round()), torch.arange(17.0))  # the raw 0..16 levels


def _epoch_indices(loader, n_batches):
    it = iter(loader)
    return torch.cat([next(it)[1] for _ in range(n_batches)])


def test_ranks_are_disjoint_and_cover():
    x = torch.arange(100.0).view(100, 1, 1, 1)
    y = torch.arange(100)
    seen = []
    for rank in range(2):
        loader = InMemoryLoader(x, y, micro_batch=10, rank=rank, world_size=2, seed=3)
        seen.append(_epoch_indices(loader, 5))
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert sorted(torch.cat(seen).tolist()) == list(range(100))


def test_epochs_reshuffle_and_resume_exactly():
    x = torch.arange(40.0).view(40, 1, 1, 1)
    y = torch.arange(40)
    loader = InMemoryLoader(x, y, micro_batch=8, seed=1)
    it = iter(loader)
    first = [next(it)[1] for _ in range(7)]  # crosses into epoch 1 (5 batches per epoch)
    assert sorted(torch.cat(first[:5]).tolist()) == list(range(40))
    assert not torch.equal(torch.cat(first[:5])[:10], torch.cat(first[5:7])[:10])
    resumed = InMemoryLoader(x, y, micro_batch=8, seed=1)
    fresh = InMemoryLoader(x, y, micro_batch=8, seed=1)
    it_f = iter(fresh)
    for _ in range(3):
        next(it_f)
    resumed.load_state_dict(fresh.state_dict())
    assert torch.equal(next(iter(resumed))[1], next(it_f)[1])


def test_every_item_of_an_uneven_epoch_is_seen_in_the_shared_stream_order():
    # 103 items in global batches of 8: nothing is dropped, the 13th global batch straddles two epochs.
    x = torch.arange(103.0).view(103, 1, 1, 1)
    y = torch.arange(103)
    ranks = [InMemoryLoader(x, y, micro_batch=4, rank=r, world_size=2, seed=5) for r in range(2)]
    per_rank = [_epoch_indices(loader, 13) for loader in ranks]
    by_step = torch.stack([b.view(13, 4) for b in per_rank], 1).flatten()  # global order: step, then rank slot
    assert sorted(by_step[:103].tolist()) == list(range(103))  # the whole epoch, each item once
    stream = ShardedStream(103, 0, 2, 5, 4)
    assert by_step.tolist() == stream.indices(0, 104).tolist()  # the latent loaders' order, item for item
    assert [loader.state_dict()["samples_seen"] for loader in ranks] == [104, 104]
    assert ranks[0].state_dict() == ranks[1].state_dict()  # at a step boundary: the same on every rank
