"""Bad input: the exception type and the values in its message (argument, expected, got).

Single-rank checks run in this process. At W = 2 and 3 only one rank passes bad input: every rank
must raise ValueError (the bad rank names its argument, its peers raise ``PeerInputError`` naming
the bad rank), none may hang or see a broken connection, and the group must work afterwards.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_ops
from tests.moe_ops import _cases
from tests.moe_ops._cases import rank_and_world


def _inputs():
    inp, _ = _cases._good(1)
    return inp.xs[0], inp.idxs[0], inp.ws[0], inp.num_experts


@pytest.mark.parametrize("kind", _cases.DISPATCH_BAD_KINDS)
def test_dispatch_bad_input_single_rank(kind):
    x, idx, _, E = _inputs()
    x, idx, exc_type, fragments = _cases._bad_dispatch_input(kind, x, idx, E)
    with pytest.raises(exc_type) as info:
        moe_ops.dispatch(x, idx, E)
    _cases._check_message(info.value, fragments)


@pytest.mark.parametrize("kind", _cases.COMBINE_BAD_KINDS)
def test_combine_bad_input_single_rank(kind):
    x, idx, w, E = _inputs()
    recv_x, handle = moe_ops.dispatch(x, idx, E)
    eo, w, exc_type, fragments = _cases._bad_combine_input(kind, recv_x, w)
    with pytest.raises(exc_type) as info:
        moe_ops.combine(eo, handle, w)
    _cases._check_message(info.value, fragments)


@pytest.mark.parametrize(
    "num_experts, exc_type, fragments",
    [
        (0, ValueError, ["num_experts", "positive multiple", "got 0"]),
        (-4, ValueError, ["num_experts", "got -4"]),
        (4.0, TypeError, ["num_experts", "int", "got float"]),
        (True, TypeError, ["num_experts", "int", "got bool"]),
    ],
)
def test_dispatch_bad_num_experts(num_experts, exc_type, fragments):
    x, idx, _, _ = _inputs()
    with pytest.raises(exc_type) as info:
        moe_ops.dispatch(x, idx, num_experts)
    _cases._check_message(info.value, fragments)


@pytest.mark.parametrize(
    "call, exc_type, fragments",
    [
        ("handle_tuple", TypeError, ["handle", "DispatchHandle", "got tuple"]),
        ("handle_tensor", TypeError, ["handle", "DispatchHandle", "got Tensor"]),
        ("group_str", TypeError, ["group", "ProcessGroup or None", "got str"]),
        ("x_list", TypeError, ["x", "Tensor"]),
        ("eo_1d", ValueError, ["expert_out", "2-D [R, H']", "(3,)"]),
    ],
)
def test_api_argument_types(call, exc_type, fragments):
    x, idx, w, E = _inputs()
    recv_x, handle = moe_ops.dispatch(x, idx, E)
    calls = {
        "handle_tuple": lambda: moe_ops.combine(recv_x, tuple(dataclasses.astuple(handle)), w),
        "handle_tensor": lambda: moe_ops.combine(recv_x, handle.tokens_per_expert, w),
        "group_str": lambda: moe_ops.dispatch(x, idx, E, group="world"),
        "x_list": lambda: moe_ops.dispatch(x.tolist(), idx, E),
        "eo_1d": lambda: moe_ops.combine(torch.zeros(3), handle, w),
    }
    with pytest.raises(exc_type) as info:
        calls[call]()
    _cases._check_message(info.value, fragments)


def test_bad_ids_report_values_not_slots():
    """The message shows the offending values themselves, at most four of them."""
    x, idx, _, E = _inputs()
    idx = idx.clone()
    idx.view(-1)[:6] = torch.tensor([9, -5, 100, 8, 77, 1])
    with pytest.raises(ValueError) as info:
        moe_ops.dispatch(x, idx, E)
    _cases._check_message(info.value, ["got 5 out-of-range value(s)", "[9, -5, 100, 8]"])


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("kind", _cases.DISPATCH_BAD_KINDS)
def test_dispatch_one_bad_rank(gloo_world, W, kind):
    bad_rank = W - 1
    raised = gloo_world(W).run(_cases.one_bad_rank_dispatch, bad_rank, kind, timeout=60)
    assert all(name == "PeerInputError" for r, name in enumerate(raised) if r != bad_rank)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("kind", _cases.COMBINE_BAD_KINDS)
def test_combine_one_bad_rank(gloo_world, W, kind):
    bad_rank = 0
    raised = gloo_world(W).run(_cases.one_bad_rank_combine, bad_rank, kind, timeout=60)
    assert all(name == "PeerInputError" for r, name in enumerate(raised) if r != bad_rank)


@pytest.mark.parametrize("W", [2, 3])
def test_handle_from_other_group(gloo_world, W):
    gloo_world(W).run(_cases.handle_from_other_group, timeout=60)


@pytest.mark.parametrize("W, forged", [(2, 3), (3, 2)])
def test_handle_from_other_world(gloo_world, W, forged):
    gloo_world(W).run(_cases.handle_from_other_world, forged, timeout=60)


def _dispatch_with_k(K_by_rank: list[int]) -> str:
    r, W = rank_and_world()
    g = torch.Generator().manual_seed(r)
    K = K_by_rank[r]
    idx = torch.stack([torch.randperm(2 * W, generator=g)[:K] for _ in range(5)])
    try:
        moe_ops.dispatch(torch.randn(5, 4), idx, 2 * W)
    except ValueError as err:
        _cases._check_message(err, ["different numbers of slots K", f"this rank: K={K}"])
        return type(err).__name__
    raise AssertionError(f"rank {r}: dispatch raised nothing")


def test_dispatch_ranks_disagree_on_k(gloo_world):
    """With K > W on one rank and K <= W on the other, the payloads would be laid out
    differently: every rank raises before any row moves (no hang)."""
    assert gloo_world(2).run(_dispatch_with_k, [3, 1], timeout=60) == ["ValueError"] * 2


def test_num_experts_not_divisible_by_world(gloo_world):
    gloo_world(3).run(_cases.num_experts_not_divisible, timeout=60)


# ----------------------------------------------------------------------------- except ValueError
def test_peer_input_error_is_a_value_error():
    assert issubclass(moe_ops.PeerInputError, ValueError)
    from moe_ops import _comm

    assert moe_ops.PeerInputError is _comm.PeerInputError


def caught_as_value_error(bad_rank: int, what: str) -> str:
    """Only ``bad_rank`` passes bad input; every rank's ``except ValueError`` catches what its
    call raised (the bad rank's own error, ``PeerInputError`` on its peers); then the group
    works. Returns the caught exception's type name."""
    r, W = rank_and_world()
    inp, spec = _cases._good(W)
    x, idx, w, E = inp.xs[r], inp.idxs[r], inp.ws[r], inp.num_experts
    bad = r == bad_rank
    if what in ("dispatch", "dispatch_capacity"):
        kwargs = dict(capacity="worst-case") if what == "dispatch_capacity" else {}
        if bad:
            idx = idx.clone()
            idx[0, 0] = E + 1

        def call():
            return moe_ops.dispatch(x, idx, E, **kwargs)
    else:
        recv_x, handle = moe_ops.dispatch(x, idx, E)
        eo = recv_x[1:] if bad else recv_x

        def call():
            return moe_ops.combine(eo, handle, w)

    try:
        call()
    except ValueError as err:
        caught = err
    else:
        raise AssertionError(f"rank {r}: {what} raised nothing")
    if not bad:
        assert isinstance(caught, moe_ops.PeerInputError), repr(caught)
        _cases._check_message(caught, [f"rank(s) [{bad_rank}]", what.split("_")[0]])
    _cases._next_call_works(inp, spec, r)
    return type(caught).__name__


@pytest.mark.parametrize("what", ["dispatch", "dispatch_capacity", "combine"])
def test_peer_error_caught_by_except_value_error(gloo_world, what):
    bad_rank = 1
    names = gloo_world(2).run(caught_as_value_error, bad_rank, what, timeout=60)
    assert names[0] == "PeerInputError" and names[bad_rank] == "ValueError", names
