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
    """Combine's exchange back and both backward payload exchanges move token rows (one per
    token and rank, plus a spare row per rank), not one row per (token, slot); the weights and
    the weight gradient travel as ``[K]`` rows the same way."""
    W, spec = 2, Spec(T=(40, 33), K=6, E_l=4, H=5, Hp=7, seed=1)
    for res in gloo_world(W).run(_cases.per_rank_sums, spec):
        n_dispatch, n_combine, n_backward = res["calls"]
        assert (n_dispatch, n_combine, n_backward) == (3, 2, 3)
        tok, pairs = res["token_rows"], res["pairs"]
        assert tok < pairs  # six slots over two ranks: tokens share ranks
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


@pytest.mark.parametrize("capacity", [None, "worst-case"])
def test_partial_sums_freed_before_the_output(gloo_world, capacity):
    """Combine's peak memory: the partial sums it sent are gone when the output is allocated
    (two ``combine_rows`` calls: the partial sums, then the sum of what came back)."""
    spec = Spec(T=(6,), K=4, E_l=2, seed=5)
    for alive in gloo_world(2).run(_cases.partial_sums_alive, spec, capacity):
        assert alive == [0, 0]


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
