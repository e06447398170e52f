"""Intra-op threads per rank: the order of the sources and the rule for a process that is given none."""

from __future__ import annotations

import torch
from dfm.launch.threads import choose_threads, local_world_size, set_threads


def test_explicit_settings_win():
    env = {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}
    assert choose_threads(5, env=env, cores=16) == (5, "train.threads")
    assert choose_threads(None, env=env, cores=16) == (3, "OMP_NUM_THREADS")  # set by torchrun or the user


def test_a_free_choice_leaves_a_core_per_rank():
    assert choose_threads(None, env={}, cores=2)[0] == 1  # the 2-core case measured in dfm/launch/threads.py
    assert choose_threads(None, env={}, cores=16)[0] == 15
    assert choose_threads(None, env={"LOCAL_WORLD_SIZE": "8"}, cores=96)[0] == 11  # torchrun's variable
    assert choose_threads(None, env={"LOCAL_SIZE": "4"}, cores=16)[0] == 3  # the deepspeed launcher's
    assert choose_threads(None, env={"LOCAL_WORLD_SIZE": "8"}, cores=8)[0] == 1  # never below one
    threads, why = choose_threads(None, env={"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "2"}, cores=8)
    assert threads == 3 and why == "8 usable cores / 2 rank(s) on this node, one core each left free"
    assert local_world_size({"LOCAL_WORLD_SIZE": "x"}) == 1


def test_set_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == (1, "train.threads") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
