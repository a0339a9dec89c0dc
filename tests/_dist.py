"""Persistent multi-process worlds for distributed tests.

A :class:`World` of W processes is started once (gloo on 127.0.0.1 through a FileStore, NCCL with
one GPU per rank, or "gloo-cuda": gloo with every rank's tensors on GPU 0, which runs the CUDA code
paths at W > 1 on a single GPU; NCCL refuses two ranks on one device) and then runs many cases:
``world.run(fn, *args)`` pickles ``fn`` (a module-level function, sent by reference) and its
arguments to every rank, runs it there, and returns the W return values in rank order. A case that
raises on any rank fails the test with every failing rank's traceback; a case that does not finish
within ``timeout`` seconds fails too, and the world is torn down (the next ``run`` through a
:class:`WorldPool` starts a fresh one).

Under ``torchrun`` the same case bodies run in the launched processes instead
(:class:`TorchrunWorld`): each process runs the case itself, then the outcomes are gathered so that
every rank sees every rank's result or traceback. Case bodies ask :func:`device` where their
tensors go (``cuda:<local rank>`` under NCCL, ``cuda:0`` in a gloo-cuda world, else the CPU).
"""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0
_PG_TIMEOUT = datetime.timedelta(seconds=90)


class WorldError(AssertionError):
    """A case failed on some rank, or the world did not answer in time."""


#: Set in the processes of a "gloo-cuda" world: every rank's tensors on this one GPU.
_shared_gpu: torch.device | None = None


def device() -> torch.device:
    """Where a case's tensors live: this rank's GPU under NCCL, the shared GPU in a "gloo-cuda"
    world, else the CPU."""
    if _shared_gpu is not None:
        return _shared_gpu
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run_case(fn: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    try:
        return True, fn(*args, **kwargs)
    except BaseException:  # noqa: BLE001 - report everything, including pytest's outcomes
        return False, traceback.format_exc()


def _worker(rank: int, world_size: int, backend: str, init_file: str, tasks, results) -> None:
    global _shared_gpu
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if backend == "gloo-cuda":  # W ranks on one GPU: the CUDA code paths at W > 1 without NCCL
        _shared_gpu = torch.device("cuda", 0)
        torch.cuda.set_device(0)
    dist.init_process_group(
        backend.removesuffix("-cuda"),
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=_PG_TIMEOUT,
    )
    results.put(("ready", rank, True, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        ok, value = _run_case(fn, args, kwargs)
        try:
            results.put((task_id, rank, ok, value))
        except Exception:  # an unpicklable return value
            results.put((task_id, rank, False, traceback.format_exc()))


def _format_failures(what: str, failures: dict[int, str]) -> str:
    parts = [f"{what} failed on rank(s) {sorted(failures)}"]
    for rank in sorted(failures):
        parts.append(f"----- rank {rank} -----\n{failures[rank]}")
    return "\n".join(parts)


class World:
    """W spawned processes joined in one process group, running cases on demand."""

    def __init__(self, world_size: int, backend: str = "gloo", start_timeout: float = 180.0):
        self.world_size = world_size
        self.backend = backend
        self._tmpdir = tempfile.mkdtemp(prefix="moe_ops_world_")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world_size,
                    backend,
                    os.path.join(self._tmpdir, "store"),
                    self._tasks[r],
                    self._results,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._next_id = 0
        self.alive = True
        self._collect("ready", "starting the world", start_timeout)

    def _collect(self, task_id, what: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        done: dict[int, tuple[bool, Any]] = {}
        while len(done) < self.world_size:
            try:
                tid, rank, ok, value = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in done]
                if dead or time.monotonic() > deadline:
                    missing = [r for r in range(self.world_size) if r not in done]
                    failures = {r: v for r, (ok_, v) in done.items() if not ok_}
                    self.close()
                    reason = (
                        f"rank(s) {dead} died"
                        if dead
                        else f"rank(s) {missing} did not finish within {timeout:.0f} s (a hang?)"
                    )
                    msg = f"{what} on a {self.backend} world of {self.world_size}: {reason}"
                    if failures:
                        msg += "\n" + _format_failures("meanwhile it", failures)
                    raise WorldError(msg + "; the world was shut down") from None
                continue
            if tid == task_id:
                done[rank] = (ok, value)
        failures = {r: v for r, (ok, v) in done.items() if not ok}
        if failures:
            raise WorldError(_format_failures(what, failures))
        return [done[r][1] for r in range(self.world_size)]

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; returns the return values in rank order."""
        if not self.alive:
            raise WorldError("this world was shut down after an earlier failure")
        self._next_id += 1
        for q in self._tasks:
            q.put((self._next_id, fn, args, kwargs))
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(self._next_id, f"case {name}", timeout)

    def close(self) -> None:
        if self.alive:
            self.alive = False
            for q in self._tasks:
                q.put(None)
            deadline = time.monotonic() + 1
            for p in self._procs:
                p.join(timeout=max(deadline - time.monotonic(), 0.01))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self._tmpdir, ignore_errors=True)


class TorchrunWorld:
    """The world ``torchrun`` launched this process into: cases run here, outcomes are gathered."""

    def __init__(self):
        self.world_size = int(os.environ["WORLD_SIZE"])
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=_PG_TIMEOUT)
        self.backend = dist.get_backend()
        self.alive = True

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list[Any]:
        del timeout  # the process group's own timeout bounds a hang here
        outcome = _run_case(fn, args, kwargs)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, outcome)
        failures = {r: v for r, (ok, v) in enumerate(gathered) if not ok}
        if failures:
            raise WorldError(_format_failures(f"case {fn.__qualname__}", failures))
        return [v for _, v in gathered]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    )


_TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def run_example(root, script: str, argv: list[str], timeout: float = 300) -> str:
    """``examples/<script>`` with ``argv`` in a subprocess that starts its own gloo ranks
    (:func:`example_env`); returns its stdout and stderr, asserting it exited 0."""
    proc = subprocess.run(
        [sys.executable, os.path.join(str(root), "examples", script), *argv],
        capture_output=True,
        text=True,
        cwd=root,
        env=example_env(str(root)),
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    return log


def example_env(root: str) -> dict[str, str]:
    """The environment for running an example script in a subprocess that starts its own gloo
    ranks: this one without torchrun's variables, with ``root`` (the checkout) importable."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


class WorldPool:
    """Worlds started lazily per (size, backend, tag); a world shut down by a failure is
    replaced. ``tag`` keeps worlds of one size and backend apart (processes whose state must not
    meet, e.g. torch's symmetric memory, which takes one backend per process)."""

    def __init__(self):
        self._worlds: dict[tuple, World | TorchrunWorld] = {}

    def get(self, world_size: int, backend: str = "gloo", tag: str = "") -> World | TorchrunWorld:
        if under_torchrun():
            world = self._worlds.get((0, "torchrun"))
            if world is None:
                world = self._worlds[(0, "torchrun")] = TorchrunWorld()
            return world
        key = (world_size, backend, tag)
        world = self._worlds.get(key)
        if world is None or not world.alive:
            world = self._worlds[key] = World(world_size, backend)
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()
