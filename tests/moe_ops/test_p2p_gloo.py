"""The ``"p2p"`` transport's protocol on the CPU: which buffer each exchange writes, when it
waits, which chunk of which peer it reads, through dispatch, combine and both backwards.

CUDA symmetric memory does not exist on the CPU, so here each rank's "symmetric buffer" is a
file mapped into every rank's memory (``torch.from_file(shared=True)``: a write by one rank is
seen by all, like a peer's GPU buffer over NVLink) and the device-side barrier is a gloo
barrier. Everything above ``moe_ops._comm._p2p_buffer`` runs as on GPUs (the plain torch
``pull_chunks``; the Triton one and the real symmetric memory are checked against NCCL in
``test_p2p.py``, marked ``gpu``). A chunk read from the wrong rank or row, or an exchange that
still goes through ``all_to_all``, shows here as a wrong result against the reference or a
counted collective; the barriers per op call are counted. Races (a buffer overwritten before a
peer read it) need the device: here every op is synchronous and shows one only by chance
(``test_p2p.py::test_back_to_back_calls`` holds a rank back between its barrier and its read).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import moe_ops
from moe_ops import _api, _comm
from tests.moe_ops._cases import Spec, exact_capacity, fixed_case, rank_and_world

f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64


class _FileHandle:
    """What ``_comm`` uses of torch's ``_SymmetricMemory``: a barrier (here gloo's)."""

    def __init__(self):
        self.barriers = 0

    def barrier(self, channel: int = 0) -> None:
        self.barriers += 1
        dist.barrier()


@contextlib.contextmanager
def emulated_p2p(directory: str):
    """``transport="p2p"`` on CPU tensors: buffers in shared files under ``directory`` (one per
    rank and key), barriers over gloo. Yields the list of NCCL/gloo all_to_all calls made."""
    rank, W = rank_and_world()
    handle = _FileHandle()
    cache: dict = {}

    def file_buffer(key):
        if key not in cache:
            _, _, shape, dtype, _, _ = key
            numel = 1
            for n in shape:
                numel *= n
            name = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
            paths = [os.path.join(directory, f"{name}-{r}") for r in range(W)]
            with open(paths[rank], "wb") as f:
                f.truncate(max(numel, 1) * dtype.itemsize)
            dist.barrier()  # every rank's file exists (the rendezvous)

            def mapped(p):
                return torch.from_file(p, shared=True, size=max(numel, 1), dtype=dtype)

            peers = [mapped(p)[:numel].view(shape) for p in paths]
            cache[key] = _comm._P2PBuffer(peers[rank], handle, peers, torch.zeros(W))
        return cache[key]

    real_transport = _api._transport

    def transport(x, world_size, transport=None, group_name=""):
        if transport == "p2p":
            return "p2p"
        return real_transport(x, world_size, transport, group_name)

    calls = []
    real_a2a = _comm.all_to_all

    def counted_a2a(*args, **kwargs):
        calls.append(1)
        return real_a2a(*args, **kwargs)

    with (
        mock.patch.object(_comm, "_p2p_buffer", file_buffer),
        mock.patch.object(_api, "_transport", transport),
        mock.patch.object(_comm, "all_to_all", counted_a2a),
    ):
        yield calls, handle


def p2p_case(directory: str, spec: Spec, capacity, drop: bool, sum_per_rank: bool) -> int:
    with emulated_p2p(directory) as (calls, handle):
        dropped = fixed_case(spec, capacity, drop, "p2p", sum_per_rank)
        assert calls == [], "an exchange went through all_to_all"
        assert handle.barriers > 0
    return dropped


SPECS = {
    "k2-f32": Spec(T=(7,), K=2, dtype=f32),
    "k4-f64-Hp7": Spec(T=(6, 6), K=4, dtype=f64, Hp=7, seed=2),
    "to_rank0-bf16": Spec(T=(5, 5), K=2, routing="to_rank0", dtype=bf16, seed=3),
    "skewed-El3-noweights": Spec(T=(8, 8), K=3, E_l=3, routing="skewed", weights=False, seed=4),
    "T0": Spec(T=(0,), K=2),  # exchanges of no rows: still one barrier each
}


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference_gloo(gloo_world, tmp_path, W, name, sum_per_rank):
    """Forward and gradients against the reference, as the padded transport is checked."""
    spec = SPECS[name]
    for capacity in ("worst-case", exact_capacity(spec, W)):
        dropped = gloo_world(W).run(p2p_case, str(tmp_path), spec, capacity, False, sum_per_rank)
        assert dropped == [0] * W


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_drop_gloo(gloo_world, tmp_path, sum_per_rank):
    spec = Spec(T=(12, 12), K=4, E_l=2, dtype=f32, seed=5)
    capacity = exact_capacity(spec, 2) - 6
    dropped = gloo_world(2).run(p2p_case, str(tmp_path), spec, capacity, True, sum_per_rank)
    assert sum(dropped) >= 6


def barriers_case(directory: str) -> list[int]:
    """Barriers per op call: one before the first exchange's writes, one per exchange."""
    r, W = rank_and_world()
    E, T, K, H = 2 * W, 6, 3, 4
    g = torch.Generator().manual_seed(r)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    idx = torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g, requires_grad=True)
    counts = []
    with emulated_p2p(directory) as (_, handle):
        for sum_per_rank in (False, True):
            before = handle.barriers
            recv_x, h = moe_ops.dispatch(
                x, idx, E, capacity="worst-case", transport="p2p", sum_per_rank=sum_per_rank
            )
            counts.append(handle.barriers - before)
            before = handle.barriers
            out = moe_ops.combine(recv_x, h, w)
            counts.append(handle.barriers - before)
            before = handle.barriers
            out.sum().backward()
            counts.append(handle.barriers - before)
    return counts


