"""``moe_ops.dispatch(..., low_memory=True)``: the default (slot-order) mode's combine with the
rows back in rounds of each rank's tokens (large payloads; forced here for small ones): the same
bits as one exchange, one exchange per round, three round buffers at most, errors, and the
policy."""

from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import _layout, _ops
from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

bf16, f32 = torch.bfloat16, torch.float32

SPECS = {
    "k2-f32": Spec(T=(6, 5, 7, 4), K=2, E_l=2, Hp=7),
    "k5-bf16-w32": Spec(T=(9, 4, 0, 5), K=5, E_l=2, dtype=bf16, w_dtype=f32, seed=3),
    "k3-noweights": Spec(T=(5, 8, 3, 6), K=3, E_l=3, weights=False, seed=5),
    "skewed-k4": Spec(T=(12, 1, 7, 0), K=4, routing="skewed", seed=2),
    "all_unused-k3": Spec(K=3, routing="all_unused"),
}


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_rounds_give_the_same_bits(gloo_world, W, name):
    """In rounds (3, 1, 2 rounds of ranks 0, 1, 2, at most one per token) or in one exchange:
    the same output and gradients, bit for bit, and equal to the output without grad (rows not
    kept). Collectives: one more small exchange in dispatch (the pairs per expert and round),
    one exchange back per round in combine and in dispatch's backward (a combine)."""
    spec = SPECS[name]
    res = gloo_world(W).run(_cases.pair_rounds_equal_one_exchange, spec)
    Ts = [spec.T[r % len(spec.T)] for r in range(W)]
    forced = [max(1, min(_cases.PAIR_ROUNDS_BY_RANK[r], T)) for r, T in enumerate(Ts)]
    J = max(forced)
    for out in res:
        assert out["rounds"] == J
        n_dispatch, n_combine, n_backward = out["calls_one"]
        if J == 1:
            assert out["calls"] == out["calls_one"]
        else:
            assert out["calls"] == (n_dispatch + 1, J, n_backward - 1 + J)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_rounds_give_the_same_bits_nccl(nccl_world, W, triton):
    """As above on GPUs (NCCL), bf16 rows with float32 weights, both kernel sets."""
    spec = Spec(T=(40, 24, 33, 0), K=4, E_l=3, H=32, dtype=bf16, w_dtype=f32, seed=5)
    case = (_cases.with_kernels, triton, _cases.pair_rounds_equal_one_exchange, spec)
    res = nccl_world(W).run(*case)
    assert [out["rounds"] for out in res] == [3] * W


def test_round_buffers_freed_once_used(gloo_world):
    """Three round buffers at most: round j + 1's rows are gathered while round j's exchange
    runs (its rows sent and back alive), and its exchange starts while round j's rows back
    are summed; the rows sent are gone once their exchange is done."""
    spec = Spec(T=(9, 9), K=3, E_l=2, seed=7)
    res = gloo_world(2).run(_cases.in_pair_rounds, _cases.pair_round_buffers_alive, spec)
    # rank 0: 3 rounds; every rank takes part in each: a gather and an exchange per round
    assert res == [[0, 0] + [2, 1] * 2] * 2


@pytest.mark.parametrize("kind", ["rows_too_many", "w_shape"])
def test_one_bad_rank_in_rounds(gloo_world, kind):
    """A bad combine input on one rank: every rank raises (the status travels with the first
    round), every round still runs, and the next call works."""
    res = gloo_world(3).run(_cases.in_pair_rounds, _cases.one_bad_rank_combine, 1, kind)
    assert res[0] == res[2] == "PeerInputError"


def test_rounds_only_with_low_memory(gloo_world):
    """Without ``low_memory`` a payload large enough for rounds still goes back in one exchange
    (rounds are slower: 10-25% at T=16384 H=7168 top-8/256)."""
    spec = Spec(T=(6, 5), K=2, E_l=2)
    assert gloo_world(2).run(_cases.rounds_need_low_memory, spec) == [[1, 3]] * 2


def test_low_memory_is_a_default_mode_option():
    x, idx = torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="low_memory is a default-mode option"):
        moe_ops.dispatch(x, idx, 2, capacity="worst-case", low_memory=True)
    with pytest.raises(TypeError, match="low_memory must be a bool"):
        moe_ops.dispatch(x, idx, 2, low_memory=1)


