"""The shared sample stream: sharding, per-epoch shuffling, the resumable position and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from dfm.data.stream import ShardedStream, StreamReader


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


def test_reader_state_counts_completed_steps_and_resumes_the_position():
    reader = StreamReader(ShardedStream(23, 1, 2, 9, 4, accum_steps=2))
    reader.k = 6  # rank 1 handed out three steps of two micro-batches
    state = reader.state_dict()
    assert (state["samples_seen"], state["micro"], state["epoch"], state["position"]) == (48, 0, 2, 2)
    resumed = StreamReader(ShardedStream(23, 0, 4, 9, 4, accum_steps=1))  # another layout of the same 16
    resumed.load_state_dict(state)
    assert (resumed.offset, resumed.k) == (48, 0) and next(resumed.starts()) == 48
    legacy = StreamReader(ShardedStream(23, 0, 1, 9, 4))  # (epoch, position) alone are enough too
    legacy.load_state_dict({"epoch": 2, "position": 2})
    assert legacy.state_dict()["samples_seen"] == 48
    with pytest.raises(ValueError, match="names no stream position"):
        legacy.load_state_dict({"epoch": 0, "batch": 3, "micro": 0})


def test_resume_refuses_mid_accumulation_layout_change_or_another_data_set():
    accumulating = StreamReader(ShardedStream(23, 0, 1, 0, 4, accum_steps=2))
    accumulating.k = 3  # one step and one micro-batch into the next
    state = accumulating.state_dict()
    assert (state["samples_seen"], state["micro"]) == (8, 1)
    with pytest.raises(ValueError, match="1 micro-batches into an accumulation of global batch 8 on 1 ranks"):
        StreamReader(ShardedStream(23, 0, 2, 0, 4)).load_state_dict(state)
    same = StreamReader(ShardedStream(23, 0, 1, 0, 4, accum_steps=2))
    same.load_state_dict(state)
    assert same.state_dict() == state
    with pytest.raises(ValueError, match="count=23"):
        StreamReader(ShardedStream(24, 0, 2, 0, 4)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        StreamReader(ShardedStream(23, 0, 1, 1, 4, accum_steps=2)).load_state_dict(state)


def test_stream_rejects_bad_layouts():
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        ShardedStream(23, 2, 2, 0, 4)
    with pytest.raises(ValueError, match="must be positive"):
        ShardedStream(23, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="3 samples cannot give each of 4 ranks a non-empty shard"):
        ShardedStream(3, 0, 4, 0, 1)
