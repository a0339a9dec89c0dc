"""The default mode's ops: ``moe_ops::dispatch``, ``moe_ops::combine`` and
``moe_ops::_combine_backward``, each next to its fake kernel; their autograd is the shared one
(``moe_ops._autograd``). Shape letters: see ``moe_ops._layout``. What the ops return, in order:
:class:`DispatchOutputs` and :class:`Layout` (what combine takes).

``combine(expert_out[R, H'], topk_weights[T, K]?, *Layout, group_name, world_size,
unweighted=False, keep_rows=True)`` returns ``out[T, H']`` and ``returned_rows``: the rows that
came back to this rank in send order, with one status row per destination chunk (``[N + W, H']``;
in rounds, round after round, the status rows with the first); combine's backward needs them for
the weight gradient, so they are kept only with ``keep_rows`` and weights (else ``[0, H']``).
When ``W = 1`` nothing moves and ``returned_rows`` is ``[0, H']``: the backward uses
``expert_out`` itself. When dispatch had ``sum_per_rank`` (the
layout has token rows) the second output is the weights that reached this rank with the token
rows (``[Rt + W, K]``, in the accumulation dtype of expert_out), which the backward needs with
``expert_out`` (see :func:`_for_backward`).

``_combine_backward(grad_out, returned_rows?, topk_weights?, *Layout, group_name, world_size)``
returns ``grad_expert_out[R, H']`` and ``grad_topk_weights[T, K]`` (``[0, 0]`` when not asked for).

Host syncs: dispatch reads the counts once (``_comm.read_to_host``); combine and both backwards
reuse the CPU split tensors (``send_splits``, ``recv_splits``, and the token splits: the
exchange sizes are read from them on the host) and never sync: what they need on the device was
computed by dispatch on the device (``recv_perm``), and constants are written with fills, never
by assigning a Python scalar (which copies it from pageable memory). All three carry
``torch.Tag.cudagraph_unsafe``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from moe_ops import _autograd, _comm, _kernels, _layout, _replay
from moe_ops._checks import FLOAT_DTYPES, bad_id_error, check_combine, check_dispatch
from moe_ops._layout import (
    COUNTS,
    PAIR_ROUNDS,
    STATUS,
    SUMS_PER_RANK,
    TOKEN_ROWS,
    acc_dtype,
    count_width,
    round_columns,
    status_parts,
)

# The default-mode ops read row counts on the host (dispatch) or size their exchanges from CPU
# split tensors (combine, its backward): a CUDA graph would replay the first call's sizes. Tagged
# so that inductor's CUDA graphs (mode="reduce-overhead") leave them out of the captured parts.
# The capacity-mode ops are graph-safe and untagged.
_NOT_CUDAGRAPH_SAFE = (torch.Tag.cudagraph_unsafe,)


class Layout(NamedTuple):
    """What combine (and both backwards) take from dispatch, in combine's argument order.

    pair_pos       [T, K]   int64, row of each pair in the rows combine gets back (one status
                            row after each destination's chunk at W > 1), -1 for unused slots
    send_pair_idx  [N]      int64, flat pair index t * K + k of every row sent, in send order
    recv_perm      [R + W]  int64 (``[0]`` when W = 1): row of the received buffer (source-major,
                            one spare row after each source's chunk) of each row of recv_x, then
                            the W spare rows (``_layout.expert_major_rows``)
    send_splits    [W]      int64 on the CPU, rows sent to each rank
    recv_splits    [W]      int64 on the CPU, rows received from each rank

    With ``sum_per_rank`` (W > 1 and K > W; else ``[0, 0]``, ``[0, 0]`` and CPU ``[0]``,
    ``[0]``): what combine needs to sum each token's slots on the rank of their experts and send
    one row per (token, rank) back. The token rows travel as dispatch's did (one spare row after
    each rank's chunk, as above):

    token_pos          [T, W]       int64, row of token t for rank d in this rank's token-row
                                    buffers, -1 when none (``_layout.TokenRows.pos_TW``)
    slot_rows          [Rt + W, K]  int64, for each token row received (source-major, the spare
                                    rows included: all -1) the row of recv_x of each of its
                                    slots, -1 for slots whose expert is on another rank
    token_send_splits  [W]          int64 on the CPU, token rows sent to each rank
    token_recv_splits  [W]          int64 on the CPU, token rows received from each rank

    Large payloads go back in rounds of each rank's tokens, each round one exchange whose rows
    are summed into the output before the next (:func:`_rounds` with ``sum_per_rank``, else
    :func:`_pair_rounds`; at W = 1 CPU ``[0]``, ``[0, 0]`` and ``[0]``). ``J`` is
    ``_layout.round_columns(W)``; the rows are token rows with ``sum_per_rank``, pairs in slot
    order:

    round_splits       [2, J, W]    int64 on the CPU: ``[0, j]`` rows sent to each rank from
                                    this rank's round j (-1 past its last round), ``[1, j]`` rows
                                    received from each rank in round j (-1 past the last round
                                    of any rank); all -1 when every rank has one
    round_pos          [T, W|K]     int64, ``token_pos`` (``_layout.round_token_pos``) or
                                    ``pair_pos`` (``_layout.round_pair_pos``) within the round's
                                    buffer; no rows without rounds
    round_rows         [R + J' W]   int64, slot order only: the rows of expert_out each round
                                    sends back, round after round (``J'`` rounds), -1 for the
                                    status rows (``_layout.round_buffer_rows``); ``[0]`` without
                                    rounds
    """

    pair_pos: Tensor
    send_pair_idx: Tensor
    recv_perm: Tensor
    send_splits: Tensor
    recv_splits: Tensor
    token_pos: Tensor
    slot_rows: Tensor
    token_send_splits: Tensor
    token_recv_splits: Tensor
    round_splits: Tensor
    round_pos: Tensor
    round_rows: Tensor

    @property
    def sums_per_rank(self) -> bool:
        """Combine sums slots per rank (the layout has token rows); a static fact of the shapes."""
        return self.token_pos.shape[1] > 0


class DispatchOutputs(NamedTuple):
    """What ``dispatch(x[T, H], topk_idx[T, K], num_experts, group_name, world_size)`` returns.

    recv_x                  [R, H]  rows for this rank's experts, expert-major (moe_ops.dispatch)
    tokens_per_expert       [E_l]   int64, rows of recv_x per local expert
    send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits: see :class:`Layout`
    tokens_per_expert_host  [E_l]   int64 on the CPU, ``tokens_per_expert`` as read by the one
                                    sync (per-expert loops size their segments from it)
    token_pos, slot_rows, token_send_splits, token_recv_splits, round_splits, round_pos,
    round_rows: see :class:`Layout`
    """

    recv_x: Tensor
    tokens_per_expert: Tensor
    send_pair_idx: Tensor
    pair_pos: Tensor
    recv_perm: Tensor
    send_splits: Tensor
    recv_splits: Tensor
    tokens_per_expert_host: Tensor
    token_pos: Tensor
    slot_rows: Tensor
    token_send_splits: Tensor
    token_recv_splits: Tensor
    round_splits: Tensor
    round_pos: Tensor
    round_rows: Tensor

    def layout(self) -> Layout:
        return Layout(*(getattr(self, name) for name in Layout._fields))


def _no_token_layout(device: torch.device, rounds: dict | None = None) -> dict:
    """The token-row fields of :class:`DispatchOutputs` when combine sums in slot order, and
    ``rounds`` (none by default: W = 1)."""
    i64 = dict(dtype=torch.int64)
    if rounds is None:
        rounds = dict(
            round_splits=torch.empty(0, **i64),
            round_pos=torch.empty((0, 0), device=device, **i64),
            round_rows=torch.empty(0, device=device, **i64),
        )
    return dict(
        token_pos=torch.empty((0, 0), device=device, **i64),
        slot_rows=torch.empty((0, 0), device=device, **i64),
        token_send_splits=torch.empty(0, **i64),
        token_recv_splits=torch.empty(0, **i64),
        **rounds,
    )


# Combine summing per rank keeps three token-row buffers alive at its peak besides expert_out:
# the partial sums it sends, the rows that come back and the output. For large payloads it sends
# them in rounds of a rank's tokens (each round one exchange, its rows summed into the output
# before the next), so the first two shrink with the rounds, at the price of one more exchange
# per round. A rank has rounds when the most token rows it could send (T * W) take at least
# _ROUND_BYTES: W of them, so that a round's two buffers hold at most 2 T rows (the output's
# size twice) whatever W.
_ROUND_BYTES = 256 << 20


def _rounds(T: int, row_bytes: int, W: int) -> int:
    return 1 if T == 0 or T * W * row_bytes < _ROUND_BYTES else W


# Combine in slot order holds, besides expert_out, the rows it sends back (regrouped by source)
# and the rows that come back, one per pair each: twice the payload. With ``low_memory`` a rank
# whose pairs take at least twice _ROUND_BYTES gets them back in MAX_PAIR_ROUNDS rounds of its
# tokens (one token each at least). The rounds run ahead (a round's rows are gathered while the
# previous round's exchange runs): three round buffers at once, 3/8 of the payload instead of 2.
# The rows' size is x's: expert_out's is not known to dispatch.
def _pair_rounds(T: int, K: int, row_bytes: int) -> int:
    if T * K * row_bytes < 2 * _ROUND_BYTES:
        return 1
    return min(_layout.MAX_PAIR_ROUNDS, T)


def num_recv_rows(send_pair_idx: Tensor, recv_perm: Tensor, world_size: int):
    """R, the rows of recv_x, from the layout's shapes."""
    return send_pair_idx.shape[0] if world_size == 1 else recv_perm.shape[0] - world_size


def _to_experts(kern, src_TH, topk_weights, lay: Layout, group) -> Tensor:
    """Rows of the pairs (``src[t]`` times ``w[t, k]``) to their experts, expert-major ``[R, H]``
    (combine's backward; dispatch does the same in two halves around its host read)."""
    W = 1 if group is None else group.size()
    spare = 0 if group is None else W
    N = lay.send_pair_idx.shape[0]
    rows = kern.scatter_rows(src_TH, lay.pair_pos, topk_weights, N + spare)
    if group is None:
        return rows
    recv = _comm.rows_to_experts(rows, lay.send_splits.tolist(), lay.recv_splits.tolist(), group)
    del rows  # the send buffer's memory can serve the regrouped rows
    R = num_recv_rows(lay.send_pair_idx, lay.recv_perm, W)
    return kern.gather_rows(recv, lay.recv_perm[:R])


# ----------------------------------------------------------------------------- dispatch
def _dispatch(
    x: Tensor,
    topk_idx: Tensor,
    num_experts: int,
    group_name: str,
    world_size: int,
    sum_per_rank: bool = False,
    low_memory: bool = False,
) -> tuple[Tensor, ...]:
    """The op's outputs: :class:`DispatchOutputs`, in order (its schema is written from that
    class: ``_DISPATCH_SCHEMA``)."""
    group = _comm.resolve_group(group_name, world_size)
    W, E = world_size, num_experts
    err = check_dispatch(x, topk_idx, E, W)
    if err is not None:
        if group is not None:  # take part in the count exchange, flagged bad, so peers know
            E_l = E // W if E > 0 and E % W == 0 else 1
            _comm.exchange_counts(_comm.bad_count_row(E_l, W, x.device), group)
        raise err
    kern = _kernels.for_device(x.device)
    if group is None:
        return _dispatch_one_rank(kern, x, topk_idx, E)
    return _dispatch_group(kern, x, topk_idx, E, group, sum_per_rank, low_memory)


_DISPATCH_SCHEMA = (
    "(Tensor x, Tensor topk_idx, int num_experts, str group_name, int world_size, "
    "bool sum_per_rank=False, bool low_memory=False) -> ("
    + ", ".join(["Tensor"] * len(DispatchOutputs._fields))
    + ")"
)
dispatch_op = torch.library.custom_op(
    "moe_ops::dispatch", mutates_args=(), tags=_NOT_CUDAGRAPH_SAFE, schema=_DISPATCH_SCHEMA
)(_dispatch)


# On CUDA, dispatch fills its send buffers while the counts travel to the host (sized for every
# row that could be sent); on the CPU there is nothing to overlap, so they are filled after the
# read, at their exact size. Every launch before the read delays it, and every launch after it
# is on the critical path (the GPU has drained): the layout kernels write the count row
# themselves, and what needs the counts is computed after the read, fused where it can be.


def _dispatch_one_rank(kern, x: Tensor, topk_idx: Tensor, E: int) -> DispatchOutputs:
    """W = 1: the send order is the expert-major order; no row moves."""
    T, K = topk_idx.shape
    key = ("send_layout", kern.__name__, T, K, topk_idx.dtype, E)
    lay, copies = _replay.run(
        lambda idx: kern.send_layout(idx, E, 1),
        key,
        topk_idx,
        outlive=lambda lay: [lay.pair_pos, lay.send_pair_idx, lay.counts_bad],
    )
    if copies is not None:  # replayed: the graph's outputs are overwritten by its next replay
        lay = lay._replace(pair_pos=copies[0], send_pair_idx=copies[1], counts_bad=copies[2])
    host, rows = _comm.read_to_host(
        lay.counts_bad, lambda: kern.scatter_rows(x, lay.pair_pos, None, T * K)
    )
    *counts, bad = host.tolist()
    if bad:
        raise bad_id_error(topk_idx, E)
    N = sum(counts)
    if rows is None:
        rows = kern.scatter_rows(x, lay.pair_pos, None, N)
    return DispatchOutputs(
        recv_x=rows[:N],
        tokens_per_expert=lay.counts_bad[:E],
        send_pair_idx=lay.send_pair_idx[:N],
        pair_pos=lay.pair_pos,
        recv_perm=torch.empty(0, dtype=torch.int64, device=x.device),
        send_splits=torch.tensor([N], dtype=torch.int64),
        recv_splits=torch.tensor([N], dtype=torch.int64),
        tokens_per_expert_host=host[:-1].clone(),
        **_no_token_layout(x.device),
    )


def _dispatch_group(
    kern, x: Tensor, topk_idx: Tensor, E: int, group, sum_per_rank: bool, low_memory: bool
) -> DispatchOutputs:
    """W > 1: count exchange, the one host read, the payload exchange, the regroup by expert.

    With more slots than ranks (K > W) a token's slots share ranks, so its row is sent once per
    rank that holds one of its experts, with the local experts its slots pick there, and
    expanded to one row per (token, slot) on arrival; otherwise once per (token, slot). With
    ``sum_per_rank`` (and K > W) the layout also says where the token rows went, for combine;
    with ``low_memory`` (and large payloads) where each round's rows are (:func:`_pair_rounds`).
    """
    W, rank = group.size(), group.rank()
    T, K = topk_idx.shape
    C = COUNTS + E // W  # the count row's columns; then the round columns
    per_rank = sum_per_rank and K > W  # combine sums per rank
    row_bytes = x.shape[1] * x.element_size()
    if per_rank:
        rounds = _rounds(T, row_bytes, W)
    else:
        rounds = _pair_rounds(T, K, row_bytes) if low_memory else 1
    key = ("before_read", kern.__name__, T, K, topk_idx.dtype, E, W, per_rank, rounds)
    before = functools.partial(_before_read, kern, E, W, per_rank, rounds)

    def outlive(pre) -> list[Tensor]:  # what the op returns of _before_read's outputs
        _, lay, tok, _ = pre
        return [lay.pair_pos, lay.send_pair_idx, *([tok.pos_TW] if per_rank else [])]

    (to_read, lay, tok, pairs_JE), copies = _replay.run(before, key, topk_idx, outlive=outlive)
    if copies is not None:  # replayed: the graph's outputs are overwritten by its next replay
        lay = lay._replace(pair_pos=copies[0], send_pair_idx=copies[1])
        if per_rank:
            tok = tok._replace(pos_TW=copies[2])
    _comm.exchange_counts(to_read[0], group, out=to_read[1])
    host, filled = _comm.read_to_host(
        to_read, lambda: _fill_send(kern, x, lay.pair_pos, tok, W, None)
    )
    sent, got = host.tolist()
    _check_peers(got, rank, topk_idx, E, K, sum_per_rank)
    send_splits = [sum(row[COUNTS:C]) for row in sent]
    recv_splits = [sum(row[COUNTS:C]) for row in got]
    R = sum(recv_splits)
    # The payload exchange first, so that the GPU moves rows while the host queues the rest.
    if tok is None:
        if filled is None:
            filled = _fill_send(kern, x, lay.pair_pos, None, W, send_splits)
        recv = _comm.rows_to_experts(filled, send_splits, recv_splits, group)
    else:
        send_tok = [row[TOKEN_ROWS] for row in sent]
        recv_tok = [row[TOKEN_ROWS] for row in got]
        if filled is None:
            filled = _fill_send(kern, x, lay.pair_pos, tok, W, send_tok)
        recv = _comm.rows_to_experts(filled, send_tok, recv_tok, group)
    del filled  # the send buffer's memory can serve recv_x
    counts_WEl = to_read[1, :, COUNTS:C]
    if tok is None:
        recv_x, recv_perm, tokens_per_expert = kern.regroup_by_expert(recv, counts_WEl, R)
    else:
        max_count = max(max(row[COUNTS:C]) for row in got)
        recv_perm, tokens_per_expert = kern.expert_major_rows(counts_WEl, R, max_count)
        recv_rows, recv_slots = _layout.unpack_rows(recv, x.shape[1], K, tok.slots_TWK.dtype)
        # (received row, slot) pairs by local expert, stably: by expert, then source, token and
        # slot, the order of recv_x (the spare rows' slots are -1)
        by_expert = kern.send_layout(recv_slots, E // W, 1)
        pairs = by_expert.send_pair_idx[:R]
        recv_x = kern.gather_rows(recv_rows, pairs, per_row=K)  # each pair's token row
    if per_rank:
        token_layout = dict(
            token_pos=tok.pos_TW,
            slot_rows=by_expert.send_pos,
            token_send_splits=torch.tensor(send_tok, dtype=torch.int64),
            token_recv_splits=torch.tensor(recv_tok, dtype=torch.int64),
            **_round_layout(tok.pos_TW, to_read[0][:, C:], sent, got, C, send_tok, recv_tok),
        )
    else:
        pairs = (lay, topk_idx, pairs_JE, counts_WEl, sent, got, C, send_splits, recv_splits)
        token_layout = _no_token_layout(x.device, _pair_round_layout(*pairs, group))
    N = sum(send_splits)
    return DispatchOutputs(
        recv_x=recv_x,
        tokens_per_expert=tokens_per_expert,
        send_pair_idx=lay.send_pair_idx[:N],
        pair_pos=lay.pair_pos,
        recv_perm=recv_perm,
        send_splits=torch.tensor(send_splits, dtype=torch.int64),
        recv_splits=torch.tensor(recv_splits, dtype=torch.int64),
        tokens_per_expert_host=host[1, :, COUNTS:C].sum(0),
        **token_layout,
    )


def _before_read(kern, E: int, W: int, per_rank: bool, rounds: int, topk_idx: Tensor) -> tuple:
    """Dispatch's work before the count exchange (W > 1), a function of ``topk_idx`` alone
    (replayed from a CUDA graph: :mod:`moe_ops._replay`): the count rows this rank sends and
    receives (``[2, W, count_width]``, the second filled by the exchange), the
    :class:`~moe_ops._layout.SendLayout`, the :class:`~moe_ops._layout.TokenRows` (K > W, else
    None) and this rank's pairs per round and expert (slot-order rounds, else None)."""
    T, K = topk_idx.shape
    C = COUNTS + E // W
    # the count rows this rank sends and receives, read to the host at once
    to_read = torch.empty((2, W, count_width(E // W, W)), dtype=torch.int64, device=topk_idx.device)
    lay = kern.send_layout(topk_idx, E, W, count_row=to_read[0][:, :C])
    tok = pairs_JE = None
    if K > W:
        tok = kern.token_rows(topk_idx, E, W, rows_out=to_read[0][:, TOKEN_ROWS])
    if per_rank:
        # a scalar kernel argument: no copy from the host
        to_read[0][:, STATUS] += SUMS_PER_RANK * rounds
        if rounds > 1:
            _layout.round_rows(tok.pos_TW, rounds, to_read[0][:, C : C + rounds])
    elif rounds > 1:
        to_read[0][:, STATUS] += PAIR_ROUNDS * rounds
        pairs_JE = _layout.pair_rounds(topk_idx, E, rounds)
        to_read[0][:, C : C + rounds] = pairs_JE.view(rounds, W, E // W).sum(2).t()
    return to_read, lay, tok, pairs_JE


def _round_layout(
    pos_TW: Tensor,
    rows_WJ: Tensor,
    sent: list,
    got: list,
    C: int,
    send_tok: list[int],
    recv_tok: list[int],
) -> dict:
    """:class:`Layout`'s ``round_splits`` and ``round_pos`` from the round columns this rank
    sent (``rows_WJ`` on the device, ``sent`` as read) and received (``got``); none when every
    rank has one round."""
    mine, splits, rounds = _round_splits(sent, got, C, 1, send_tok, recv_tok)
    no_rows = pos_TW.new_empty(0)
    if rounds == 1:  # one round on every rank
        no_pos = pos_TW.new_empty((0, pos_TW.shape[1]))
        return dict(round_splits=splits, round_pos=no_pos, round_rows=no_rows)
    if len(mine[0]) == 1:  # this rank's one round is the whole buffer
        return dict(round_splits=splits, round_pos=pos_TW.clone(), round_rows=no_rows)
    return dict(
        round_splits=splits,
        round_pos=_layout.round_token_pos(pos_TW, rows_WJ[:, : len(mine[0])]),
        round_rows=no_rows,
    )


def _round_splits(
    sent: list, got: list, C: int, part: int, send_totals: list[int], recv_totals: list[int]
) -> tuple[list[list[int]], Tensor, int]:
    """From the count rows as read (``sent``, ``got``; their round columns start at ``C``, the
    rounds are ``status_parts(...)[part]`` of their status): the rows this rank sends each rank
    per round of its own (``mine[d]``; one round: ``send_totals``), :class:`Layout`'s
    ``round_splits`` and the number of rounds."""

    def per_round(rows: list, totals: list[int]) -> list[list[int]]:  # each peer's rounds
        rounds = [status_parts(row[STATUS])[part] for row in rows]
        return [
            row[C : C + n] if n > 1 else [total]
            for row, n, total in zip(rows, rounds, totals, strict=True)
        ]

    W = len(sent)
    splits = torch.full((2, round_columns(W), W), -1, dtype=torch.int64)
    if all(row[STATUS] < SUMS_PER_RANK for row in got):  # no rank has rounds of either kind
        return [[total] for total in send_totals], splits, 1
    mine, theirs = per_round(sent, send_totals), per_round(got, recv_totals)
    rounds = max(len(r) for r in theirs)  # the same on every rank: got holds every rank's rounds
    if rounds == 1:
        return mine, splits, rounds
    splits[0, : len(mine[0])] = torch.tensor(mine, dtype=torch.int64).t()
    splits[1, :rounds] = 0
    for s, rows_j in enumerate(theirs):
        splits[1, : len(rows_j), s] = torch.tensor(rows_j, dtype=torch.int64)
    return mine, splits, rounds


def _pair_round_layout(
    lay, topk_idx, pairs_JE, counts_WEl, sent, got, C, send_splits, recv_splits, group
) -> dict:
    """:class:`Layout`'s round fields in slot order (the count rows as read: ``sent``, ``got``;
    ``pairs_JE``: this rank's pairs per round and expert when it has rounds). When some rank has
    rounds, each rank sends every rank its pairs per (local expert, round), which says where
    each round's rows are in expert_out (one small exchange, after the payload's)."""
    _, splits, rounds = _round_splits(sent, got, C, 2, send_splits, recv_splits)
    K = topk_idx.shape[1]
    if rounds == 1:  # on every rank
        i64 = dict(dtype=torch.int64, device=topk_idx.device)
        empty = dict(round_pos=torch.empty((0, K), **i64), round_rows=torch.empty(0, **i64))
        return dict(round_splits=splits, **empty)
    W, E_l = counts_WEl.shape
    if pairs_JE is None:  # this rank's one round: every pair
        pairs_JE = lay.counts_bad[: W * E_l].view(1, W * E_l)
    send_WElJ = pairs_JE.new_zeros((W, E_l, rounds))
    send_WElJ[:, :, : pairs_JE.shape[0]] = pairs_JE.view(-1, W, E_l).permute(1, 2, 0)
    got_WElJ = _comm.exchange_counts(send_WElJ.view(W, -1), group).view(W, E_l, rounds)
    return dict(
        round_splits=splits,
        round_pos=_layout.round_pair_pos(lay.send_pos, topk_idx, pairs_JE, W),
        round_rows=_layout.round_buffer_rows(got_WElJ, sum(recv_splits)),
    )


def _fill_send(kern, x: Tensor, pair_pos: Tensor, tok, W: int, rows_W: list[int] | None):
    """Dispatch's send buffer at W > 1: the rows once per (token, slot), or, given
    :class:`~moe_ops._layout.TokenRows` ``tok``, once per (token, rank), each with its slots in
    front (``moe_ops._layout.slot_columns``: one exchange carries both); a spare row after each
    destination's chunk. Sized for every row that could be sent when ``rows_W`` is None, else
    for exactly ``rows_W`` rows per destination."""
    T, K = pair_pos.shape
    if tok is None:
        M = (T * K if rows_W is None else sum(rows_W)) + W
        return kern.scatter_rows(x, pair_pos, None, M)
    M = (T * min(W, K) if rows_W is None else sum(rows_W)) + W
    H, slot_dtype = x.shape[1], tok.slots_TWK.dtype
    buf = x.new_empty((M, _layout.slot_columns(H, K, x.dtype, slot_dtype) + H))
    rows, slots = _layout.unpack_rows(buf, H, K, slot_dtype)
    slots.fill_(-1)  # the spare rows' slots are read on arrival: -1, no slot
    kern.scatter_rows(x, tok.pos_TW, None, M, out=rows)
    kern.scatter_rows(tok.slots_TWK, tok.pos_TW.reshape(-1, 1), None, M, out=slots)
    return buf


def _check_peers(got: list, rank: int, topk_idx: Tensor, E: int, K: int, per_rank: bool) -> None:
    """After the count read: raise on this rank's bad ids, on a peer's bad input, and when the
    ranks disagree on sending rows once per (token, rank) (their K differ) or on summing per
    rank."""
    status_W = [status_parts(row[STATUS])[0] for row in got]
    if status_W[rank]:
        raise bad_id_error(topk_idx, E)
    _comm.raise_if_peer_bad(status_W, rank, "dispatch")
    per_token = [row[TOKEN_ROWS] >= 0 for row in got]
    if len(set(per_token)) > 1:
        raise ValueError(
            f"moe_ops.dispatch: the ranks of the group passed topk_idx with different numbers of "
            f"slots K (this rank: K={K}; rank(s) {[r for r, p in enumerate(per_token) if p]} "
            f"have K > W, the others not); pass [T, K] with the same K on every rank"
        )
    if per_token[rank]:
        summing = [status_parts(row[STATUS])[1] > 0 for row in got]
        if len(set(summing)) > 1:
            raise ValueError(
                f"moe_ops.dispatch: the ranks of the group passed different sum_per_rank (this "
                f"rank: {per_rank}; rank(s) {[r for r, p in enumerate(summing) if p]} passed "
                f"True); pass the same value on every rank"
            )


@dispatch_op.register_fake
def _(x, topk_idx, num_experts, group_name, world_size, sum_per_rank=False, low_memory=False):
    err = check_dispatch(x, topk_idx, num_experts, world_size)
    if err is not None:
        raise err
    T, K = topk_idx.shape
    ctx = torch.library.get_ctx()
    N = ctx.new_dynamic_size()
    torch._check(N <= T * K)
    if world_size == 1:
        R, perm_rows = N, 0
    else:
        # R is written as recv_perm's length minus W, not the other way round: the backward
        # graphs get recv_perm (saved) but not always a tensor of R rows, and a compiler can
        # only name the rows of what it is given (inductor cannot solve "R + W" for R)
        perm_rows = ctx.new_dynamic_size(min=world_size)
        R = perm_rows - world_size
    i64 = dict(dtype=torch.int64, device=x.device)
    cpu64 = dict(dtype=torch.int64, device="cpu")
    W = world_size
    if W == 1:
        token_layout = _no_token_layout(x.device)
    else:
        per_rank = sum_per_rank and K > W
        rounds = dict(
            round_splits=torch.empty((2, round_columns(W), W), **cpu64),
            # rounds or not is known after the count exchange: T rows or none
            round_pos=torch.empty((ctx.new_dynamic_size(), W if per_rank else K), **i64),
            round_rows=torch.empty(0 if per_rank else ctx.new_dynamic_size(), **i64),
        )
        token_layout = _no_token_layout(x.device, rounds)
        if per_rank:
            Rt_W = ctx.new_dynamic_size()  # token rows received, plus the W spare rows
            torch._check(Rt_W >= W)
            token_layout.update(
                token_pos=torch.empty((T, W), **i64),
                slot_rows=torch.empty((Rt_W, K), **i64),
                token_send_splits=torch.empty(W, **cpu64),
                token_recv_splits=torch.empty(W, **cpu64),
            )
    return DispatchOutputs(
        recv_x=x.new_empty((R, x.shape[1])),
        tokens_per_expert=torch.empty(num_experts // world_size, **i64),
        send_pair_idx=torch.empty(N, **i64),
        pair_pos=torch.empty((T, K), **i64),
        recv_perm=torch.empty(perm_rows, **i64),
        send_splits=torch.empty(world_size, **cpu64),
        recv_splits=torch.empty(world_size, **cpu64),
        tokens_per_expert_host=torch.empty(num_experts // world_size, **cpu64),
        **token_layout,
    )


# ----------------------------------------------------------------------------- combine
# Combine sums each token's rows in slot order on the token's rank (one row per pair comes back),
# or, when dispatch was asked to (``sum_per_rank``, K > W), per rank first: the routing weights
# travel to the experts' ranks, each rank sums the weighted rows of every token row it received
# in slot order, and one row per (token, rank) comes back, summed in rank order. Both exchanges
# run whatever the weights (ones when None) and whatever gradients are wanted, so that the ranks
# always issue the same collectives.


def _combine(
    expert_out: Tensor, topk_weights: Tensor | None, *layout_group
) -> tuple[Tensor, Tensor]:
    """``layout_group``: the :class:`Layout` fields, then group_name, world_size and optionally
    ``unweighted`` and ``keep_rows`` (the op's schema: ``_COMBINE_SCHEMA``)."""
    lay, group_name, world_size, unweighted, keep_rows = _split(layout_group)
    pair_pos, send_pair_idx, recv_perm = lay.pair_pos, lay.send_pair_idx, lay.recv_perm
    group = _comm.resolve_group(group_name, world_size)
    R = num_recv_rows(send_pair_idx, recv_perm, world_size)
    err = check_combine(expert_out, topk_weights, pair_pos, R)
    if group is None:  # no row moves: the backward reads expert_out itself
        if err is not None:
            raise err
        kern = _kernels.for_device(expert_out.device)
        return _autograd.combine_tail(kern, expert_out, expert_out, pair_pos, topk_weights, False)
    keep = keep_rows and topk_weights is not None
    if err is not None:  # still complete the exchange with the right sizes, flagged bad
        width = expert_out.shape[-1] if expert_out.dim() >= 1 else 1
        dtype = expert_out.dtype if expert_out.dtype in FLOAT_DTYPES else torch.float32
        expert_out = torch.empty((R, width), dtype=dtype, device=pair_pos.device)
        topk_weights = None
    kern = _kernels.for_device(pair_pos.device)
    if lay.sums_per_rank:
        args = (expert_out, topk_weights, lay, err is not None, unweighted, group)
        out, recv_w = _combine_per_rank(*args)
        if err is not None:
            raise err
        return out, recv_w
    H = expert_out.shape[1]
    kept = expert_out.new_empty((send_pair_idx.shape[0] + world_size, H)) if keep else None
    if lay.round_rows.shape[0] > 0:  # in rounds
        out = _in_rounds(kern, expert_out, topk_weights, lay, err is not None, group, kept)
        if err is not None:
            raise err
        return out, expert_out.new_empty((0, H)) if kept is None else kept
    rows = _comm.rows_to_sources(
        expert_out,
        lay.send_splits.tolist(),
        lay.recv_splits.tolist(),
        recv_perm,
        err is not None,
        group.rank(),
        group,
        "combine",
        kern,
        kept,
    )
    if err is not None:
        raise err
    return _autograd.combine_tail(kern, rows, expert_out, pair_pos, topk_weights, keep)


def _in_rounds(
    kern, expert_out: Tensor, topk_weights, lay: Layout, bad: bool, group, kept: Tensor | None
) -> Tensor:
    """Combine in slot order, in rounds: in round j each rank sends back the rows of the
    sources' round j (``lay.round_rows``; the status rows go with the first) and sums what came
    back into the rows of its own round-j tokens; the same sums as in one exchange. The rows
    that came back are kept in ``kept`` if given (``[N + W]``, round after round), else freed
    per round."""
    W, H = group.size(), expert_out.shape[1]
    start = 0  # the next round's rows in lay.round_rows

    def rows_of_round(j: int, recv_j: list[int]) -> Tensor:
        nonlocal start
        n = sum(recv_j) + (W if j == 0 else 0)
        idx = lay.round_rows[start : start + n]
        start += n
        if bad:
            return expert_out.new_empty((n, H))
        # the status rows (-1) come out 0: "good"
        return kern.gather_rows(expert_out, idx, negative=True)

    out = expert_out.new_empty((lay.pair_pos.shape[0], H))
    sends, recvs = lay.round_splits.tolist()  # CPU values: no sync
    args = (kern, rows_of_round, sends, recvs, lay.round_pos, topk_weights, out, bad, group)
    return _rounds_back(*args, kept=kept, status_each_round=False, ahead=True)


def _rounds_back(
    kern,
    rows_of_round,
    sends: list[list[int]],
    recvs: list[list[int]],
    pos_T: Tensor,
    weights: Tensor | None,
    out: Tensor,
    bad: bool,
    group,
    *,
    kept: Tensor | None = None,
    status_each_round: bool = True,
    ahead: bool = False,
) -> Tensor:
    """Combine's exchanges back in rounds (``sends``, ``recvs``: ``Layout.round_splits``; one
    round when they have one row): round j exchanges ``rows_of_round(j, recv_j)`` (laid out
    source-major with a status row after each source's chunk, in the first round only unless
    ``status_each_round``) and sums what came back into ``out``'s rows of this rank's round-j
    tokens (``pos_T`` their rows in the round's buffer, times ``weights``), then frees it, or
    keeps it in ``kept``, round after round. On the CPU a peer's bad input is raised once every
    round is done.

    One round at a time holds two buffers (the rows sent, the rows back). With ``ahead`` round
    j + 1's rows are made while round j's exchange runs, and its exchange runs while round j is
    summed: three buffers, and the exchanges back to back."""
    W, T = len(sends[0]), out.shape[0]
    mine = sum(row[0] >= 0 for row in sends)  # this rank's rounds
    rounds = max(1, sum(row[0] >= 0 for row in recvs))
    at = 0  # the next round's rows in kept

    def prepare(j: int) -> tuple:
        return j, rows_of_round(j, recvs[j])

    def start(ready: tuple) -> tuple:
        nonlocal at
        j, rows = ready
        send_j = sends[j] if j < mine else [0] * W
        recv_j = recvs[j]
        with_status = status_each_round or j == 0
        spares = _comm.spare_rows(recv_j, rows.device) if bad and with_status else None
        n_back = sum(send_j) + (W if with_status else 0)
        into = None if kept is None else kept[at : at + n_back]
        at += n_back
        args = (rows, send_j, recv_j, spares, bad, not bad, group)
        back, work = _comm.start_rows_back(*args, out=into, with_status=with_status, beside=ahead)
        return j, back, work, send_j, with_status

    flags = []  # the peers' status rows, CPU only
    pending = start(prepare(0))
    while pending is not None:
        j, back, work, send_j, with_status = pending
        pending = None
        ready = prepare(j + 1) if ahead and j + 1 < rounds else None
        work.wait()
        del work  # the rows sent can go
        if with_status and back.device.type == "cpu":
            flags.append(_comm.peer_status(back, send_j))
        if ready is not None:
            pending, ready = start(ready), None
        t0, t1 = (min(T, -(-i * T // mine)) for i in (j, j + 1))
        if t1 > t0:
            w = None if weights is None else weights[t0:t1]
            kern.combine_rows(back, pos_T[t0:t1], w, out.dtype, out=out[t0:t1])
        del back  # summed: its memory can serve the next round
        if not ahead and j + 1 < rounds:
            pending = start(prepare(j + 1))
    for st in flags:
        _comm.raise_if_peer_bad(st, group.rank(), "combine")
    return out


def _combine_per_rank(
    expert_out: Tensor, topk_weights: Tensor | None, lay: Layout, bad: bool, unweighted, group
) -> tuple[Tensor, Tensor]:
    """Combine summing per rank: returns ``out[T, H']`` and the weights received with the token
    rows (``[Rt + W, K]``), which the backward needs."""
    kern = _kernels.for_device(expert_out.device)
    send_tok, recv_tok = lay.token_send_splits.tolist(), lay.token_recv_splits.tolist()
    W = len(send_tok)
    recv_w = _autograd.per_rank_weights(
        kern,
        expert_out,
        topk_weights,
        lay.token_pos,
        sum(send_tok) + W,
        tuple(lay.slot_rows.shape),
        lambda w_rows: _comm.rows_to_experts(w_rows, send_tok, recv_tok, group),
        unweighted,
    )
    return _sum_back(kern, expert_out, recv_w, lay, bad, group), recv_w


def _sum_back(kern, expert_out: Tensor, recv_w: Tensor, lay: Layout, bad: bool, group) -> Tensor:
    """Each token row's weighted slots summed on this rank (in slot order; the spare rows,
    which have no slot, come out 0: the status "input good", see ``_comm.rows_back``), sent back
    and summed over ranks per token. For large payloads in rounds (``lay.round_splits``): in
    round j each rank sums the token rows it received in the sources' round j, sends them, and
    sums what came back into the rows of its own round-j tokens, each round's buffers freed
    before the next; the same sums in the same order as in one exchange."""
    send_tok, recv_tok = lay.token_send_splits.tolist(), lay.token_recv_splits.tolist()
    W, T = len(send_tok), lay.token_pos.shape[0]
    sends, recvs = lay.round_splits.tolist()  # CPU values: no sync
    if recvs[1][0] < 0:  # one round: the whole buffers
        sends, recvs, pos = [send_tok], [recv_tok], lay.token_pos
    else:
        pos = lay.round_pos
    one_round = len(recvs) == 1
    # where each source's chunk starts in the received token rows, and its spare row
    src_start = [sum(recv_tok[:s]) + s for s in range(W)]
    spare = [a + n for a, n in zip(src_start, recv_tok, strict=True)]
    done = [0] * W  # rows of each source's chunk in earlier rounds

    def rows_of_round(_, recv_j: list[int]) -> Tensor:
        if one_round:
            slots_j, w_j = lay.slot_rows, recv_w
        else:  # the rows received in round j by source, each source's spare row after them
            pieces = []
            for s in range(W):
                a = src_start[s] + done[s]
                pieces += [slice(a, a + recv_j[s]), slice(spare[s], spare[s] + 1)]
                done[s] += recv_j[s]
            slots_j = torch.cat([lay.slot_rows[p] for p in pieces])
            w_j = torch.cat([recv_w[p] for p in pieces])
        return kern.combine_rows(expert_out, slots_j, w_j, expert_out.dtype)

    out = expert_out.new_empty((T, expert_out.shape[1]))
    return _rounds_back(kern, rows_of_round, sends, recvs, pos, None, out, bad, group)


def _split(layout_group: tuple) -> tuple[Layout, str, int, bool, bool]:
    """combine's arguments after ``topk_weights``: the :class:`Layout`, group_name, world_size,
    ``unweighted`` and ``keep_rows`` (False and True when not given; the backward takes
    neither)."""
    n = len(Layout._fields)
    group_name, world_size, *options = layout_group[n:]
    unweighted, keep_rows = [*options, *(False, True)[len(options) :]]
    return Layout(*layout_group[:n]), group_name, world_size, bool(unweighted), bool(keep_rows)


_LAYOUT_ARGS = ", ".join(f"Tensor {name}" for name in Layout._fields)
# unweighted: every rank passes topk_weights=None (dispatch's backward), so a combine that sums
# per rank sends no weights. keep_rows: return the rows that came back, which the weight
# gradient needs (at W > 1 in slot order, when weights are given); a caller that wants no
# weight gradient passes False and they are freed as soon as summed. Neither changes which
# collectives run.
_COMBINE_SCHEMA = (
    f"(Tensor expert_out, Tensor? topk_weights, {_LAYOUT_ARGS}, str group_name, "
    f"SymInt world_size, bool unweighted=False, bool keep_rows=True) -> (Tensor, Tensor)"
)
combine_op = torch.library.custom_op(
    "moe_ops::combine", mutates_args=(), tags=_NOT_CUDAGRAPH_SAFE, schema=_COMBINE_SCHEMA
)(_combine)


@combine_op.register_fake
def _(expert_out, topk_weights, *layout_group):
    lay, _, world_size, _, keep_rows = _split(layout_group)
    R = num_recv_rows(lay.send_pair_idx, lay.recv_perm, world_size)
    err = check_combine(expert_out, topk_weights, lay.pair_pos, R)
    if err is not None:
        raise err
    torch._check(
        expert_out.shape[0] == R,
        lambda: "moe_ops.combine: expert_out must have one row per row of recv_x",
    )
    if lay.sums_per_rank:
        out, _ = _autograd.fake_combine(expert_out, lay.pair_pos, 0)
        dtype = acc_dtype(expert_out.dtype)
        return out, expert_out.new_empty(tuple(lay.slot_rows.shape), dtype=dtype)
    keep = world_size > 1 and keep_rows and topk_weights is not None
    M = lay.send_pair_idx.shape[0] + world_size if keep else 0
    return _autograd.fake_combine(expert_out, lay.pair_pos, M)


def _combine_backward(
    grad_out: Tensor, returned_rows: Tensor | None, topk_weights: Tensor | None, *layout_group
) -> tuple[Tensor, Tensor]:
    """Combine's gradients: w.r.t. expert_out; w.r.t. topk_weights if ``returned_rows`` is given.
    ``layout_group`` as for :func:`_combine`.

    Summing per rank, ``returned_rows`` is expert_out itself and ``topk_weights`` the weights
    that reached this rank with the token rows (what :func:`_for_backward` saved)."""
    lay, group_name, world_size, *_ = _split(layout_group)
    group = _comm.resolve_group(group_name, world_size)
    kern = _kernels.for_device(grad_out.device)
    if group is not None and lay.sums_per_rank:
        return _combine_backward_per_rank(kern, grad_out, returned_rows, topk_weights, lay, group)
    grad_expert_out = _to_experts(kern, grad_out, topk_weights, lay, group)
    if returned_rows is not None and lay.round_rows.shape[0] > 0:  # they came back in rounds
        return grad_expert_out, _round_weight_grad(kern, grad_out, returned_rows, topk_weights, lay)
    grad_w = _autograd.weight_grad(kern, grad_out, returned_rows, lay.pair_pos, topk_weights)
    return grad_expert_out, grad_w


def _round_weight_grad(kern, grad_out: Tensor, kept: Tensor, topk_weights, lay: Layout) -> Tensor:
    """The weight gradient from the rows that came back in rounds (:func:`_in_rounds`), round
    by round."""
    sends = lay.round_splits[0].tolist()
    W, T = len(sends[0]), grad_out.shape[0]
    mine = sum(row[0] >= 0 for row in sends)
    at, pieces = 0, []
    for j in range(mine):
        t0, t1 = (min(T, -(-i * T // mine)) for i in (j, j + 1))
        n = sum(sends[j]) + (W if j == 0 else 0)  # the status rows came with the first round
        pos = lay.round_pos[t0:t1]
        pieces.append(kern.slot_dot(grad_out[t0:t1], kept[at : at + n], pos, topk_weights.dtype))
        at += n
    return torch.cat(pieces)


def _combine_backward_per_rank(
    kern, grad_out: Tensor, expert_out: Tensor | None, recv_w: Tensor, lay: Layout, group
) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`_combine_per_rank`: ``grad_out``'s token rows go to the experts'
    ranks (as dispatch's payload did), each becomes its slots' rows times their weights there,
    and the weight gradient comes back as one ``[K]`` row per (token, rank) (zeros when
    ``expert_out`` is None: not asked for here, but the exchange runs on every rank)."""
    send_tok, recv_tok = lay.token_send_splits.tolist(), lay.token_recv_splits.tolist()
    W = len(send_tok)
    R = num_recv_rows(lay.send_pair_idx, lay.recv_perm, W)
    g_rows = kern.scatter_rows(grad_out, lay.token_pos, None, sum(send_tok) + W)
    g_recv = _comm.rows_to_experts(g_rows, send_tok, recv_tok, group)
    del g_rows
    grad_expert_out = kern.scatter_rows(g_recv, lay.slot_rows, recv_w, R)

    def sum_back(gw_recv):  # like the partial sums: the spare rows have no slot (0, "input good")
        rank = group.rank()
        rows = _comm.rows_back(
            gw_recv, send_tok, recv_tok, None, False, rank, group, "combine", True
        )
        return kern.combine_rows(rows, lay.token_pos, None, gw_recv.dtype)

    grad_w = _autograd.per_rank_weight_grad(
        kern, g_recv, expert_out, recv_w, lay.slot_rows, sum_back
    )
    return grad_expert_out, grad_w


_COMBINE_BACKWARD_SCHEMA = (
    f"(Tensor grad_out, Tensor? returned_rows, Tensor? topk_weights, {_LAYOUT_ARGS}, "
    f"str group_name, SymInt world_size) -> (Tensor, Tensor)"
)
combine_backward_op = torch.library.custom_op(
    "moe_ops::_combine_backward",
    mutates_args=(),
    tags=_NOT_CUDAGRAPH_SAFE,
    schema=_COMBINE_BACKWARD_SCHEMA,
)(_combine_backward)


@combine_backward_op.register_fake
def _(grad_out, returned_rows, topk_weights, *layout_group):
    lay, _, world_size, *_ = _split(layout_group)
    R = num_recv_rows(lay.send_pair_idx, lay.recv_perm, world_size)
    return _autograd.fake_combine_backward(grad_out, returned_rows, topk_weights, lay.pair_pos, R)


def _for_backward(expert_out, topk_weights, returned_rows, layout, static) -> tuple:
    """What combine saves for its backward, as (rows, weights): see :func:`_combine_backward`."""
    if static[-1] == 1:  # world_size == 1: no row moved, the weight gradient reads expert_out
        return expert_out, topk_weights
    if Layout(*layout).sums_per_rank:
        return expert_out, returned_rows
    # no rows when combine ran with keep_rows=False (no weight gradient wanted)
    return (returned_rows if returned_rows.shape[0] > 0 else None), topk_weights


# what moe_ops.dispatch and moe_ops.combine call in the default mode
DIRECT = _autograd.register(
    dispatch_op,
    _autograd.Mode(
        combine=combine_op,
        combine_backward=combine_backward_op,
        num_layout=len(Layout._fields),
        num_static=2,  # group_name, world_size
        dispatch_layout=lambda output: DispatchOutputs(*output).layout(),
        dispatch_static=lambda inputs: tuple(inputs[3:5]),
        for_backward=_for_backward,
    ),
    dispatch_impl=_dispatch,
    combine_impl=_combine,
    combine_backward_impl=_combine_backward,
)
