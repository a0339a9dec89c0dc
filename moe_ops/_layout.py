"""Pure routing/layout helpers: no communication, no host syncs (and nothing a CUDA graph cannot
capture: no boolean-mask indexing, no ``bincount``, no ``repeat_interleave`` without
``output_size``, no tensors built from host values).

Shape letters used across the package:

    T  tokens on this rank          H  hidden size (H' for expert outputs)
    K  slots per token (top-k)      E  experts in the model, E_l = E / W on each rank
    W  ranks in the group           N  (token, slot) pairs this rank sends (valid slots only)
    R  rows this rank receives      P  = T * K, all (token, slot) pairs

A "pair" is one (token, slot); its flat index is ``t * K + k``. Send order is by global expert
ascending, then pair index ascending, which is by destination rank, then local expert, then token,
then slot: exactly the order the receiver wants within one source rank.

When K > W, dispatch sends each token's row once per rank that holds one of its experts
(:class:`TokenRows`: by destination, then token) with the local expert of each of its slots there;
the receiver expands the rows to one per pair, in the order above. Combine and both backwards
move one row per pair, or, when dispatch was asked for ``sum_per_rank``, one per (token, rank)
too (the slots summed on the experts' rank).

At W > 1 the default mode's exchanges carry one spare row after each rank's chunk (``[N + W]``
rows sent, ``[R + W]`` received): on the way back to the sources it is the status row that tells
a peer about bad input; on the way to the experts it is left unwritten and never read (but for
the slots that travel with token rows: -1 there, no slot). So a pair's row in either direction is
its send row plus its destination rank, and so is a token row's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# The count row: what dispatch's count exchange sends to each rank, int64 ``[W, 2 + E_l]``. Row d
# is the status flag (nonzero: this rank's input is bad), the token rows sent to rank d when rows
# go once per (token, rank) (-1 when they go once per (token, slot)), then the pairs for each of
# rank d's local experts.
STATUS, TOKEN_ROWS, COUNTS = 0, 1, 2
# The count exchange sends round columns after the count row (row d, ``[round_columns(W)]``),
# filled only by a rank whose combine sends its rows back in more than one round of its tokens
# (the rounds are counted in its status: SUMS_PER_RANK, PAIR_ROUNDS), unwritten otherwise: with
# ``sum_per_rank``, the token rows sent to rank d from each of this rank's rounds
# (:func:`round_rows`); in slot order, the pairs (:func:`pair_rounds`). Every rank sends them
# whatever its options, so the exchange has one size on every rank.
MAX_PAIR_ROUNDS = 8


def round_columns(world_size: int) -> int:
    """Round columns of the count exchange: W rounds at most with ``sum_per_rank``,
    ``MAX_PAIR_ROUNDS`` in slot order."""
    return max(world_size, MAX_PAIR_ROUNDS)


def count_width(local_experts: int, world_size: int) -> int:
    """Columns per row of dispatch's count exchange: the count row, then the round columns."""
    return COUNTS + local_experts + round_columns(world_size)


# Added to the status of a rank whose combine will sum per rank (``sum_per_rank`` with K > W), once
# per round of its tokens, so that ranks that disagree raise before any row moves and every rank
# learns every rank's rounds; the status is bad when it is nonzero modulo this.
SUMS_PER_RANK = 1 << 40
# Added to the status, once per round, by a rank whose slot-order combine gets its pairs back in
# more than one round of its tokens (so every rank learns every rank's rounds).
PAIR_ROUNDS = 1 << 50


def status_parts(status: int) -> tuple[int, int, int]:
    """A count row's status as (bad, rounds summing per rank or 0, pair rounds or 0)."""
    return status % SUMS_PER_RANK, status % PAIR_ROUNDS // SUMS_PER_RANK, status // PAIR_ROUNDS


def write_count_row(out_WC: Tensor, counts_E: Tensor, bad: Tensor) -> Tensor:
    """The count row from device values (``bad``: a 0-d count of bad ids), into ``out_WC``;
    token rows -1 (:func:`token_rows` overwrites them)."""
    W = out_WC.shape[0]
    flag = bad.to(torch.int64).view(1, 1).expand(W, 1)
    minus_one = flag.new_full((1, 1), -1).expand(W, 1)
    return torch.cat([flag, minus_one, counts_E.view(W, -1)], dim=1, out=out_WC)


