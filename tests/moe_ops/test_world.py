"""The harness itself: a failing rank fails the test with its traceback; a hang fails it too."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests._dist import WorldError, WorldPool


def _fail_on_rank_1(message):
    if dist.get_rank() == 1:
        raise ValueError(message)
    return dist.get_rank()


def _sum_of_ranks():
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return int(t)


def _sleep(seconds):
    time.sleep(seconds)


def test_worker_failure_carries_its_traceback(gloo_world):
    world = gloo_world(2)
    with pytest.raises(WorldError) as info:
        world.run(_fail_on_rank_1, "wrong on purpose")
    msg = str(info.value)
    assert "failed on rank(s) [1]" in msg and "----- rank 1 -----" in msg
    assert "ValueError: wrong on purpose" in msg and "in _fail_on_rank_1" in msg
    assert world.run(_sum_of_ranks) == [1, 1]  # the world still works


def test_hang_becomes_a_failure_and_the_pool_restarts():
    pool = WorldPool()
    try:
        world = pool.get(1)
        start = time.monotonic()
        with pytest.raises(WorldError, match=r"rank\(s\) \[0\] did not finish within 2 s"):
            world.run(_sleep, 600, timeout=2)
        assert time.monotonic() - start < 30
        assert not world.alive and not any(p.is_alive() for p in world._procs)
        with pytest.raises(WorldError, match="shut down"):
            world.run(_sum_of_ranks)
        fresh = pool.get(1)
        assert fresh is not world and fresh.run(_sum_of_ranks) == [0]
    finally:
        pool.close()