def test_weight_grad_needs_kept_rows(gloo_world):
    msgs = gloo_world(2).run(_cases.rows_not_kept_for_weight_grad)
    assert all("keep_rows=False" in m for m in msgs), msgs


def test_policy():
    """Rounds when a rank's pairs take at least twice ``_ROUND_BYTES``: ``MAX_PAIR_ROUNDS`` of
    them (three round buffers at once: 3/8 of the payload), at most one per token."""
    row = 7168 * 2  # bf16, H = 7168
    assert _ops._pair_rounds(16384, 8, row) == _layout.MAX_PAIR_ROUNDS == 8  # 1792 MiB of pairs
    assert _ops._pair_rounds(4096, 8, 2048 * 2) == 1  # 128 MiB
    T = -(-2 * _ops._ROUND_BYTES // (8 * row))  # the fewest tokens with rounds at top-8
    assert _ops._pair_rounds(T, 8, row) == 8 and _ops._pair_rounds(T - 1, 8, row) == 1
    assert _ops._pair_rounds(0, 8, row) == 1 and _ops._pair_rounds(3, 1, 1 << 30) == 3


def test_round_positions():
    """``round_pair_pos`` and ``round_buffer_rows`` against a walk over every pair: the rows a
    source gets back in round j (each expert rank's chunk for it, in rank order) hold, at each
    pair's round position, that pair's row of expert_out on its expert's rank."""
    g = torch.Generator().manual_seed(3)
    W, E_l, K, J = 3, 2, 3, 3
    E = W * E_l
    Ts = [7, 0, 5]
    idxs = [torch.randint(-1, E, (T, K), generator=g) for T in Ts]
    rounds = [max(1, min(J, T)) for T in Ts]
    # expert_out's rows on rank d: its pairs by local expert, source, token, slot
    pairs = sorted(
        (int(idxs[s][t, k]), s, t, k)
        for s in range(W)
        for t in range(Ts[s])
        for k in range(K)
        if idxs[s][t, k] >= 0
    )
    chunks = {}  # (d, j, s): what d sends s in round j, as (d, expert_out row) or "status"
    for d in range(W):
        mine = [p for p in pairs if p[0] // E_l == d]
        counts = torch.zeros((W, E_l, J), dtype=torch.int64)
        for e, s, t, _ in mine:
            counts[s, e % E_l, t * rounds[s] // Ts[s]] += 1
        rows = _layout.round_buffer_rows(counts, len(mine)).tolist()
        assert sorted(i for i in rows if i >= 0) == list(range(len(mine)))
        at = 0
        for j in range(J):
            for s in range(W):
                n = int(counts[s, :, j].sum()) + (1 if j == 0 else 0)
                chunk = rows[at : at + n]
                # a status row closes each chunk of the first round, and only there
                assert chunk.count(-1) == (j == 0) and (j > 0 or chunk[-1] == -1)
                chunks[d, j, s] = [(d, mine[i]) if i >= 0 else "status" for i in chunk]
                at += n
        assert at == len(rows)
    for s in range(W):
        if Ts[s] == 0:
            continue
        flat = idxs[s].reshape(-1)
        order = torch.sort(torch.where(flat >= 0, flat, E), stable=True)
        valid = order.values < E
        send_pos = torch.full((Ts[s] * K,), -1, dtype=torch.int64)
        send_pos[order.indices[valid]] = torch.arange(int(valid.sum()))
        pairs_JE = _layout.pair_rounds(idxs[s], E, rounds[s])
        pos = _layout.round_pair_pos(send_pos.view(-1, K), idxs[s], pairs_JE, W)
        back = [sum((chunks[d, j, s] for d in range(W)), []) for j in range(J)]
        for t in range(Ts[s]):
            for k in range(K):
                e = int(idxs[s][t, k])
                if e < 0:
                    assert pos[t, k] == -1
                    continue
                j = t * rounds[s] // Ts[s]
                assert back[j][int(pos[t, k])] == (e // E_l, (e, s, t, k))
