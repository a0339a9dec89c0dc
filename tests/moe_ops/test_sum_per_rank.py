"""``moe_ops.dispatch(..., sum_per_rank=True)``: combine sums each token's slots on the rank of
their experts and one row per (token, rank) comes back (default mode: K > W; capacity mode: the
padded transport, K > 1). Gloo worlds against ``moe_ops.reference`` (equal up to the rounding of
the per-rank partial sums), the rows each exchange moved, and the errors. The capacity mode's
results with dropped pairs: ``test_fixed_capacity.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_ops
from moe_ops import _layout
from moe_ops._kernels import torch_kernels
from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64

SPECS = {
    "k4-f32": Spec(K=4, E_l=2, Hp=7),
    "k6-El1-bf16": Spec(T=(9, 4, 0, 5), K=6, E_l=1, dtype=bf16, seed=8),
    "k5-f64-noweights": Spec(K=5, E_l=3, dtype=f64, weights=False, Hp=3),
    "k4-f64-Hp2": Spec(K=4, E_l=2, dtype=f64, Hp=2, seed=4),
    "skewed-k4-bf16-w32": Spec(T=(12, 1, 7, 0), K=4, routing="skewed", dtype=bf16, w_dtype=f32),
    "all_unused-k5": Spec(K=5, routing="all_unused"),
    "T0-everywhere-k5": Spec(T=(0,), K=5),
    "to_rank0-k4": Spec(K=4, routing="to_rank0", seed=2),
}


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(gloo_world, W, name):
    gloo_world(W).run(_cases.per_rank_sums, SPECS[name])


def test_token_rows_come_back(gloo_world):
    """Dispatch's payload, combine's exchange back and both backward payload exchanges move
    token rows (one per token and rank, plus a spare row per rank), not one row per (token,
    slot); dispatch's rows carry their slots in front (one exchange), the weights and the weight
    gradient travel as ``[K]`` rows."""
    W, spec = 2, Spec(T=(40, 33), K=6, E_l=4, H=5, Hp=7, seed=1)
    for res in gloo_world(W).run(_cases.per_rank_sums, spec):
        n_dispatch, n_combine, n_backward = res["calls"]
        assert (n_dispatch, n_combine, n_backward) == (2, 2, 3)
        tok, pairs = res["token_rows"], res["pairs"]
        assert tok < pairs  # six slots over two ranks: tokens share ranks
        packed = _layout.slot_columns(spec.H, spec.K, spec.dtype, torch.int32) + spec.H
        assert res["moved"][1] == [tok + W, res["moved"][1][1], packed]
        assert packed * spec.dtype.itemsize % 4 == 0 and packed > spec.H
        fwd = res["moved"][n_dispatch : n_dispatch + n_combine]
        bwd = res["moved"][n_dispatch + n_combine :]
        # combine: the weights go out ([K] per token row), the partial sums come back
        assert fwd[0][0] == tok + W and fwd[0][2] == spec.K
        assert fwd[1][1] == tok + W and fwd[1][2] == spec.Hp
        # combine's backward: the gradient's token rows go out, the weight gradient comes back;
        # then dispatch's backward, a combine without weights (unweighted on every rank: no
        # weights travel) back to x's rows
        assert bwd[0][0] == tok + W and bwd[0][2] == spec.Hp
        assert bwd[1][1] == tok + W and bwd[1][2] == spec.K
        assert bwd[2][1] == tok + W and bwd[2][2] == spec.H


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize(
    "name", ["k4-f32", "k6-El1-bf16", "skewed-k4-bf16-w32", "T0-everywhere-k5"]
)
def test_rounds_match_reference(gloo_world, W, name):
    """Combine's partial sums in rounds of tokens (forced for small payloads) against the
    reference, forward and backward; ranks with no tokens have one round, the others W."""
    gloo_world(W).run(_cases.in_rounds, _cases.per_rank_sums, SPECS[name])


def test_rounds_give_the_same_bits(gloo_world):
    """In rounds or in one exchange: the same sums in the same order, bit for bit, forward and
    backward; one exchange back per round (a rank without tokens sends none of its own)."""
    spec = Spec(T=(9, 4, 0), K=5, E_l=2, dtype=bf16, seed=6)
    assert gloo_world(3).run(_cases.rounds_equal_one_exchange, spec) == [3, 3, 3]
    res = gloo_world(3).run(_cases.in_rounds, _cases.per_rank_sums, spec)
    for r, (n_dispatch, n_combine, n_backward) in enumerate(x["calls"] for x in res):
        assert n_dispatch == 2  # the count exchange, the token rows with their slots
        assert n_combine == 1 + 3  # the weights, then one exchange per round
        # combine's backward: the gradient's token rows out, the weight gradient back; then
        # dispatch's backward, a combine summing per rank: in rounds too
        assert n_backward == 2 + 3
        back = res[r]["moved"][n_dispatch + 1 : n_dispatch + n_combine]
        assert sum(got - 3 for _, got, _ in back) == res[r]["token_rows"]  # each row once


def test_rounds_policy():
    """Rounds only for large payloads (the token rows a rank could send, T * W of them, at
    least ``_ROUND_BYTES``): W of them; one for a rank without tokens."""
    from moe_ops import _ops

    row = 7168 * 2  # bf16, H = 7168
    assert [_ops._rounds(16384, row, W) for W in (2, 4, 8)] == [2, 4, 8]
    assert _ops._rounds(4096, 2048 * 2, 4) == 1  # 64 MiB of token rows at most
    assert _ops._rounds(128, row, 8) == 1 and _ops._rounds(0, row, 8) == 1
    T = -(-_ops._ROUND_BYTES // (2 * row))  # the fewest tokens with rounds at W = 2
    assert _ops._rounds(T, row, 2) == 2 and _ops._rounds(T - 1, row, 2) == 1


def test_round_positions():
    """``_layout.round_rows`` and ``round_token_pos`` against a per-token count."""
    g = torch.Generator().manual_seed(1)
    T, W, rounds = 11, 3, 3
    has = torch.rand((T, W), generator=g) < 0.6
    pos = torch.full((T, W), -1, dtype=torch.int64)
    start = 0
    for d in range(W):  # by destination, then token, one spare row after each chunk
        n = int(has[:, d].sum())
        pos[has[:, d], d] = torch.arange(start, start + n)
        start += n + 1
    cols = torch.full((W, W + 1), 7, dtype=torch.int64)  # strided: a column past the rounds
    _layout.round_rows(pos, rounds, cols[:, :rounds])
    round_T = [t * rounds // T for t in range(T)]
    want = [
        [sum(bool(has[t, d]) for t in range(T) if round_T[t] == j) for j in range(rounds)]
        for d in range(W)
    ]
    assert cols[:, :rounds].tolist() == want and (cols[:, rounds:] == 7).all()
    local = _layout.round_token_pos(pos, cols[:, :rounds])
    for j in range(rounds):
        mine = [t for t in range(T) if round_T[t] == j]
        seen, off = [], 0
        for d in range(W):
            rows = [int(local[t, d]) for t in mine if has[t, d]]
            assert rows == list(range(off, off + want[d][j]))
            seen += rows
            off += want[d][j] + 1
        assert all(int(local[t, d]) == -1 for t in mine for d in range(W) if not has[t, d])


@pytest.mark.parametrize("how", ["one exchange", "rounds", "capacity"])
def test_buffers_freed_once_used(gloo_world, how):
    """Combine's peak memory: the partial sums it sent are gone when the output is allocated,
    and in rounds each round's buffers are gone before the next round's."""
    spec = Spec(T=(6,), K=4, E_l=2, seed=5)
    capacity = "worst-case" if how == "capacity" else None
    case = (_cases.buffers_alive, spec, capacity)
    if how == "rounds":
        case = (_cases.in_rounds, *case)
    # partial sums, exchange back, sum (per round); the capacity mode's exchange is not watched
    calls = {"one exchange": 3, "rounds": 3 * 2, "capacity": 2}[how]
    assert gloo_world(2).run(*case) == [[0] * calls] * 2


def test_default_sums_stay_in_slot_order(gloo_world):
    """Without the option combine keeps the slot-order path: its collective counts (summing per
    rank adds the weights' exchange to combine and one more exchange to each backward)."""
    res = gloo_world(2).run(_cases.count_calls, Spec(K=4, E_l=2))
    assert res[0] == _cases.expected_calls(2, 4)


def test_single_rank_unchanged():
    """At W = 1 the option changes nothing (no token rows, the result bit for bit)."""
    spec = Spec(K=4, E_l=3, seed=3)
    inp = _cases.make_inputs(spec, 1)
    x, idx, w = inp.xs[0], inp.idxs[0], inp.ws[0]
    a, ha = moe_ops.dispatch(x, idx, inp.num_experts, sum_per_rank=True)
    b, hb = moe_ops.dispatch(x, idx, inp.num_experts)
    assert ha.layout.token_pos.shape == (0, 0)
    assert torch.equal(moe_ops.combine(a * 3, ha, w), moe_ops.combine(b * 3, hb, w))


def test_errors():
    x, idx = torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64)
    for capacity in (None, "worst-case"):
        with pytest.raises(TypeError, match="sum_per_rank must be a bool"):
            moe_ops.dispatch(x, idx, 2, capacity=capacity, sum_per_rank=1)


