"""Shared fixtures: persistent process worlds (see ``tests/_dist.py``).

The world fixtures are package-scoped: defined here, at the root of the ``tests`` package, they
live until the last test of ``tests`` and its subpackages has run (pytest >= 8), so each world is
started once per pytest run.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests._dist import WorldPool, under_torchrun


@pytest.fixture(scope="package")
def world_pool():
    pool = WorldPool()
    yield pool
    pool.close()


@pytest.fixture(scope="package")
def gloo_world(world_pool):
    """``gloo_world(W)``: W CPU processes joined by gloo, started on first use, kept for the run."""

    def get(world_size: int):
        if under_torchrun():
            pytest.skip("no gloo worlds under torchrun: run tests/moe_ops/test_nccl.py there")
        return world_pool.get(world_size, "gloo")

    return get


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """Tests in this process must leave no default process group behind (fake-pg tests included)."""
    yield
    if dist.is_initialized() and not under_torchrun():
        dist.destroy_process_group()
        pytest.fail("the test left torch.distributed initialized")


@pytest.fixture(scope="package")
def nccl_world(world_pool):
    """``nccl_world(W)``: W ranks with one GPU each, joined by NCCL; ``nccl_world(W, tag)``:
    processes of their own for the tag (``"nvshmem"``: torch's symmetric memory takes one
    backend per process, and the ``"p2p"`` transport uses CUDA's).

    Under ``torchrun`` this is the launched world (tests for another W skip); otherwise W
    processes are spawned. Skips, saying why, when there are fewer than W GPUs.
    """

    def get(world_size: int, tag: str = ""):
        if under_torchrun():
            if tag:
                pytest.skip(f"needs processes of its own ({tag!r}): not under torchrun")
            launched = int(os.environ["WORLD_SIZE"])
            if launched != world_size:
                pytest.skip(f"torchrun launched {launched} rank(s); this test needs {world_size}")
            world = world_pool.get(world_size)
            if world.backend != "nccl":
                pytest.skip(f"torchrun world uses {world.backend}, not NCCL (no CUDA here)")
            return world
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < world_size:
            pytest.skip(f"needs {world_size} CUDA GPU(s) for an NCCL world, found {found}")
        return world_pool.get(world_size, "nccl", tag)

    return get


@pytest.fixture(scope="package")
def shared_gpu_world(world_pool):
    """``shared_gpu_world(W)``: W processes joined by gloo, all with their tensors on GPU 0.

    Runs the CUDA code paths of W > 1 (Triton kernels, side streams, pinned copies) on a machine
    with one GPU, where NCCL cannot put two ranks; the bytes travel through gloo (host memory),
    so this is for correctness, not speed. Skips without CUDA or under torchrun.
    """

    def get(world_size: int):
        if under_torchrun():
            pytest.skip("spawns its own processes: not under torchrun")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (gloo with CUDA tensors)")
        return world_pool.get(world_size, "gloo-cuda")

    return get
