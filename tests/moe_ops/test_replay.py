"""Dispatch's work before its count read, replayed from a CUDA graph (``moe_ops._replay``): the
second call of a shape captures it, later calls replay it. Replayed calls give what eager calls
give, bit for bit (forward and gradients, W = 1, 2, 4, both ways of sending rows, sums per rank,
rounds); the layouts of earlier calls survive the replays of later ones; bad ids still raise on
every rank; one host sync per dispatch; a bounded number of graphs. On the CPU nothing is
captured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from unittest import mock

import pytest
import torch
import torch.utils._pytree as pytree

import moe_ops
from moe_ops import _autograd, _comm, _replay
from tests._dist import device
from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec, make_inputs, rank_and_world

bf16 = torch.bfloat16
SPECS = {
    "k2": Spec(T=(9, 6, 7, 5), K=2, E_l=2, H=8, Hp=8, dtype=bf16, seed=1),
    "k4-more-slots-than-ranks": Spec(T=(12, 1, 7, 0), K=4, E_l=3, H=16, Hp=16, dtype=bf16, seed=2),
}
CALLS = 4  # eager, capture, two replays


def _run(spec: Spec, sum_per_rank: bool = False) -> list[list[torch.Tensor]]:
    """CALLS rounds of one shape with new routing each: every dispatch first, then every combine
    (so that each combine reads its layout after the later dispatches ran), then the gradients."""
    r, W = rank_and_world()
    dev = device()
    rounds = []
    for i in range(CALLS):
        inp = make_inputs(dataclasses.replace(spec, seed=spec.seed * 100 + i), W)
        x = inp.xs[r].to(dev).requires_grad_(True)
        w = inp.ws[r].to(dev).requires_grad_(True)
        recv_x, handle = moe_ops.dispatch(
            x, inp.idxs[r].to(dev), inp.num_experts, sum_per_rank=sum_per_rank
        )
        rounds.append((x, w, recv_x, handle))
    results = []
    for i, (x, w, recv_x, handle) in enumerate(rounds):
        out = moe_ops.combine(recv_x * 2 + 1, handle, w)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(i)).to(out)
        gx, gw = torch.autograd.grad(out, (x, w), g)
        layout = [t.cpu() for t in handle.layout]
        results.append([recv_x.detach().cpu(), out.detach().cpu(), gx.cpu(), gw.cpu(), *layout])
    return results


def replay_matches_eager(spec: Spec, sum_per_rank: bool = False) -> int:
    _replay.clear()
    with _replay.eager_only():
        eager = _run(spec, sum_per_rank)
    assert _replay.cached() == 0
    replayed = _run(spec, sum_per_rank)
    for i, (a, b) in enumerate(zip(eager, replayed, strict=True)):
        for j, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), f"call {i}, output {j}"
    return _replay.cached()


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("name", list(SPECS))
def test_replay_matches_eager(nccl_world, W, name):
    for graphs in nccl_world(W).run(replay_matches_eager, SPECS[name]):
        assert graphs == 1  # one shape: one graph (dispatch's backward is a combine)


@pytest.mark.gpu
def test_replay_matches_eager_summing_per_rank(nccl_world):
    for graphs in nccl_world(2).run(replay_matches_eager, SPECS["k4-more-slots-than-ranks"], True):
        assert graphs == 1


def replay_in_rounds() -> None:
    """Slot-order rounds (``low_memory``): the round columns and pairs per round come from the
    graph too; the same bits as eager."""
    r, W = rank_and_world()
    spec = Spec(T=(40,), K=2, E_l=2, H=8, Hp=8, dtype=bf16, seed=5)
    with _cases.forced_pair_rounds(3):
        outs = []
        for eager in (True, False):
            _replay.clear()
            got = []
            for i in range(CALLS):
                inp = make_inputs(dataclasses.replace(spec, seed=50 + i), W)
                x, idx = inp.xs[r].to(device()), inp.idxs[r].to(device())
                with _replay.eager_only() if eager else contextlib.nullcontext():
                    recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts, low_memory=True)
                    out = moe_ops.combine(recv_x * 2, handle, inp.ws[r].to(device()))
                assert handle.layout.round_rows.shape[0] > 0  # it ran in rounds
                got.append([out.cpu(), *(t.cpu() for t in handle.layout)])
            assert _replay.cached() == (0 if eager else 1)
            outs.append(got)
    for a, b in zip(*outs, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


@pytest.mark.gpu
def test_replay_in_rounds(nccl_world):
    nccl_world(2).run(replay_in_rounds)


def bad_ids_when_replayed(bad_rank: int) -> list[str]:
    """Bad ids on one rank in the calls that capture and replay: every rank raises each time."""
    _replay.clear()
    names = [_cases.one_bad_rank_dispatch(bad_rank, "id_too_big") for _ in range(CALLS)]
    assert _replay.cached() == 1  # the bad calls and the good ones after them share a shape
    return names


@pytest.mark.gpu
def test_bad_ids_when_replayed(nccl_world):
    names = nccl_world(2).run(bad_ids_when_replayed, 1)
    assert names == [["PeerInputError"] * CALLS, ["ValueError"] * CALLS]


def one_sync_per_replayed_dispatch() -> list[int]:
    r, W = rank_and_world()
    spec = SPECS["k2"]
    syncs = []
    _replay.clear()
    for i in range(CALLS):
        inp = make_inputs(dataclasses.replace(spec, seed=70 + i), W)
        x, idx = inp.xs[r].to(device()), inp.idxs[r].to(device())
        call = functools.partial(moe_ops.dispatch, x, idx, inp.num_experts)
        _, where = _cases.cuda_syncs(call)
        syncs.append(len(where))
    assert _replay.cached() == 1
    return syncs


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 2])
def test_one_sync_per_replayed_dispatch(nccl_world, W):
    for syncs in nccl_world(W).run(one_sync_per_replayed_dispatch):
        assert syncs == [1] * CALLS


def graphs_bounded() -> int:
    """Shapes seen twice each, more of them than graphs are kept: the oldest go."""
    _replay.clear()
    dev = device()
    for T in range(1, _replay.MAX_GRAPHS + 4):
        idx = torch.randint(0, 4, (T, 2), device=dev)
        for _ in range(2):
            moe_ops.dispatch(torch.randn(T, 8, device=dev), idx, 4)
    return _replay.cached()


@pytest.mark.gpu
def test_graphs_bounded(nccl_world):
    for graphs in nccl_world(1).run(graphs_bounded):
        assert 0 < graphs <= _replay.MAX_GRAPHS


def test_nothing_captured_on_the_cpu():
    _replay.clear()
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]])
    for _ in range(CALLS):
        recv_x, handle = moe_ops.dispatch(torch.randn(3, 4), idx, 2)
        assert torch.equal(handle.tokens_per_expert, torch.tensor([3, 2]))
    assert _replay.cached() == 0
    assert not _replay._graphs  # not even remembered


def test_run_outside_cuda_is_the_function():
    calls = []

    def fn(t):
        calls.append(t)
        return t + 1

    t = torch.arange(3)
    for _ in range(3):
        out, copies = _replay.run(fn, ("k",), t, outlive=lambda out: [out])
        assert torch.equal(out, t + 1) and copies is None
    assert len(calls) == 3


@contextlib.contextmanager
def _replays_emulated():
    """The CUDA path on the CPU: ``_replay.run`` runs a key eagerly once, keeps the outputs of
    its second call as its "static" tensors and copies the results of later calls into them
    (what a replay does), and the count
    read calls its ``meanwhile`` as on CUDA. A copy-out that is missing shows as an earlier
    call's layout overwritten by a later one."""
    static: dict = {}  # key -> None (seen once: eager) or the outputs of its "graph"

    def run(fn, key, *inputs, outlive=lambda out: []):
        out = fn(*inputs)
        if key not in static:
            static[key] = None
            return out, None
        if static[key] is None:  # the capture
            static[key] = out
        else:
            for kept, new in zip(*(pytree.tree_leaves(o) for o in (static[key], out)), strict=True):
                if kept is not None:
                    kept.copy_(new)
        return static[key], _replay.copies_of(outlive(static[key]))

    def read_to_host(t, meanwhile=None):  # what it does on CUDA
        return t.clone(), None if meanwhile is None else meanwhile()

    with (
        mock.patch.object(_replay, "run", run),
        mock.patch.object(_comm, "read_to_host", read_to_host),
    ):
        yield static