class SendLayout(NamedTuple):
    """What both kernel sets' ``send_layout`` return.

    send_pos:       int64 ``[T, K]``, row of each pair in send order, -1 for unused slots
    pair_pos:       int64 ``[T, K]``, row of each pair with one spare row after each
                    destination's chunk: ``send_pos`` plus the destination rank at W > 1;
                    ``send_pos`` itself at W = 1
    send_pair_idx:  int64 ``[P]``, pair index of every send row; only the first N are meaningful
    counts_bad:     int64 ``[E + 1]``, valid pairs per global expert, then the number of ids
                    outside ``[-1, E)``
    """

    send_pos: Tensor
    pair_pos: Tensor
    send_pair_idx: Tensor
    counts_bad: Tensor


class TokenRows(NamedTuple):
    """Each token once per rank that holds one of its experts (dispatch's payload when K > W).

    pos_TW:    int64 ``[T, W]``, row of token t in the buffer sent to rank d (by destination, then
               token, one spare row after each destination's chunk, as in the payload exchanges
               of the default mode), -1 when none of t's slots goes to d
    rows_W:    int64 ``[W]``, rows sent to each rank (spare rows not counted)
    slots_TWK: int32 ``[T * W, K]``, row ``t * W + d``: the local expert at rank d of each of t's
               slots, -1 for slots that go elsewhere (or are unused); sent along with the rows so
               that the receiver can expand them to one row per (token, slot)
    """

    pos_TW: Tensor
    rows_W: Tensor
    slots_TWK: Tensor