def test_barriers_per_call_gloo(gloo_world, tmp_path):
    """One barrier per exchange, and one more before an op call that makes a single exchange
    (``moe_ops._comm.EqualChunks``). Slot order: dispatch = counts + rows (2 barriers), combine
    = rows back (1 + 1), backward = combine's backward (rows, 1 + 1) + dispatch's backward (a
    combine, 1 + 1). Summing per rank: dispatch 2; combine = weights + sums back (2); backward =
    gradient rows + weight gradient (2) and dispatch's backward (an unweighted combine: no
    weights travel, sums back, 1 + 1)."""
    for counts in gloo_world(2).run(barriers_case, str(tmp_path)):
        assert counts == [2, 2, 4, 2, 2, 4]


def test_rejected_at_one_rank():
    """p2p is a W > 1 transport (CPU tensors are refused too: ``test_config.py``)."""
    x, idx = torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="transport must be None or one of"):
        moe_ops.dispatch(x, idx, 2, capacity=4, transport="p2p")


# ----------------------------------------------------------------------------- through the backend
def backend_case(directory: str, make) -> int:
    """A sharded EP block compiled with ``backend="moe"``, ``capacity="worst-case"``,
    ``transport="p2p"``, against the single-device block (``ep_equal``), every exchange through
    the emulated buffers."""
    from tests.fx_passes._harness import ep_equal

    with emulated_p2p(directory) as (calls, handle):
        ep_equal(
            make,
            torch.bfloat16,
            8,
            shard="experts",
            capacity="worst-case",
            sum_per_rank=True,
            transport="p2p",
        )
        assert calls == [], "an exchange went through all_to_all"
        return handle.barriers


def test_backend_transport_gloo(gloo_world, tmp_path):
    from functools import partial

    from tests.fx_passes import _loop_models as M

    make = partial(M.Stack, 1, variant="onehot_where", num_experts=8, top_k=2)
    assert all(n > 0 for n in gloo_world(2).run(backend_case, str(tmp_path), make))


