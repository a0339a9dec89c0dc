"""Capacity mode: dispatch and combine with fixed-size buffers and no device -> host sync.

Ops ``moe_ops::dispatch_fixed``, ``moe_ops::combine_fixed`` and
``moe_ops::_combine_fixed_backward``. Every output shape depends only on the input shapes, W and
the capacity C (rows this rank can receive), so the fake kernels return no unbacked sizes and a
layer can be captured in a CUDA graph. Shape letters: see ``moe_ops._layout``; ``S`` below is the
rows per peer of the padded transport.

Which pairs are kept: the receiver lays its rows out expert-major (local expert, then source
rank, then token, then slot), as in the default mode; rows at positions ``>= C`` of that order
do not fit. Every rank learns every rank's counts per expert (one all-gather of ``[E + 3]``
int64 per rank, on the device: the counts, bad ids, T, and K when summing per rank), so a sender
knows which of its own pairs fit without asking: kept pairs of one (destination, expert) are a
prefix of them in pair order (``moe_ops._layout.FixedPlan``).

Transports (the rows' way to their experts and back):

* ``"local"``: W = 1, nothing moves; ``recv_x`` is the send buffer.
* ``"padded"``: one ``all_to_all_single`` with ``S = min(C, T * K)`` rows per peer each way
  (every rank must pass the same T when ``C > T * K``): sizes known in advance, so it works with
  gloo and NCCL, at the price of moving ``W * S`` rows instead of the real count.
  With ``sum_per_rank`` (K > 1) the rows are token rows: ``S = min(C, T)`` per peer (every rank
  must pass the same T when ``C > T``, and the same K), each carrying the rows of recv_x its
  slots take (K int64 in its first columns), and combine sends the weights, then one partial
  sum per token row back (see :class:`Layout`).
* ``"p2p"``: the same chunks as ``"padded"`` (same layouts, same results), moved without NCCL:
  each rank's kernels write what it sends into its own CUDA symmetric-memory buffer and every
  rank reads its chunks from its peers' buffers after a device-side barrier
  (``moe_ops._comm.EqualChunks``; CUDA, W > 1, one NVLink domain).
* ``"nvshmem"``: ``torch.ops.symm_mem.all_to_all_vdev_2d`` (rows with device-side split sizes,
  received expert-major) and ``all_to_all_vdev_2d_offset`` for the way back, through persistent
  symmetric-memory buffers (CUDA, NVSHMEM; every rank must pass the same T).

What the ops return, in order: :class:`DispatchOutputs` and :class:`Layout` (what combine
takes); their autograd is the shared one (``moe_ops._autograd``).

CUDA graphs: on every transport, forward and backward, Triton or plain torch path, nothing here
syncs with the host or copies from host memory: host ints (T, flags) enter kernels as scalar
arguments (``torch.full``, ``fill_``, arithmetic), sizes are static (``repeat_interleave`` with
``output_size``, no boolean-mask indexing, no ``nonzero``/``bincount``), and bad input or
overflow is reported on CUDA by ``torch._assert_async``. Warm up once before capturing (Triton
compiles, NCCL communicators and NVSHMEM buffers are created on first use).

``combine_fixed(expert_out[C, H'], topk_weights?, *Layout, capacity, group_name, world_size,
transport, unweighted=False)`` returns ``out[T, H']`` and the rows that came back (``[W * S, H']``
padded, ``[T * K, H']`` nvshmem, ``[0, H']`` local), which its backward needs for the weight
gradient;
with ``sum_per_rank`` the second output is the weights that reached this rank with the token
rows (``[W * S, K]``, in the accumulation dtype of expert_out), which the backward needs with
expert_out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from moe_ops import _autograd, _comm, _kernels, _layout
from moe_ops._checks import bad_id_error, check_combine, check_dispatch
from moe_ops._layout import chunk_rows, excl_cumsum

_I64 = torch.int64
TRANSPORTS = ("local", "padded", "p2p", "nvshmem")
EQUAL_CHUNKS = ("padded", "p2p")  # the transports that move S rows per peer


class Layout(NamedTuple):
    """What combine_fixed (and both backwards) take from dispatch_fixed, in combine's order.

    pair_pos     [T, K]        int64, row of each pair in the buffer combine gets back, -1 if
                               unused or dropped
    recv_index   [C]           int64 ("padded"): row of the received buffer for each row of
                               recv_x ([0] otherwise)
    num_recv     [1]           int64, R
    splits       [3, W * E_l]  int64 ("nvshmem"): rows sent per (destination, expert), then
                               received splits and offsets per (expert, source) ([0, 0] otherwise)

    With ``sum_per_rank`` (padded or p2p transport, K > 1; else both ``[0, 0]``), rows travel once
    per (token, rank) in chunks of ``S = min(C, T)`` rows per peer, and ``pair_pos`` is the row of
    each kept pair in recv_x on its expert's rank:

    token_pos    [T, W]        int64, row of token t in this rank's token-row buffers (chunk of
                               rank d first), -1 when none of its kept pairs goes to rank d
    slot_rows    [W * S, K]    int64, for each token row received (source-major) the row of
                               recv_x of each of its slots, -1 for slots not kept here
    """

    pair_pos: Tensor
    recv_index: Tensor
    num_recv: Tensor
    splits: Tensor
    token_pos: Tensor
    slot_rows: Tensor

    @property
    def sums_per_rank(self) -> bool:
        """Combine sums slots per rank (the layout has token rows); a static fact of the shapes."""
        return self.token_pos.shape[1] > 0


class DispatchOutputs(NamedTuple):
    """What ``dispatch_fixed(x[T, H], topk_idx[T, K], num_experts, capacity, drop, group_name,
    world_size, transport, sum_per_rank)`` returns.

    recv_x             [C, H]  rows for this rank's experts, expert-major; rows >= R are zero
    tokens_per_expert  [E_l]   int64, kept rows per local expert (sum R <= C)
    num_dropped        []      int64, this rank's (token, slot) pairs that did not fit
    pair_pos, recv_index, num_recv, splits, token_pos, slot_rows: see :class:`Layout`
    """

    recv_x: Tensor
    tokens_per_expert: Tensor
    num_dropped: Tensor
    pair_pos: Tensor
    recv_index: Tensor
    num_recv: Tensor
    splits: Tensor
    token_pos: Tensor
    slot_rows: Tensor

    def layout(self) -> Layout:
        return Layout(*(getattr(self, name) for name in Layout._fields))


def sums_per_rank(world_size: int, K: int, transport: str, sum_per_rank: bool) -> bool:
    """Whether ``sum_per_rank`` changes anything: with the padded or p2p transport and K > 1
    (nvshmem, and one slot per token, send pair rows)."""
    return sum_per_rank and world_size > 1 and K > 1 and transport in EQUAL_CHUNKS


def token_chunk_rows(capacity: int, T: int) -> int:
    """S with ``sum_per_rank``: rows per peer of the token rows. A rank sends a token to a peer
    only for kept pairs, and the peer keeps at most C rows."""
    return chunk_rows(capacity, T, 1)


def back_rows(transport: str, capacity: int, T: int, K: int, W: int) -> int:
    """Rows that come back to a rank in combine_fixed (its ``returned_rows``) when it sums in
    slot order."""
    if transport in EQUAL_CHUNKS:
        return W * chunk_rows(capacity, T, K)
    if transport == "nvshmem":
        return T * K
    return 0


def _chunks(group_name: str, world_size: int, transport: str, op: str, exchanges: int):
    """The ``exchanges`` exchanges of one call of ``op`` (:class:`~moe_ops._comm.EqualChunks`,
    None when no row moves): through a one-rank group too, when a transport other than
    ``"local"`` was asked for at W = 1."""
    if transport != "local" and world_size == 1 and group_name:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
    else:
        group = _comm.resolve_group(group_name, world_size)
    if group is None:
        return None
    return _comm.EqualChunks(group, group_name, transport, op, exchanges)


def _send_memory(chunks, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Where the next exchange's rows are written: the p2p transport's buffer, which peers read
    directly (:meth:`~moe_ops._comm.EqualChunks.send_buffer`), else fresh memory."""
    buf = None if chunks is None else chunks.send_buffer(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf


def _done(chunks, result):
    """``result``, after :meth:`~moe_ops._comm.EqualChunks.done`'s check (no check when no row
    moves)."""
    return result if chunks is None else chunks.done(result)


# ----------------------------------------------------------------------------- layout
def _no_token_layout(device: torch.device) -> tuple[Tensor, Tensor]:
    """``token_pos`` and ``slot_rows`` when combine sums in slot order."""
    return tuple(torch.zeros((0, 0), dtype=_I64, device=device) for _ in range(2))


def _layout_fixed(topk_idx_TK, E, C, W, rank, transport, bad_input, per_rank, checks, chunks, kern):
    """Everything dispatch_fixed returns but the rows (with ``per_rank``, :func:`sums_per_rank`,
    not ``pair_pos``, ``token_pos`` and ``slot_rows`` either: None, see
    :func:`_tokens_to_experts`), the :class:`~moe_ops._layout.FixedPlan`, every rank's count row
    (for the checks) and the pairs' send order."""
    T, K = topk_idx_TK.shape
    dev = topk_idx_TK.device
    lay = kern.send_layout(topk_idx_TK, E, 1)
    # This rank's count row: counts per expert, bad ids, T, sum_per_rank. Host values reach the
    # device as kernel arguments (fill, add), never as a tensor built from host memory: that
    # copy would sync, and fails in CUDA-graph capture.
    bad, T_col, per_rank_col = (E + c for c in _layout.FIXED_COLUMNS)
    n = E + len(_layout.FIXED_COLUMNS)
    row = _send_memory(chunks if W > 1 else None, (1, n), _I64, dev).view(n)  # W = 1: no gather
    row[: E + 1].copy_(lay.counts_bad)  # the counts, then the bad-id count (FIXED_BAD is 0)
    if bad_input:
        row[bad : bad + 1].add_(1)
    row[T_col : T_col + 1].fill_(T)
    row[per_rank_col : per_rank_col + 1].fill_(K if per_rank else 0)  # the slots' width
    every = row.view(1, -1) if W == 1 else chunks.gather(row)
    plan = kern.fixed_plan(every, E, C, rank, 1 if per_rank else K, checks)
    recv_index = torch.zeros(0, dtype=_I64, device=dev)
    splits = torch.zeros((0, 0), dtype=_I64, device=dev)
    if per_rank:  # the token rows come with the payload (_tokens_to_experts)
        pair_pos, token_layout = None, (None, None)
    else:
        # each pair's row in the buffer its rows travel in: chunks of S rows per destination
        # (padded), else recv_x's order, expert-major (local, nvshmem)
        g, j, keep = _layout.kept_pairs(topk_idx_TK, lay.send_pos, plan)
        if transport in EQUAL_CHUNKS:
            S = chunk_rows(C, T, K)
            kept_de = plan.kept_E.view(W, E // W)
            base_E = excl_cumsum(kept_de, 1) + torch.arange(W, device=dev)[:, None] * S
            recv_index = _padded_recv_index(plan, C, S)
        else:
            base_E = excl_cumsum(plan.kept_E, 0)
        if transport == "nvshmem":
            splits = torch.zeros((3, E), dtype=_I64, device=dev)
            splits[0] = plan.kept_E
        pair_pos = torch.where(keep, base_E.reshape(E)[g] + j, -1)
        token_layout = _no_token_layout(dev)
    out = (plan.tokens_per_expert, plan.num_dropped, pair_pos, recv_index, plan.num_recv, splits)
    return out + token_layout, plan, every, lay.send_pos


def _padded_recv_index(plan, C: int, S: int) -> Tensor:
    """``recv_index`` of the padded transport in slot order: for each row of recv_x, its row in
    the received buffer (source-major chunks of S rows, each expert-major)."""
    kept_se = plan.kept_se
    W = kept_se.shape[0]
    dev = kept_se.device
    base_se = excl_cumsum(kept_se, 1) + torch.arange(W, device=dev)[:, None] * S
    kc = kept_se.t().reshape(-1)  # chunks in expert-major order (expert, source)
    shift = base_se.t().reshape(-1) - excl_cumsum(kc, 0)
    pad = (C - plan.num_recv).clamp(min=0)
    reps = torch.cat([kc, pad])
    shift_C = torch.repeat_interleave(torch.cat([shift, pad * 0]), reps, output_size=C)
    rows_C = torch.arange(C, device=dev)
    return torch.where(rows_C < plan.num_recv, rows_C + shift_C, 0)


# The checks of the plan's ``ok`` flags (``FixedPlan.ok[i]`` is check i), as the one device
# assertion words them (CUDA takes messages of under 255 characters); on the CPU each raises its
# own error, with the values (:func:`_raise_on_cpu`).
_CHECKS = (
    "an expert id not in [0, num_experts) or -1",
    "unequal T across ranks at capacity > T * K",
    "unequal sum_per_rank or K across ranks",
    "capacity too small (overflow='error')",
)


def _asked_checks(W: int, drop: bool, transport: str) -> int:
    """Which checks of ``_CHECKS`` apply (bit i: check i): bad ids always; equal chunks and
    ``sum_per_rank`` agreement where the transport needs the same sizes on every rank;
    overflow unless pairs that do not fit are dropped."""
    equal_sizes = transport in EQUAL_CHUNKS and W > 1
    return 1 | (6 if equal_sizes else 0) | (0 if drop else 8)


@functools.cache
def _assert_message(asked: int) -> str:
    said = [text for i, text in enumerate(_CHECKS) if asked >> i & 1]
    return "moe_ops.dispatch: bad input on some rank: " + " or ".join(said)


def _check_group_flags(plan, every, rank, C, asked, topk_idx, E):
    """Bad ids anywhere, unequal chunks or sum_per_rank, overflow (the checks ``asked``): raise
    on the CPU; on CUDA one device assertion over all of them (reading a flag there would be the
    host sync this mode avoids)."""
    if every.device.type == "cpu":
        _raise_on_cpu(plan, every, rank, C, asked, topk_idx, E)
        return
    torch._assert_async(plan.ok[4], _assert_message(asked))


def _raise_on_cpu(plan, every, rank, C, asked, topk_idx, E) -> None:
    """The CPU side of :func:`_check_group_flags`: reads the flags (no device involved)."""
    ok = plan.ok.tolist()
    equal_sizes, drop = bool(asked & 2), not asked & 8
    if not ok[0]:
        bad_W = every[:, E + _layout.FIXED_BAD].tolist()
        if bad_W[rank]:
            raise bad_id_error(topk_idx, E)
        _comm.raise_if_peer_bad([int(b > 0) for b in bad_W], rank, "dispatch")
    if equal_sizes and not ok[2]:
        K_W = every[:, E + _layout.FIXED_PER_RANK].tolist()
        raise ValueError(
            f"moe_ops.dispatch: the ranks of the group passed different sum_per_rank, or "
            f"different K with sum_per_rank (K of the ranks summing per rank, 0 for the others: "
            f"{K_W}); pass the same sum_per_rank and topk_idx with the same K on every rank"
        )
    if equal_sizes and not ok[1]:
        T_W = every[:, E + _layout.FIXED_T].tolist()
        raise ValueError(
            f"moe_ops.dispatch: with capacity={C} > T * K (with sum_per_rank: > T) every rank "
            f"must pass the same number of tokens T (T per rank: {T_W})"
        )
    if not drop and not ok[3]:
        W = every.shape[0]
        need_W = every[:, :E].reshape(W, W, E // W).sum((0, 2)).tolist()
        raise ValueError(
            f"moe_ops.dispatch: capacity={C} rows is too small: the ranks of the group would "
            f"receive {need_W} rows; pass a larger capacity, capacity='worst-case', or "
            f"overflow='drop'"
        )


# ----------------------------------------------------------------------------- row movement
def _to_experts(
    kern,
    src_TH,
    pair_pos_TK,
    w_TK,
    recv_index,
    num_recv,
    splits,
    C,
    W,
    transport,
    chunks,
    group_name,
    tag,
    received_splits=None,
):
    """Rows of the pairs (``src[t]`` times ``w[t, k]``) -> ``[C, H]`` expert-major, zero tail.

    With the nvshmem transport the received splits and offsets are written to ``received_splits``
    (``[2, W * E_l]``) when given."""
    T, K = pair_pos_TK.shape
    if transport == "local":
        return kern.zero_tail(kern.scatter_rows(src_TH, pair_pos_TK, w_TK, C), num_recv)
    if transport in EQUAL_CHUNKS:
        M = W * chunk_rows(C, T, K)
        send = chunks.send_buffer((M, src_TH.shape[1]), src_TH.dtype, src_TH.device)
        recv = chunks.exchange(kern.scatter_rows(src_TH, pair_pos_TK, w_TK, M, out=send))
        del send  # its memory can serve the gathered rows
        return kern.zero_tail(kern.gather_rows(recv, recv_index), num_recv)
    recv, out_so = _comm.nvshmem_to_experts(
        lambda buf: kern.scatter_rows(src_TH, pair_pos_TK, w_TK, T * K, out=buf),
        T * K,
        C,
        src_TH.shape[1],
        src_TH.dtype,
        src_TH.device,
        splits[0],
        group_name,
        tag,
    )
    rows_CH = kern.zero_tail(recv.clone(), num_recv)
    if received_splits is not None:
        received_splits.copy_(out_so)
    return rows_CH


def _to_sources(
    kern, rows_CH, recv_index, num_recv, splits, T, K, C, W, transport, chunks, group_name, tag
):
    """The way back: ``[C, H']`` expert-major -> the rows in this rank's send order."""
    if transport == "local":
        return rows_CH
    if transport in EQUAL_CHUNKS:
        live = torch.arange(C, device=rows_CH.device) < num_recv
        dest_C = torch.where(live, recv_index, -1)
        M = W * chunk_rows(C, T, K)
        send = chunks.send_buffer((M, rows_CH.shape[1]), rows_CH.dtype, rows_CH.device)
        return chunks.exchange(kern.scatter_rows(rows_CH, dest_C[:, None], None, M, out=send))
    return _comm.nvshmem_to_sources(rows_CH, T * K, splits[1:], group_name, tag).clone()


# ----------------------------------------------------------------------------- dispatch
def _dispatch_fixed(
    x: Tensor,
    topk_idx: Tensor,
    num_experts: int,
    capacity: int,
    drop: bool,
    group_name: str,
    world_size: int,
    transport: str,
    sum_per_rank: bool = False,
) -> tuple[Tensor, ...]:
    """The op's outputs: :class:`DispatchOutputs`, in order (``_DISPATCH_SCHEMA``)."""
    # the counts (W > 1), then the rows
    chunks = _chunks(group_name, world_size, transport, "dispatch", 1 + (world_size > 1))
    W, E, C = world_size, num_experts, capacity
    err = check_dispatch(x, topk_idx, E, W)
    if err is not None and W == 1:
        raise err
    rank = chunks.rank() if chunks is not None else 0
    per_rank = err is None and sums_per_rank(W, topk_idx.shape[-1], transport, sum_per_rank)
    if err is not None:  # still take part in the count exchange, flagged bad, so peers know
        topk_idx = torch.full((0, 1), -1, dtype=_I64, device=x.device)
    kern = _kernels.for_device(x.device)
    bad_input = err is not None
    asked = _asked_checks(W, drop, transport)
    lay, plan, every, send_pos = _layout_fixed(
        topk_idx, E, C, W, rank, transport, bad_input, per_rank, asked, chunks, kern
    )
    if err is not None:
        raise err
    checks = (plan, every, rank, C, asked, topk_idx, E)
    if transport != "local":  # before any row moves
        _check_group_flags(*checks)
    out = DispatchOutputs(None, *lay)
    if per_rank:
        pair_pos, token_pos, recv_x, slot_rows = _tokens_to_experts(
            kern, x, topk_idx, send_pos, plan, C, chunks
        )
        return chunks.done(
            out._replace(recv_x=recv_x, pair_pos=pair_pos, token_pos=token_pos, slot_rows=slot_rows)
        )
    recv_x = _to_experts(
        kern,
        x,
        out.pair_pos,
        None,
        out.recv_index,
        out.num_recv,
        out.splits,
        C,
        W,
        transport,
        chunks,
        group_name,
        "dispatch",
        out.splits[1:] if transport == "nvshmem" else None,
    )
    if transport == "local":  # after the row scatter is queued: its host time hides this
        _check_group_flags(*checks)
    return _done(chunks, out._replace(recv_x=recv_x))


def _tokens_to_experts(kern, x_TH, topk_idx_TK, send_pos_TK, plan, C, chunks):
    """Dispatch's rows with ``sum_per_rank``: each token's row goes once to every rank that keeps
    one of its pairs, with the rows of recv_x its slots take there (``fixed_token_rows``), in one
    equal-chunk exchange (the slots in the first columns of each row). Returns ``pair_pos``,
    ``token_pos``, ``recv_x [C, H]`` (zero tail) and the slots received (``slot_rows``)."""
    T, H = x_TH.shape
    K, W = topk_idx_TK.shape[1], chunks.size()
    S = token_chunk_rows(C, T)
    send, rows, slots = _packed_rows(W * S, H, K, x_TH.dtype, x_TH.device, chunks)
    pair_pos, token_pos, _ = kern.fixed_token_rows(
        topk_idx_TK, send_pos_TK, plan, W, S, slots_out=slots
    )
    kern.scatter_rows(x_TH, token_pos, None, W * S, out=rows)  # rows no token takes: not read
    # With p2p on CUDA recv_x's padding is zeroed beside the exchange (the send buffer is
    # symmetric memory, not the allocator's, so allocating recv_x first costs no peak memory);
    # otherwise after the row scatter, in memory the send buffer may have freed.
    beside = chunks.p2p and x_TH.device.type == "cuda"
    recv_x = x_TH.new_empty((C, H)) if beside else None
    with _zero_tail_meanwhile(kern, recv_x, plan.num_recv) if beside else contextlib.nullcontext():
        recv = chunks.exchange(send)
    del send, rows, slots
    recv_rows, slot_rows = _layout.unpack_rows(recv, H, K, _I64)
    slot_rows = slot_rows.contiguous()
    recv_x = kern.scatter_rows(recv_rows, slot_rows, None, C, out=recv_x)
    if not beside:
        recv_x = kern.zero_tail(recv_x, plan.num_recv)
    return pair_pos, token_pos, recv_x, slot_rows


@contextlib.contextmanager
def _zero_tail_meanwhile(kern, rows_CH: Tensor, n: Tensor) -> Iterator[None]:
    """Zeroes ``rows_CH[n:]`` on a side stream of the CUDA device while the block runs on the
    current stream (with the p2p transport: the exchange's barrier and reads, which leave the
    GPU's memory bandwidth mostly idle); on leaving, also by an exception, the current stream
    waits for it, so what comes after (the row scatter: the torch kernels rewrite all of
    ``rows_CH``) sees the zeros. In a CUDA graph capture this forks and joins the graph."""
    main = torch.cuda.current_stream(rows_CH.device)
    side = _comm.side_stream(rows_CH.device)
    side.wait_stream(main)  # rows_CH and n exist
    with torch.cuda.stream(side):
        kern.zero_tail(rows_CH, n)
    try:
        yield
    finally:
        main.wait_stream(side)


def _packed_rows(M: int, H: int, K: int, dtype: torch.dtype, device: torch.device, chunks):
    """A send buffer of ``chunks`` for M token rows of H columns with K int64 slots each, in one
    tensor of the rows' dtype (``moe_ops._layout.slot_columns``): ``(buffer, its rows [M, H],
    its slots [M, K] int64)``."""
    X = _layout.slot_columns(H, K, dtype, _I64)
    buf = _send_memory(chunks, (M, X + H), dtype, device)
    return (buf, *_layout.unpack_rows(buf, H, K, _I64))


_DISPATCH_SCHEMA = (
    "(Tensor x, Tensor topk_idx, int num_experts, SymInt capacity, bool drop, str group_name, "
    "SymInt world_size, str transport, bool sum_per_rank=False) -> ("
    + ", ".join(["Tensor"] * len(DispatchOutputs._fields))
    + ")"
)
dispatch_fixed_op = torch.library.custom_op(
    "moe_ops::dispatch_fixed", mutates_args=(), schema=_DISPATCH_SCHEMA
)(_dispatch_fixed)


@dispatch_fixed_op.register_fake
def _(
    x, topk_idx, num_experts, capacity, drop, group_name, world_size, transport, sum_per_rank=False
):
    err = check_dispatch(x, topk_idx, num_experts, world_size)
    if err is not None:
        raise err
    T, K = topk_idx.shape
    E, W, C = num_experts, world_size, capacity
    i64 = dict(dtype=_I64, device=x.device)
    if sums_per_rank(W, K, transport, sum_per_rank):
        token_pos = torch.empty((T, W), **i64)
        slot_rows = torch.empty((W * token_chunk_rows(C, T), K), **i64)
    else:
        token_pos, slot_rows = torch.empty((0, 0), **i64), torch.empty((0, 0), **i64)
    per_rank = token_pos.shape[1] > 0
    return DispatchOutputs(
        recv_x=x.new_empty((C, x.shape[1])),
        tokens_per_expert=torch.empty(E // W, **i64),
        num_dropped=torch.empty((), **i64),
        pair_pos=torch.empty((T, K), **i64),
        recv_index=torch.empty(C if transport in EQUAL_CHUNKS and not per_rank else 0, **i64),
        num_recv=torch.empty(1, **i64),
        splits=torch.empty((3, E) if transport == "nvshmem" else (0, 0), **i64),
        token_pos=token_pos,
        slot_rows=slot_rows,
    )


# ----------------------------------------------------------------------------- combine
# Combine sums each token's rows in slot order on the token's rank, or, with ``sum_per_rank``,
# per rank first: the weights travel to the experts' ranks with the token rows' order (ones when
# None: every rank issues the same exchanges), each rank sums the weighted rows of every token
# row it received in slot order, and one row per (token, rank) comes back, summed in rank order.


def _split(layout_static: tuple) -> tuple[Layout, int, str, int, str, bool]:
    """combine's arguments after ``topk_weights``: the :class:`Layout`, capacity, group_name,
    world_size, transport and ``unweighted`` (False when not given; the backward takes no such
    argument)."""
    n = len(Layout._fields)
    capacity, group_name, world_size, transport, *unweighted = layout_static[n:]
    unweighted = bool(unweighted and unweighted[0])
    return Layout(*layout_static[:n]), capacity, group_name, world_size, transport, unweighted


def _combine_fixed(
    expert_out: Tensor, topk_weights: Tensor | None, *layout_static
) -> tuple[Tensor, Tensor]:
    """``layout_static``: the :class:`Layout` fields, then capacity, group_name, world_size,
    transport and optionally ``unweighted`` (``_COMBINE_SCHEMA``)."""
    lay, capacity, group_name, world_size, transport, unweighted = _split(layout_static)
    err = check_combine(expert_out, topk_weights, lay.pair_pos, capacity)
    if err is not None:
        raise err
    # the rows back; summing per rank, the weights first unless every rank passes none
    n = 1 + (lay.sums_per_rank and not unweighted)
    chunks = _chunks(group_name, world_size, transport, "combine", n)
    kern = _kernels.for_device(expert_out.device)
    if lay.sums_per_rank:
        out = _combine_per_rank(kern, expert_out, topk_weights, lay, unweighted, chunks)
        return chunks.done(out)
    T, K = lay.pair_pos.shape
    rows = _to_sources(
        kern,
        expert_out,
        lay.recv_index,
        lay.num_recv,
        lay.splits,
        T,
        K,
        capacity,
        world_size,
        transport,
        chunks,
        group_name,
        "combine",
    )
    local = transport == "local"
    out = _autograd.combine_tail(kern, rows, expert_out, lay.pair_pos, topk_weights, not local)
    return _done(chunks, out)


def _combine_per_rank(kern, expert_out, topk_weights, lay: Layout, unweighted, chunks):
    """Combine summing per rank: ``out[T, H']`` and the weights that reached this rank with the
    token rows (``[W * S, K]``), which the backward needs."""
    M, K = lay.slot_rows.shape
    adt, dev = _layout.acc_dtype(expert_out.dtype), expert_out.device
    w_rows = None if unweighted else chunks.send_buffer((M, K), adt, dev)  # unweighted: no send
    recv_w = _autograd.per_rank_weights(
        kern,
        expert_out,
        topk_weights,
        lay.token_pos,
        M,
        (M, K),
        chunks.exchange,
        unweighted,
        w_rows,
    )
    # each token row's weighted slots, summed in slot order (rows that no token took: 0)
    partial = chunks.send_buffer((M, expert_out.shape[1]), expert_out.dtype, expert_out.device)
    partial = kern.combine_rows(expert_out, lay.slot_rows, recv_w, expert_out.dtype, out=partial)
    sum_back = chunks.exchange_sum(partial)
    del partial  # sent: its memory can serve the output
    return sum_back(lay.token_pos), recv_w


_LAYOUT_ARGS = ", ".join(f"Tensor {name}" for name in Layout._fields)
_STATIC_ARGS = "SymInt capacity, str group_name, SymInt world_size, str transport"
# unweighted: every rank passes topk_weights=None (dispatch's backward), so a combine that sums
# per rank sends no weights
_COMBINE_SCHEMA = (
    f"(Tensor expert_out, Tensor? topk_weights, {_LAYOUT_ARGS}, {_STATIC_ARGS}, "
    f"bool unweighted=False) -> (Tensor, Tensor)"
)
combine_fixed_op = torch.library.custom_op(
    "moe_ops::combine_fixed", mutates_args=(), schema=_COMBINE_SCHEMA
)(_combine_fixed)


@combine_fixed_op.register_fake
def _(expert_out, topk_weights, *layout_static):
    lay, capacity, _, world_size, transport, _ = _split(layout_static)
    err = check_combine(expert_out, topk_weights, lay.pair_pos, capacity)
    if err is not None:
        raise err
    if lay.sums_per_rank:
        out, _ = _autograd.fake_combine(expert_out, lay.pair_pos, 0)
        dtype = _layout.acc_dtype(expert_out.dtype)
        return out, expert_out.new_empty(tuple(lay.slot_rows.shape), dtype=dtype)
    T, K = lay.pair_pos.shape
    M = back_rows(transport, capacity, T, K, world_size)
    return _autograd.fake_combine(expert_out, lay.pair_pos, M)


def _combine_fixed_backward(
    grad_out: Tensor, returned_rows: Tensor | None, topk_weights: Tensor | None, *layout_static
) -> tuple[Tensor, Tensor]:
    """Gradients of combine_fixed: ``[C, H']`` for expert_out (zero past R) and ``[T, K]`` for
    the weights when ``returned_rows`` is given (``[0, 0]`` otherwise). Summing per rank,
    ``returned_rows`` is expert_out itself and ``topk_weights`` the weights that reached this
    rank (what :func:`_for_backward` saved)."""
    lay, capacity, group_name, world_size, transport, _ = _split(layout_static)
    # the gradient's rows; summing per rank, the weight gradient back too
    n = 1 + lay.sums_per_rank
    chunks = _chunks(group_name, world_size, transport, "combine_backward", n)
    kern = _kernels.for_device(grad_out.device)
    if lay.sums_per_rank:
        grads = _combine_backward_per_rank(
            kern, grad_out, returned_rows, topk_weights, lay, capacity, chunks
        )
        return chunks.done(grads)
    grad_eo = _to_experts(
        kern,
        grad_out,
        lay.pair_pos,
        topk_weights,
        lay.recv_index,
        lay.num_recv,
        lay.splits,
        capacity,
        world_size,
        transport,
        chunks,
        group_name,
        "combine_bwd",
    )
    grad_w = _autograd.weight_grad(kern, grad_out, returned_rows, lay.pair_pos, topk_weights)
    return _done(chunks, (grad_eo, grad_w))


def _combine_backward_per_rank(kern, grad_out, expert_out, recv_w, lay: Layout, C: int, chunks):
    """The gradients of :func:`_combine_per_rank`: ``grad_out``'s token rows go to the experts'
    ranks as dispatch's rows did, each becomes its slots' rows times their weights there
    (``[C, H']``, zero past R), and the weight gradient comes back as one ``[K]`` row per
    (token, rank): the exchange runs whether or not it was asked for (``expert_out`` None: zeros
    go, and ``[0, 0]`` is returned)."""
    M = lay.slot_rows.shape[0]
    g_rows = chunks.send_buffer((M, grad_out.shape[1]), grad_out.dtype, grad_out.device)
    g_recv = chunks.exchange(kern.scatter_rows(grad_out, lay.token_pos, None, M, out=g_rows))
    del g_rows
    grad_eo = kern.zero_tail(kern.scatter_rows(g_recv, lay.slot_rows, recv_w, C), lay.num_recv)
    grad_w = _autograd.per_rank_weight_grad(
        kern,
        g_recv,
        expert_out,
        recv_w,
        lay.slot_rows,
        lambda gw_recv: chunks.exchange_sum(gw_recv)(lay.token_pos),
    )
    return grad_eo, grad_w


_COMBINE_BACKWARD_SCHEMA = (
    f"(Tensor grad_out, Tensor? returned_rows, Tensor? topk_weights, {_LAYOUT_ARGS}, "
    f"{_STATIC_ARGS}) -> (Tensor, Tensor)"
)
combine_fixed_backward_op = torch.library.custom_op(
    "moe_ops::_combine_fixed_backward", mutates_args=(), schema=_COMBINE_BACKWARD_SCHEMA
)(_combine_fixed_backward)


@combine_fixed_backward_op.register_fake
def _(grad_out, returned_rows, topk_weights, *layout_static):
    lay, capacity = _split(layout_static)[:2]
    return _autograd.fake_combine_backward(
        grad_out, returned_rows, topk_weights, lay.pair_pos, capacity
    )


def _for_backward(expert_out, topk_weights, returned_rows, layout, static) -> tuple:
    """What combine_fixed saves for its backward, as (rows, weights): the rows that came back
    (``expert_out`` with the local transport, where no row moves) and the weights; summing per
    rank, ``expert_out`` and the weights that reached this rank."""
    if Layout(*layout).sums_per_rank:
        return expert_out, returned_rows
    return (expert_out if static[-1] == "local" else returned_rows), topk_weights


# what moe_ops.dispatch and moe_ops.combine call in the capacity mode
DIRECT = _autograd.register(
    dispatch_fixed_op,
    _autograd.Mode(
        combine=combine_fixed_op,
        combine_backward=combine_fixed_backward_op,
        num_layout=len(Layout._fields),
        num_static=4,
        dispatch_layout=lambda output: DispatchOutputs(*output).layout(),
        # capacity, group_name, world_size, transport (not drop, nor sum_per_rank: the layout's
        # shapes say how combine sums)
        dispatch_static=lambda inputs: (inputs[3], *inputs[5:8]),
        for_backward=_for_backward,
    ),
    dispatch_impl=_dispatch_fixed,
    combine_impl=_combine_fixed,
    combine_backward_impl=_combine_fixed_backward,
)