def emulated_replays_match_eager(spec: Spec, sum_per_rank: bool = False) -> int:
    """Directly and through the registered ops (a custom op's outputs may not share memory:
    the copies must be tensors of their own)."""
    eager = _run(spec, sum_per_rank)
    with _replays_emulated() as static:
        replayed = _run(spec, sum_per_rank)
    with (
        _replays_emulated(),
        mock.patch.object(_autograd, "_direct_ok", return_value=False),
    ):
        via_ops = _run(spec, sum_per_rank)
    for i, (a, b) in enumerate(zip(eager, via_ops, strict=True)):
        for j, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), f"through the ops: call {i}, output {j}"
    for i, (a, b) in enumerate(zip(eager, replayed, strict=True)):
        for j, (u, v) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(u, v), f"call {i}, output {j}"
    return len(static)


@pytest.mark.parametrize("W", [1, 2])
@pytest.mark.parametrize("name", list(SPECS))
def test_emulated_replays_match_eager(gloo_world, W, name):
    if W == 1:
        assert emulated_replays_match_eager(SPECS[name]) == 1
        return
    assert gloo_world(W).run(emulated_replays_match_eager, SPECS[name]) == [1] * W


def test_emulated_replays_match_eager_summing_per_rank(gloo_world):
    spec = SPECS["k4-more-slots-than-ranks"]
    assert gloo_world(2).run(emulated_replays_match_eager, spec, True) == [1, 1]