def test_backend_checks_the_transport():
    import fx_passes

    with pytest.raises(ValueError, match="transport is a capacity-mode option"):
        fx_passes.moe_backend(transport="p2p")
    with pytest.raises(ValueError, match=r"transport must be None or one of"):
        fx_passes.moe_backend(capacity="worst-case", transport="nccl")
    backend = fx_passes.moe_backend(capacity="worst-case", transport="p2p")
    assert callable(backend)


def test_a_call_must_make_the_exchanges_it_declared():
    """The overwrite rule counts on every call of an op making the exchanges it declares: an op
    that made fewer (or more, see ``EqualChunks._arrive``) raises instead of racing later."""
    from moe_ops import _comm

    chunks = _comm.EqualChunks(None, "", "padded", "some_op", 2)
    with pytest.raises(RuntimeError, match="some_op made 0 exchanges, not the 2 it declared"):
        chunks.done(None)
    assert _comm.EqualChunks(None, "", "nvshmem", "op", 2).done("r") == "r"  # not counted


def in_place_case(directory: str) -> list[list[tuple[str, bool]]]:
    """Per forward op call, each exchange's op and whether its rows were written straight into
    the symmetric buffer (else ``exchange`` copies them in: a payload copy more)."""
    r, W = rank_and_world()
    E, T, K, H = 2 * W, 6, 3, 4
    g = torch.Generator().manual_seed(r)
    x, idx = torch.randn(T, H, generator=g), torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    seen = []
    real = _comm.EqualChunks._arrive

    def watched(self, send):
        buf = self._pending
        seen.append((self.op, buf is not None and send.data_ptr() == buf.local.data_ptr()))
        return real(self, send)

    out = []
    with emulated_p2p(directory), mock.patch.object(_comm.EqualChunks, "_arrive", watched):
        for sum_per_rank in (False, True):
            recv_x, h = moe_ops.dispatch(
                x, idx, E, capacity="worst-case", transport="p2p", sum_per_rank=sum_per_rank
            )
            moe_ops.combine(recv_x, h, w)
            out.append(list(seen))
            seen.clear()
    return out


def test_forward_rows_written_in_place_gloo(gloo_world, tmp_path):
    """Slot order: dispatch's counts and rows, combine's rows back; summing per rank: dispatch's
    counts and token rows, combine's weights and partial sums: all written in place."""
    slot_order = [("dispatch", True)] * 2 + [("combine", True)]
    per_rank = [("dispatch", True)] * 2 + [("combine", True)] * 2
    for got in gloo_world(2).run(in_place_case, str(tmp_path)):
        assert got == [slot_order, per_rank]


def unread_case() -> list[str]:
    """An ``exchange_sum`` whose rows are not summed before the next exchange, or before the
    call ends, raises (the overwrite rule counts on each exchange's reads coming before the next
    barrier); summed in time, it equals the exchange followed by the combine."""
    from moe_ops import _comm, _kernels

    r, W = rank_and_world()
    group = dist.group.WORLD
    send = torch.arange(W * 3 * 4, dtype=f32).view(W * 3, 4) + 100 * r
    pos = torch.tensor([[0, 3 * (W - 1) + 2], [-1, 3], [1, -1]])[:, :W]
    said = []
    for step in ("next exchange", "done"):
        exchanges = 2 if step == "next exchange" else 1
        chunks = _comm.EqualChunks(group, group.group_name, "padded", "op", exchanges)
        chunks.exchange_sum(send)
        try:
            chunks.exchange(send) if step == "next exchange" else chunks.done(None)
        except RuntimeError as e:
            said.append(str(e))
    chunks = _comm.EqualChunks(group, group.group_name, "padded", "op", 1)
    got = chunks.exchange_sum(send)(pos)
    chunks.done(None)
    want = _kernels.for_device(send.device).combine_rows(
        _comm.EqualChunks(group, group.group_name, "padded", "x", 1).exchange(send), pos, None, f32
    )
    assert torch.equal(got, want)
    return said


def test_exchange_sum_rows_read_in_time_gloo(gloo_world):
    for said in gloo_world(2).run(unread_case):
        assert said == ["moe_ops: op left an exchange_sum's rows unread"] * 2