@pytest.mark.parametrize("capacity", [None, "worst-case"])
def test_ranks_that_disagree_raise(gloo_world, capacity):
    msgs = gloo_world(2).run(_cases.per_rank_disagree, capacity)
    assert all("sum_per_rank" in m for m in msgs)


def test_capacity_mode_ranks_with_different_K_raise(gloo_world):
    """With sum_per_rank the slots' width is K: ranks that differ raise (K travels in the count
    row), before any row moves."""
    msgs = gloo_world(2).run(_cases.per_rank_disagree, "worst-case", "K")
    assert all("different K" in m and "[2, 3]" in m for m in msgs), msgs


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_capacity_mode_fake_matches_real(gloo_world, sum_per_rank):
    """Fake kernels (torch.compile) give the real ops' shapes and dtypes at W = 2, bf16 rows
    with float32 weights (combine's second output with sum_per_rank: the weights received)."""
    spec = Spec(T=(6, 6), K=3, E_l=2, dtype=bf16, w_dtype=f32, seed=4)
    gloo_world(2).run(_cases.fixed_fake_matches_real, spec, 20, sum_per_rank)


@pytest.mark.parametrize("capacity", ["worst-case", "exact"])
def test_capacity_mode_moves_token_rows(gloo_world, capacity):
    """Capacity mode: every exchange after the count all-gather moves ``S = min(C, T)`` rows per
    peer (token rows), not ``min(C, T * K)``: the payload with its slots (K int64 in the first
    columns of each row) in dispatch, the weights and the partial sums in combine, the
    gradient's token rows and the weight gradient in combine's backward, then dispatch's
    backward (a combine without weights: only the partial sums travel)."""
    W, spec = 2, Spec(T=(12, 12), K=4, E_l=3, H=5, Hp=7, seed=3)
    if capacity == "exact":
        capacity = _cases.exact_capacity(spec, W)
    C = W * 12 * spec.K if capacity == "worst-case" else capacity
    S = min(C, 12)
    assert C > S  # rows per peer: the tokens, fewer than the capacity
    elt = spec.dtype.itemsize
    for res in gloo_world(W).run(_cases.per_rank_sums, spec, capacity):
        assert res["calls"] == (2, 2, 3)
        packed = res["moved"][1][2]  # the rows and their slots, whole rows of 8-byte multiples
        assert spec.H + 8 * spec.K // elt <= packed < spec.H + 8 * spec.K // elt + 8
        assert packed * elt % 8 == 0
        widths = [packed, spec.K, spec.Hp, spec.Hp, spec.K, spec.H]
        assert res["moved"][1:] == [[W * S, W * S, width] for width in widths]


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [bf16, torch.float16, f32, f64])
def test_packed_rows_hold_slots_and_values_apart(dtype, slot_dtype):
    """Token rows with their slots in front (one exchange carries both): the slots take at
    least their bytes, the values start 16-byte aligned when a row of them is a multiple of 16
    bytes, whole rows view as the slot dtype, and writing one part leaves the other intact."""
    elt, size = dtype.itemsize, slot_dtype.itemsize
    for K in range(1, 10):
        for H in (1, 3, 7, 64, 2049):
            X = _layout.slot_columns(H, K, dtype, slot_dtype)
            assert X * elt >= K * size and (X + H) * elt % size == 0
            if H * elt % 16 == 0:
                assert X * elt % 16 == 0 and X * elt < K * size + 16
            buf = torch.full((5, X + H), 7, dtype=dtype)
            rows, slots = _layout.unpack_rows(buf, H, K, slot_dtype)
            assert rows.shape == (5, H) and slots.shape == (5, K)
            values = torch.randn(5, H).to(dtype)
            rows.copy_(values)
            slots.copy_(torch.arange(-1, 5 * K - 1).view(5, K))
            assert torch.equal(rows, values)
            assert slots.reshape(-1).tolist() == list(range(-1, 5 * K - 1))


