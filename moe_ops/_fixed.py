"""Capacity mode: dispatch and combine with fixed-size buffers and no device -> host sync.

Ops ``moe_ops::dispatch_fixed``, ``moe_ops::combine_fixed`` and
``moe_ops::_combine_fixed_backward``. Every output shape depends only on the input shapes, W and
the capacity C (rows this rank can receive), so the fake kernels return no unbacked sizes and a
layer can be captured in a CUDA graph. Shape letters: see ``_layout``; ``S`` below is the rows
per peer of the padded transport.

Which pairs are kept: the receiver lays its rows out expert-major (local expert, then source
rank, then token, then slot), as in the default mode; rows at positions ``>= C`` of that order
do not fit. Every rank learns every rank's counts per expert (one all-gather of ``[E + 2]``
int64 per rank, on the device), so a sender knows which of its own pairs fit without asking:
kept pairs of one (destination, expert) are a prefix of them in pair order.

Transports (the rows' way to their experts and back):

* ``"local"``: W = 1, nothing moves; ``recv_x`` is the send buffer.
* ``"padded"``: one ``all_to_all_single`` with ``S = min(C, T * K)`` rows per peer each way
  (every rank must pass the same T when ``C > T * K``): sizes known in advance, so it works with
  gloo and NCCL, at the price of moving ``W * S`` rows instead of the real count.
* ``"nvshmem"``: ``torch.ops.symm_mem.all_to_all_vdev_2d`` (rows with device-side split sizes,
  received expert-major) and ``all_to_all_vdev_2d_offset`` for the way back, through persistent
  symmetric-memory buffers (CUDA, NVSHMEM; every rank must pass the same T).

``dispatch_fixed`` returns 7 tensors:

    recv_x             [C, H]   rows for this rank's experts, expert-major; rows >= R are zero
    tokens_per_expert  [E_l]    int64, kept rows per local expert (sum R <= C)
    num_dropped        []       int64, this rank's (token, slot) pairs that did not fit
    pair_pos           [T, K]   int64, row of each pair in the buffer combine gets back, -1 if
                                unused or dropped
    recv_index         [C]      int64 ("padded"): row of the received buffer for each row of
                                recv_x ([0] otherwise)
    num_recv           [1]      int64, R
    splits             [3, W * E_l] int64 ("nvshmem"): rows sent per (destination, expert), then
                                received splits and offsets per (expert, source) ([0, 0] otherwise)

CUDA graphs: on every transport, forward and backward, Triton or plain torch path, nothing here
syncs with the host or copies from host memory: host ints (T, flags) enter kernels as scalar
arguments (``torch.full``, ``fill_``, arithmetic), sizes are static (``repeat_interleave`` with
``output_size``, no boolean-mask indexing, no ``nonzero``/``bincount``), and bad input or
overflow is reported on CUDA by ``torch._assert_async``. Warm up once before capturing (Triton
compiles, NCCL communicators and NVSHMEM buffers are created on first use).

``combine_fixed`` returns ``out[T, H']`` and the rows that came back (``[W * S, H']`` padded,
``[T * K, H']`` nvshmem, ``[0, H']`` local), which its backward needs for the weight gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import _comm, _layout
from moe_ops._ops import _bad_id_error, _check_combine, _check_dispatch

transport_override: str | None = None  # tests and the benchmark force a transport here
_I64 = torch.int64


def chunk_rows(capacity: int, T: int, K: int) -> int:
    """S, rows per peer of the padded transport: no peer can keep more than C of one rank's rows,
    and no rank sends more than T * K."""
    return min(capacity, T * K)


def _back_rows(transport: str, capacity: int, T: int, K: int, W: int) -> int:
    if transport == "padded":
        return W * chunk_rows(capacity, T, K)
    if transport == "nvshmem":
        return T * K
    return 0


def _group(group_name: str, world_size: int, transport: str):
    if transport == "nvshmem" and world_size == 1 and group_name:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group_name)
    return _comm.resolve_group(group_name, world_size)


# ----------------------------------------------------------------------------- layout
def _rank_in_expert(topk_idx_TK: Tensor, E: int, kern):
    """Valid mask ``[P]``, expert id ``[P]`` (0 where invalid), rank of each valid pair among the
    pairs of its expert in pair order ``[P]``, counts ``[E]`` and the bad-id count (0-d)."""
    P = topk_idx_TK.numel()
    ids_P = topk_idx_TK.reshape(-1).to(_I64)
    if kern is not None:
        lay = kern.send_layout(topk_idx_TK, E, 1)
        counts_E, bad = lay.counts_bad[:E], lay.counts_bad[E]
        pos_P = lay.send_pos.reshape(-1)
        valid_P = pos_P >= 0
    else:
        order_P, counts_E = _layout.send_layout(topk_idx_TK, E)
        valid_P = (ids_P >= 0) & (ids_P < E)
        inv_P = torch.empty_like(order_P).index_copy_(
            0, order_P, torch.arange(P, device=order_P.device)
        )
        pos_P = torch.where(valid_P, inv_P, -1)
        bad = ((ids_P < -1) | (ids_P >= E)).sum()
    g_P = torch.where(valid_P, ids_P, 0)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    return valid_P, g_P, pos_P - start_E[g_P], counts_E, bad, pos_P


def _layout_local(topk_idx_TK, E, C, kern):
    """W = 1 (few ops: their host time is on the critical path): the send order is the
    expert-major receive order, so a pair fits iff its send row is < C."""
    T, K = topk_idx_TK.shape
    if kern is not None:
        lay = kern.send_layout(topk_idx_TK, E, 1)
        counts_E, bad, pos_TK = lay.counts_bad[:E], lay.counts_bad[E], lay.send_pos
    else:
        *_, counts_E, bad, pos_P = _rank_in_expert(topk_idx_TK, E, None)
        pos_TK = pos_P.view(T, K)
    pair_pos = torch.where(pos_TK < C, pos_TK, -1)
    kept_end = torch.cumsum(counts_E, 0).clamp(max=C)
    tokens_per_expert = torch.diff(kept_end, prepend=kept_end.new_zeros(1))
    total = counts_E.sum()
    num_recv = total.clamp(max=C).view(1)
    num_dropped = total - total.clamp(max=C)
    dev = pos_TK.device
    recv_index = torch.zeros(0, dtype=_I64, device=dev)
    splits = torch.zeros((0, 0), dtype=_I64, device=dev)
    out = (tokens_per_expert, num_dropped, pair_pos, recv_index, num_recv, splits)
    flags = dict(
        overflow=num_dropped,
        need_W=counts_E.sum().view(1),
        bad_W=bad.view(1),
        S_W=None,
        bad_here=bad,
    )
    return out, flags


def _excl_cumsum(t: Tensor, dim: int) -> Tensor:
    return torch.cumsum(t, dim) - t


def _layout_fixed(topk_idx_TK, E, C, W, rank, transport, bad_input, group, kern):
    """Everything dispatch_fixed returns but the rows, plus the group-wide flags."""
    T, K = topk_idx_TK.shape
    dev = topk_idx_TK.device
    E_l = E // W
    valid_P, g_P, j_P, counts_E, bad, _ = _rank_in_expert(topk_idx_TK, E, kern)
    # Host values (T, the bad-input flag) reach the device as kernel arguments (full, add), never
    # as a tensor built from host memory: that copy would sync, and fails in CUDA-graph capture.
    bad_1 = (bad.to(_I64) + int(bad_input)).view(1)
    if W == 1:
        counts_sde = counts_E.view(1, 1, E)
        T_W = torch.full((1,), T, dtype=_I64, device=dev)
        bad_W = bad_1
    else:
        row = torch.cat([counts_E, torch.full((1,), T, dtype=_I64, device=dev), bad_1])
        every = _comm.gather_rows_of_counts(row, W, group)
        counts_sde = every[:, :E].reshape(W, W, E_l)  # [source, destination, local expert]
        T_W, bad_W = every[:, E], every[:, E + 1]
    # receiver-side expert-major offset of chunk (source, expert), then what fits
    before_e = _excl_cumsum(counts_sde.sum(0), 1)  # [destination, expert]
    off_sde = before_e[None] + _excl_cumsum(counts_sde, 0)
    kept_sde = (C - off_sde).clamp(min=0).minimum(counts_sde)
    kept_de = kept_sde[rank]
    keep_P = valid_P & (j_P < kept_de.reshape(E)[g_P])
    if transport == "padded":
        S = chunk_rows(C, T, K)
        base_de = _excl_cumsum(kept_de, 1) + torch.arange(W, device=dev)[:, None] * S
    else:
        base_de = _excl_cumsum(kept_de.reshape(E), 0)
    pair_pos = torch.where(keep_P, base_de.reshape(E)[g_P] + j_P, -1).view(T, K)
    num_dropped = (counts_sde[rank] - kept_de).sum()
    kept_se = kept_sde[:, rank]  # what reaches me: [source, expert]
    tokens_per_expert = kept_se.sum(0)
    num_recv = tokens_per_expert.sum().view(1)
    recv_index = torch.zeros(0, dtype=_I64, device=dev)
    splits = torch.zeros((0, 0), dtype=_I64, device=dev)
    if transport == "padded":
        S = chunk_rows(C, T, K)
        base_se = _excl_cumsum(kept_se, 1) + torch.arange(W, device=dev)[:, None] * S
        kc = kept_se.t().reshape(-1)  # chunks in expert-major order (expert, source)
        shift = base_se.t().reshape(-1) - _excl_cumsum(kc, 0)
        pad = (C - num_recv).clamp(min=0)
        reps = torch.cat([kc, pad])
        shift_C = torch.repeat_interleave(torch.cat([shift, pad * 0]), reps, output_size=C)
        rows_C = torch.arange(C, device=dev)
        recv_index = torch.where(rows_C < num_recv, rows_C + shift_C, 0)
    elif transport == "nvshmem":
        splits = torch.zeros((3, E), dtype=_I64, device=dev)
        splits[0] = kept_de.reshape(E)
    overflow = (counts_sde - kept_sde).sum()
    need_W = counts_sde.sum((0, 2))  # rows each rank would receive
    S_W = (T_W * K).clamp(max=C)
    flags = dict(overflow=overflow, need_W=need_W, bad_W=bad_W, S_W=S_W, bad_here=bad)
    out = (tokens_per_expert, num_dropped, pair_pos, recv_index, num_recv, splits)
    return out, flags


def _check_group_flags(flags, W, rank, C, drop, transport, topk_idx, E):
    """Bad ids anywhere, unequal chunks, overflow: raise on the CPU, assert on the device on CUDA
    (reading a flag there would be the host sync this mode avoids)."""
    equal_chunks = transport != "padded" or W == 1
    if flags["bad_W"].device.type == "cpu":
        _raise_on_cpu(flags, rank, C, drop, equal_chunks, topk_idx, E)
        return
    torch._assert_async(
        (flags["bad_W"] == 0).all(),
        "moe_ops.dispatch: topk_idx values must be expert ids in [0, num_experts) or -1",
    )
    if not equal_chunks:
        S_W = flags["S_W"]
        torch._assert_async(
            (S_W[0] == S_W).all(),
            "moe_ops.dispatch: capacity > T * K needs the same number of tokens T on every rank",
        )
    if not drop:
        torch._assert_async(
            flags["overflow"] == 0,
            "moe_ops.dispatch: capacity too small for the rows routed to a rank "
            "(overflow='error'); pass a larger capacity, capacity='worst-case', or overflow='drop'",
        )


def _raise_on_cpu(flags, rank, C, drop, equal_chunks, topk_idx, E) -> None:
    """The CPU side of :func:`_check_group_flags`: reads the flags (no device involved)."""
    bad_W = flags["bad_W"].tolist()
    if any(bad_W):
        if flags["bad_here"] > 0:
            raise _bad_id_error(topk_idx, E)
        _comm.raise_if_peer_bad([int(b > 0) for b in bad_W], rank, "dispatch")
    S_W = [] if equal_chunks else flags["S_W"].tolist()
    if len(set(S_W)) > 1:
        raise ValueError(
            f"moe_ops.dispatch: with capacity={C} > T * K every rank must pass the same number "
            f"of tokens T (rows per peer min(C, T * K) differ across ranks: {S_W})"
        )
    if not drop and flags["overflow"] > 0:
        raise ValueError(
            f"moe_ops.dispatch: capacity={C} rows is too small: the ranks of the group would "
            f"receive {flags['need_W'].tolist()} rows; pass a larger capacity, "
            f"capacity='worst-case', or overflow='drop'"
        )


# ----------------------------------------------------------------------------- row movement
def _to_experts(
    src_TH,
    pair_pos_TK,
    w_TK,
    recv_index,
    num_recv,
    splits,
    C,
    W,
    transport,
    group,
    group_name,
    tag,
    received_splits=None,
):
    """Rows of the pairs (``src[t]`` times ``w[t, k]``) -> ``[C, H]`` expert-major, zero tail.

    With the nvshmem transport the received splits and offsets are written to ``received_splits``
    (``[2, W * E_l]``) when given."""
    T, K = pair_pos_TK.shape
    H = src_TH.shape[1]
    kern = _layout.triton_kernels(src_TH)

    def scatter(rows: int, out: Tensor | None = None) -> Tensor:
        if kern is not None:
            return kern.scatter_rows(src_TH, pair_pos_TK, w_TK, rows, out=out)
        # one spare row (index ``rows``) takes the unused and dropped pairs
        buf = src_TH.new_zeros((rows + 1, H))
        vals = src_TH[:, None, :].expand(T, K, H)
        if w_TK is not None:
            adt = _layout.acc_dtype(src_TH.dtype)
            vals = (vals.to(adt) * w_TK[:, :, None].to(adt)).to(src_TH.dtype)
        dest = torch.where(pair_pos_TK >= 0, pair_pos_TK, rows).reshape(-1)
        buf.index_copy_(0, dest, vals.reshape(T * K, H))
        if out is None:
            return buf[:rows]
        return out.copy_(buf[:rows])

    if transport == "local":
        rows_CH = scatter(C)
        if kern is not None:
            kern.zero_tail(rows_CH, num_recv)
        return rows_CH
    if transport == "padded":
        recv = _comm.exchange_equal_chunks(scatter(W * chunk_rows(C, T, K)), group)
        if kern is not None:
            return kern.zero_tail(kern.gather_rows(recv, recv_index), num_recv)
        live = (torch.arange(C, device=recv.device) < num_recv)[:, None]
        return torch.where(live, recv[recv_index], 0)
    recv, out_so = _comm.nvshmem_to_experts(
        lambda buf: scatter(T * K, out=buf),
        T * K,
        C,
        H,
        src_TH.dtype,
        src_TH.device,
        splits[0],
        group_name,
        tag,
    )
    rows_CH = recv.clone()
    if kern is not None:
        kern.zero_tail(rows_CH, num_recv)
    else:  # masked_fill_, not ``rows[mask] = 0`` (boolean-mask indexing)
        tail = torch.arange(C, device=rows_CH.device) >= num_recv
        rows_CH.masked_fill_(tail[:, None], 0)
    if received_splits is not None:
        received_splits.copy_(out_so)
    return rows_CH


def _to_sources(
    rows_CH, recv_index, num_recv, splits, T, K, C, W, transport, group, group_name, tag
):
    """The way back: ``[C, H']`` expert-major -> the rows in this rank's send order."""
    if transport == "local":
        return rows_CH
    H = rows_CH.shape[1]
    if transport == "padded":
        M = W * chunk_rows(C, T, K)
        live = torch.arange(C, device=rows_CH.device) < num_recv
        dest_C = torch.where(live, recv_index, -1)
        kern = _layout.triton_kernels(rows_CH)
        if kern is not None:
            buf = kern.scatter_rows(rows_CH, dest_C[:, None], None, M)
        else:
            buf = rows_CH.new_zeros((M + 1, H))
            buf.index_copy_(0, torch.where(live, recv_index, M), rows_CH)
            buf = buf[:M]
        return _comm.exchange_equal_chunks(buf, group)
    return _comm.nvshmem_to_sources(rows_CH, T * K, splits[1:], group_name, tag).clone()


# ----------------------------------------------------------------------------- dispatch
@torch.library.custom_op("moe_ops::dispatch_fixed", mutates_args=())
def dispatch_fixed_op(
    x: Tensor,
    topk_idx: Tensor,
    num_experts: int,
    capacity: int,
    drop: bool,
    group_name: str,
    world_size: int,
    transport: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    group = _group(group_name, world_size, transport)
    W, E, C = world_size, num_experts, capacity
    err = _check_dispatch(x, topk_idx, E, W)
    if err is not None and W == 1:
        raise err
    rank = group.rank() if group is not None else 0
    if err is not None:  # still take part in the count exchange, flagged bad, so peers know
        topk_idx = torch.full((0, 1), -1, dtype=_I64, device=x.device)
    kern = _layout.triton_kernels(x) if err is None else None
    if transport == "local":
        lay, flags = _layout_local(topk_idx, E, C, kern)
    else:
        bad_input = err is not None
        lay, flags = _layout_fixed(topk_idx, E, C, W, rank, transport, bad_input, group, kern)
    if err is not None:
        raise err
    if transport != "local":  # before any row moves
        _check_group_flags(flags, W, rank, C, drop, transport, topk_idx, E)
    tokens_per_expert, num_dropped, pair_pos, recv_index, num_recv, splits = lay
    recv_x = _to_experts(
        x,
        pair_pos,
        None,
        recv_index,
        num_recv,
        splits,
        C,
        W,
        transport,
        group,
        group_name,
        "dispatch",
        splits[1:] if transport == "nvshmem" else None,
    )
    if transport == "local":  # after the row scatter is queued: its host time hides this
        _check_group_flags(flags, W, rank, C, drop, transport, topk_idx, E)
    return recv_x, tokens_per_expert, num_dropped, pair_pos, recv_index, num_recv, splits


@dispatch_fixed_op.register_fake
def _(x, topk_idx, num_experts, capacity, drop, group_name, world_size, transport):
    err = _check_dispatch(x, topk_idx, num_experts, world_size)
    if err is not None:
        raise err
    T, K = topk_idx.shape
    E, W, C = num_experts, world_size, capacity
    i64 = dict(dtype=_I64, device=x.device)
    return (
        x.new_empty((C, x.shape[1])),
        torch.empty(E // W, **i64),
        torch.empty((), **i64),
        torch.empty((T, K), **i64),
        torch.empty(C if transport == "padded" else 0, **i64),
        torch.empty(1, **i64),
        torch.empty((3, E) if transport == "nvshmem" else (0, 0), **i64),
    )


def _dispatch_setup_context(ctx, inputs, output):
    _, topk_idx, _, capacity, _, group_name, world_size, transport = inputs
    _, _, _, pair_pos, recv_index, num_recv, splits = output
    ctx.save_for_backward(pair_pos, recv_index, num_recv, splits)
    ctx.args = (capacity, group_name, world_size, transport)


def _dispatch_backward(ctx, grad_recv_x, *_):
    grad_x, _ = combine_fixed_op(grad_recv_x, None, *ctx.saved_tensors, *ctx.args)
    return grad_x, None, None, None, None, None, None, None


dispatch_fixed_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup_context)


# ----------------------------------------------------------------------------- combine
@torch.library.custom_op("moe_ops::combine_fixed", mutates_args=())
def combine_fixed_op(
    expert_out: Tensor,
    topk_weights: Tensor | None,
    pair_pos: Tensor,
    recv_index: Tensor,
    num_recv: Tensor,
    splits: Tensor,
    capacity: int,
    group_name: str,
    world_size: int,
    transport: str,
) -> tuple[Tensor, Tensor]:
    err = _check_combine(expert_out, topk_weights, pair_pos, capacity)
    if err is not None:
        raise err
    group = _group(group_name, world_size, transport)
    T, K = pair_pos.shape
    rows = _to_sources(
        expert_out,
        recv_index,
        num_recv,
        splits,
        T,
        K,
        capacity,
        world_size,
        transport,
        group,
        group_name,
        "combine",
    )
    returned = expert_out.new_empty((0, expert_out.shape[1])) if transport == "local" else rows
    kern = _layout.triton_kernels(rows)
    if kern is not None:
        out = kern.combine_rows(rows, pair_pos, topk_weights, expert_out.dtype)
    else:
        out = _layout.weighted_slot_sum(rows, pair_pos, topk_weights, expert_out.dtype)
    return out, returned


@combine_fixed_op.register_fake
def _(
    expert_out,
    topk_weights,
    pair_pos,
    recv_index,
    num_recv,
    splits,
    capacity,
    group_name,
    world_size,
    transport,
):
    err = _check_combine(expert_out, topk_weights, pair_pos, capacity)
    if err is not None:
        raise err
    T, K = pair_pos.shape
    M = _back_rows(transport, capacity, T, K, world_size)
    H = expert_out.shape[1]
    return expert_out.new_empty((T, H)), expert_out.new_empty((M, H))


def _combine_setup_context(ctx, inputs, output):
    expert_out, topk_weights, *layout, capacity, group_name, world_size, transport = inputs
    returned = expert_out if transport == "local" else output[1]
    ctx.save_for_backward(returned, topk_weights, *layout)
    ctx.args = (capacity, group_name, world_size, transport)


def _combine_backward(ctx, grad_out, _grad_returned):
    returned, topk_weights, *layout = ctx.saved_tensors
    want_w = topk_weights is not None and ctx.needs_input_grad[1]
    grad_eo, grad_w = combine_fixed_backward_op(
        grad_out, returned if want_w else None, topk_weights, *layout, *ctx.args
    )
    return (grad_eo, grad_w if want_w else None) + (None,) * 8


combine_fixed_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


@torch.library.custom_op("moe_ops::_combine_fixed_backward", mutates_args=())
def combine_fixed_backward_op(
    grad_out: Tensor,
    returned_rows: Tensor | None,
    topk_weights: Tensor | None,
    pair_pos: Tensor,
    recv_index: Tensor,
    num_recv: Tensor,
    splits: Tensor,
    capacity: int,
    group_name: str,
    world_size: int,
    transport: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of combine_fixed: ``[C, H']`` for expert_out (zero past R) and ``[T, K]`` for
    the weights when ``returned_rows`` is given (``[0, 0]`` otherwise)."""
    group = _group(group_name, world_size, transport)
    grad_eo = _to_experts(
        grad_out,
        pair_pos,
        topk_weights,
        recv_index,
        num_recv,
        splits,
        capacity,
        world_size,
        transport,
        group,
        group_name,
        "combine_bwd",
    )
    if returned_rows is None:
        grad_w = grad_out.new_empty((0, 0))
    else:
        kern = _layout.triton_kernels(grad_out)
        grad_w = (kern or _layout).slot_dot(grad_out, returned_rows, pair_pos, topk_weights.dtype)
    return grad_eo, grad_w


@combine_fixed_backward_op.register_fake
def _(
    grad_out,
    returned_rows,
    topk_weights,
    pair_pos,
    recv_index,
    num_recv,
    splits,
    capacity,
    group_name,
    world_size,
    transport,
):
    grad_w_shape = (0, 0) if returned_rows is None else tuple(pair_pos.shape)
    grad_w_dtype = grad_out.dtype if topk_weights is None else topk_weights.dtype
    return (
        grad_out.new_empty((capacity, grad_out.shape[1])),
        grad_out.new_empty(grad_w_shape, dtype=grad_w_dtype),
    )
