"""Shared fixtures: persistent process worlds (see ``tests/_dist.py``)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests._dist import WorldPool, under_torchrun


@pytest.fixture(scope="session")
def world_pool():
    pool = WorldPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def gloo_world(world_pool):
    """``gloo_world(W)``: a gloo world of W CPU processes, started on first use, kept for the session."""

    def get(world_size: int):
        if under_torchrun():
            pytest.skip("gloo worlds are not spawned under torchrun; there run tests/moe_ops/test_nccl.py")
        return world_pool.get(world_size, "gloo")

    return get


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Tests in this process must leave no default process group behind (fake-pg tests included)."""
    yield
    if dist.is_initialized() and not under_torchrun():
        dist.destroy_process_group()
        pytest.fail("the test left torch.distributed initialized")