def test_token_rows_leave_a_spare_row_per_rank():
    """Token rows are laid out like the payload: a spare row after each destination's chunk
    (the status row on the way back), not counted in the rows sent."""
    idx = torch.tensor([[0, 3], [1, 2], [3, -1]])
    tok = _layout.token_rows(idx, 4, 2)
    assert tok.pos_TW.tolist() == [[0, 3], [1, 4], [-1, 5]]
    assert tok.rows_W.tolist() == [2, 3]


def test_scatter_into_out_keeps_other_rows():
    """``scatter_rows(..., out=)`` writes only the rows pairs point at (the spare rows of the
    slots dispatch sends with token rows stay -1, no slot)."""
    src = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    out = torch.full((4, 2), -1, dtype=torch.int32)
    torch_kernels.scatter_rows(src, torch.tensor([[2], [0]]), None, 4, out=out)
    assert out.tolist() == [[3, 4], [-1, -1], [1, 2], [-1, -1]]


@pytest.mark.parametrize("kind", ["rows_too_few", "w_shape", "eo_meta"])
def test_combine_one_bad_rank(gloo_world, kind):
    """A bad combine input on one rank: it raises, its peers raise ``PeerInputError`` (the
    status rows of the partial sums), nobody hangs, and the next calls work."""
    raised = gloo_world(2).run(_cases.one_bad_rank_combine, 0, kind, True, timeout=60)
    assert raised[1] == "PeerInputError"
    # in rounds: every round completes on every rank before any raises
    raised = gloo_world(2).run(
        _cases.in_rounds, _cases.one_bad_rank_combine, 0, kind, True, timeout=60
    )
    assert raised[1] == "PeerInputError"


@st.composite
def _routing(draw, world_size):
    """Routing with more slots than ranks: every rank's ``[T, K]`` ids (-1: unused)."""
    E_l = draw(st.integers(1, 3))
    K = draw(st.integers(world_size + 1, world_size + 3))
    ids = st.lists(st.integers(-1, E_l * world_size - 1), min_size=K, max_size=K)
    per_rank = [draw(st.lists(ids, max_size=6)) for _ in range(world_size)]
    return per_rank, E_l, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_routing_property(gloo_world, data):
    idx_lists, E_l, H, seed = data.draw(_routing(2))
    gloo_world(2).run(_cases.routing_property, idx_lists, E_l, H, seed, True)