def token_rows(
    topk_idx_TK: Tensor, num_experts: int, world_size: int, rows_out: Tensor | None = None
) -> TokenRows:
    """:class:`TokenRows` of ``topk_idx`` (ids outside ``[0, E)`` route nowhere); ``rows_W`` is
    written into ``rows_out`` (``[W]`` int64, may be strided) when given."""
    T, K = topk_idx_TK.shape
    W, E_l = world_size, num_experts // world_size
    ids = topk_idx_TK.to(torch.int64)
    rank_W = torch.arange(W, device=ids.device)
    valid = (ids >= 0) & (ids < num_experts)
    hit_TWK = valid[:, None, :] & (ids[:, None, :] // E_l == rank_W[None, :, None])
    slots = torch.where(hit_TWK, ids[:, None, :] - rank_W[None, :, None] * E_l, -1)
    has_WT = hit_TWK.any(2).t()
    ends_WT = torch.cumsum(has_WT.reshape(-1), 0).view(W, T)
    pos_TW = torch.where(has_WT, ends_WT - 1 + rank_W[:, None], -1).t()  # spare rows counted
    rows_W = has_WT.sum(1) if rows_out is None else torch.sum(has_WT, 1, out=rows_out)
    return TokenRows(pos_TW, rows_W, slots.to(torch.int32).view(T * W, K))


def slot_columns(H: int, K: int, dtype: torch.dtype, slot_dtype: torch.dtype) -> int:
    """Columns of ``dtype`` in front of a packed row's H values that hold its K slots of
    ``slot_dtype`` (token rows travel with their slots in one exchange): the slots' bytes
    rounded up to 16, so that the values stay as aligned as in a row of their own, and more
    where needed for a whole row to be a multiple of the slot size (the slots view as
    ``slot_dtype``)."""
    elt, size = dtype.itemsize, slot_dtype.itemsize
    X = -(-K * size // 16) * 16 // elt
    while (X + H) * elt % size:
        X += 1
    return X


def unpack_rows(buf_MY: Tensor, H: int, K: int, slot_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A buffer of packed rows (:func:`slot_columns`) as views: its rows' values ``[M, H]`` and
    slots ``[M, K]``."""
    return buf_MY[:, buf_MY.shape[1] - H :], buf_MY.view(slot_dtype)[:, :K]


def round_rows(pos_TW: Tensor, rounds: int, out_WJ: Tensor) -> None:
    """The round columns (``out_WJ``, ``[W, rounds]``, may be strided): token rows sent to each
    rank from each of ``rounds`` rounds of this rank's tokens (token t is in round
    ``t * rounds // T``; the rows to one rank are in token order, so a round's rows are a
    contiguous run of them)."""
    T, W = pos_TW.shape
    round_T = torch.arange(T, device=pos_TW.device) * rounds // T
    sent_TW = (pos_TW >= 0).to(torch.int64)
    per_round = torch.zeros((rounds, W), dtype=torch.int64, device=pos_TW.device)
    out_WJ.copy_(per_round.index_add_(0, round_T, sent_TW).t())


def round_token_pos(pos_TW: Tensor, rows_WJ: Tensor) -> Tensor:
    """Each token row's position in its round's buffer (by destination, one spare row after
    each destination's chunk, like the whole buffer ``pos_TW`` indexes), -1 where ``pos_TW``
    is; ``rows_WJ``: :func:`round_rows`' columns of this rank's rounds."""
    T, W = pos_TW.shape
    rounds = rows_WJ.shape[1]
    whole_W = excl_cumsum(rows_WJ.sum(1) + 1, 0)  # each destination's chunk, whole buffer
    earlier_WJ = excl_cumsum(rows_WJ, 1)  # rows of earlier rounds in that chunk
    in_round_WJ = excl_cumsum(rows_WJ + 1, 0)  # the chunk in the round's buffer
    shift_JW = (whole_W[:, None] + earlier_WJ - in_round_WJ).t()
    round_T = torch.arange(T, device=pos_TW.device) * rounds // T
    return torch.where(pos_TW >= 0, pos_TW - shift_JW[round_T], -1)


def pair_rounds(topk_idx_TK: Tensor, num_experts: int, rounds: int) -> Tensor:
    """Pairs per (round of this rank's tokens, global expert), int64 ``[rounds, E]`` (token t is
    in round ``t * rounds // T``; ids outside ``[0, E)`` count nowhere). In send order a round's
    pairs of one expert are a contiguous run of that expert's pairs."""
    T, K = topk_idx_TK.shape
    ids = topk_idx_TK.to(torch.int64)
    round_T = torch.arange(T, device=ids.device) * rounds // T
    valid = (ids >= 0) & (ids < num_experts)
    flat = torch.where(valid, round_T[:, None] * num_experts + ids, rounds * num_experts)
    per = torch.zeros(rounds * num_experts + 1, dtype=torch.int64, device=ids.device)
    per.index_add_(0, flat.reshape(-1), torch.ones_like(flat).reshape(-1))
    return per[:-1].view(rounds, num_experts)


def round_pair_pos(send_pos_TK: Tensor, topk_idx_TK: Tensor, pairs_JE: Tensor, W: int) -> Tensor:
    """Each pair's row in the buffer that brings its round's rows back (from each rank in rank
    order: by local expert, then token and slot; in the first round one status row after each
    rank's chunk), -1 where ``send_pos`` is. ``pairs_JE``: :func:`pair_rounds` of this rank's
    rounds."""
    T = send_pos_TK.shape[0]
    J, E = pairs_JE.shape
    expert_E = torch.arange(E, device=pairs_JE.device)
    # where round j of expert g starts in round j's buffer, and in the send order
    in_round_JE = excl_cumsum(pairs_JE, 1)
    in_round_JE[0] += expert_E // (E // W)  # the status rows before its rank's chunk
    in_send_JE = excl_cumsum(pairs_JE.t().reshape(-1), 0).view(E, J).t()
    shift_JE = in_round_JE - in_send_JE
    round_T = torch.arange(T, device=pairs_JE.device) * J // T
    valid = send_pos_TK >= 0
    g_TK = torch.where(valid, topk_idx_TK.to(torch.int64), 0)
    return torch.where(valid, send_pos_TK + shift_JE[round_T[:, None], g_TK], -1)


def round_buffer_rows(counts_WElJ: Tensor, num_rows: int) -> Tensor:
    """On the experts' rank: the rows of ``expert_out`` that each round sends back, int64
    ``[R + W]``, -1 for the status rows.

    ``counts_WElJ[s, e, j]``: pairs of source s's round j for local expert e. ``expert_out`` is
    expert-major (expert, source, then token order, so each (expert, source) run holds its
    rounds in order); round j's buffer holds the rows for each source in rank order (by local
    expert; in the first round one status row after each source's chunk), and the rounds'
    buffers follow each other."""
    W, E_l, J = counts_WElJ.shape
    dev = counts_WElJ.device
    counts_esj = counts_WElJ.permute(1, 0, 2).reshape(-1)  # expert_out's order
    rank_W = torch.arange(W, device=dev)
    # status rows before each (round, source) chunk: s in the first round, all W after it
    spares_JW = torch.cat([rank_W[None], rank_W.new_full((J - 1, W), W)]).view(J, W, 1)
    to_JWE = excl_cumsum(counts_WElJ.permute(2, 0, 1).reshape(-1), 0).view(J, W, E_l) + spares_JW
    to_R = _runs_moved(counts_esj, to_JWE.permute(2, 1, 0).reshape(-1), num_rows)
    out = torch.full((num_rows + W,), -1, dtype=torch.int64, device=dev)
    return out.index_copy_(0, to_R, torch.arange(num_rows, device=dev))


def _runs_moved(counts_N: Tensor, starts_N: Tensor, num_rows: int) -> Tensor:
    """Rows that lie in N runs one after the other (run i: ``counts_N[i]`` rows; ``num_rows``
    in all): the row each one takes when run i starts at ``starts_N[i]`` instead."""
    shift = starts_N - excl_cumsum(counts_N, 0)
    rows = torch.arange(num_rows, device=counts_N.device)
    return rows + torch.repeat_interleave(shift, counts_N, output_size=num_rows)


# The capacity mode's count row, all-gathered: counts per global expert, then these columns (after
# the E counts): bad ids, T, and K when the rank sums per rank (else 0).
FIXED_COLUMNS = FIXED_BAD, FIXED_T, FIXED_PER_RANK = 0, 1, 2


class FixedPlan(NamedTuple):
    """What the capacity mode decides from every rank's count row (both kernel sets'
    ``fixed_plan``). Receivers take rows expert-major (local expert, source rank, token, slot);
    rows at positions >= C do not fit, so the kept pairs of one (source, expert) are a prefix of
    them in pair order.

    start_E            int64 ``[E]``, this rank's first send-order row of each global expert
    kept_E             int64 ``[E]``, how many of this rank's pairs of each expert fit
    off_E              int64 ``[E]``, row in recv_x on the expert's rank of this rank's first
                       pair of each expert
    kept_se            int64 ``[W, E_l]``, rows that reach this rank from each source for each
                       of its experts
    tokens_per_expert  int64 ``[E_l]``, rows of recv_x per local expert (``kept_se.sum(0)``)
    num_recv           int64 ``[1]``, R
    num_dropped        int64 ``[]``, this rank's pairs that do not fit
    ok                 int64 ``[5]``, nonzero when good: no bad id on any rank; the same rows per
                       peer (``min(C, T * rows_per_token)``) on every rank; the same
                       ``FIXED_PER_RANK`` column on every rank (sum_per_rank, and K with it);
                       nothing overflows anywhere; every check the call asked for passed
                       (``checks``: bit i asks for ``ok[i]``), so that one device assertion
                       covers them all
    """

    start_E: Tensor
    kept_E: Tensor
    off_E: Tensor
    kept_se: Tensor
    tokens_per_expert: Tensor
    num_recv: Tensor
    num_dropped: Tensor
    ok: Tensor


def kept_pairs(topk_idx_TK: Tensor, send_pos_TK: Tensor, plan: FixedPlan):
    """Each pair's expert (0 where unused), its rank among this rank's pairs of that expert, and
    whether it fits (``[T, K]`` each)."""
    valid = send_pos_TK >= 0
    g = torch.where(valid, topk_idx_TK.to(torch.int64), 0)
    j = send_pos_TK - plan.start_E[g]
    return g, j, valid & (j < plan.kept_E[g])


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of combine: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def excl_cumsum(t: Tensor, dim: int) -> Tensor:
    return torch.cumsum(t, dim) - t


def expert_major_rows(counts_WEl: Tensor, num_rows: int) -> Tensor:
    """Where each expert-major row sits in a buffer received source-major with spare rows.

    ``counts_WEl[s, e]`` rows arrived from source ``s`` for local expert ``e``, laid out by source,
    then expert, with one spare row after each source's chunk. Returns int64 ``[R + W]``: for each
    of the R rows in expert-major order its row in that buffer, then the W spare rows.
    """
    W = counts_WEl.shape[0]
    arange_W = torch.arange(W, device=counts_WEl.device)
    src_off = excl_cumsum(counts_WEl.reshape(-1), 0).view_as(counts_WEl) + arange_W[:, None]
    rows_R = _runs_moved(counts_WEl.t().reshape(-1), src_off.t().reshape(-1), num_rows)
    spare_W = torch.cumsum(counts_WEl.sum(1), 0) + arange_W
    return torch.cat([rows_R, spare_W])


def chunk_rows(capacity: int, T: int, K: int) -> int:
    """S, rows per peer of the capacity mode's padded transport: no peer can keep more than C of
    one rank's rows, and no rank sends more than T * K."""
    return min(capacity, T * K)
