"""The custom ops ``moe_ops::dispatch``, ``moe_ops::combine`` and ``moe_ops::_combine_backward``.

Each op sits next to its fake kernel and its autograd formula. Shape letters: see ``_layout``.

``dispatch(x[T, H], topk_idx[T, K], num_experts, group_name, world_size)`` returns 8 tensors:

    recv_x             [R, H]   rows for this rank's experts, expert-major (see moe_ops.dispatch)
    tokens_per_expert  [E_l]    int64, rows of recv_x per local expert
    send_pair_idx      [N]      int64, flat pair index t * K + k of every row sent, in send order
    pair_pos           [T, K]   int64, row of each pair in the buffer combine gets back, -1 unused
    recv_perm          [R]      int64, regroup index source-major -> expert-major ([0] when W = 1)
    send_splits        [W]      int64 on the CPU, rows sent to each rank
    recv_splits        [W]      int64 on the CPU, rows received from each rank
    tokens_per_expert_host [E_l] int64 on the CPU, ``tokens_per_expert`` as read by the one sync
                                 (per-expert loops size their segments from it, no second sync)

``combine(expert_out[R, H'], topk_weights[T, K]?, <the handle's tensors>, group_name, world_size)``
returns ``out[T, H']`` and ``returned_rows``: the rows that came back to this rank in send order,
with one status row per source chunk (``[N + W, H']``); combine's backward needs them for the
weight gradient. When ``W = 1`` nothing moves and ``returned_rows`` is ``[0, H']``: the backward
uses ``expert_out`` itself.

``_combine_backward`` returns ``grad_expert_out[R, H']`` and ``grad_topk_weights[T, K]`` (``[0, 0]``
when not asked for).

Host syncs: dispatch reads the counts once (``_comm.read_to_host``); combine and both backwards
reuse the CPU split tensors (``send_splits``, ``recv_splits``: the exchange sizes are read from
them on the host) and never sync: what they need on the device is either derived from device
tensors or copied from pinned memory without a sync (``_comm._int64_on``), and constants are
written with fills, never by assigning a Python scalar (which copies it from pageable memory).
All three carry ``torch.Tag.cudagraph_unsafe``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import _comm, _layout

# The default-mode ops read row counts on the host (dispatch) or size their exchanges from CPU
# split tensors (combine, its backward): a CUDA graph would replay the first call's sizes. Tagged
# so that inductor's CUDA graphs (mode="reduce-overhead") leave them out of the captured parts.
# The capacity-mode ops in ``_fixed`` are graph-safe and untagged.
_NOT_CUDAGRAPH_SAFE = (torch.Tag.cudagraph_unsafe,)

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_dispatch(
    x: Tensor, topk_idx: Tensor, num_experts: int, world_size: int
) -> Exception | None:
    """Shape/dtype/device checks that need no data; returns the error instead of raising it."""
    if x.dim() != 2:
        return ValueError(f"moe_ops.dispatch: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        return TypeError(f"moe_ops.dispatch: x must be floating point, got dtype {x.dtype}")
    if topk_idx.dtype not in _INT_DTYPES:
        return TypeError(
            "moe_ops.dispatch: topk_idx must be an integer tensor of expert ids, "
            f"got dtype {topk_idx.dtype}"
        )
    if topk_idx.dim() != 2:
        return ValueError(
            f"moe_ops.dispatch: topk_idx must be [T, K] (or [T]), got shape {tuple(topk_idx.shape)}"
        )
    if topk_idx.shape[0] != x.shape[0]:
        return ValueError(
            f"moe_ops.dispatch: topk_idx has {topk_idx.shape[0]} rows but x has {x.shape[0]} "
            "tokens; "
            "expected one row of expert ids per token"
        )
    if topk_idx.device != x.device:
        return ValueError(
            f"moe_ops.dispatch: topk_idx is on {topk_idx.device} but x is on {x.device}; "
            "expected both on the same device"
        )
    if num_experts <= 0 or num_experts % world_size != 0:
        return ValueError(
            f"moe_ops.dispatch: num_experts must be a positive multiple of the group size "
            f"{world_size}, got {num_experts}"
        )
    return None


def _bad_id_error(topk_idx: Tensor, num_experts: int) -> ValueError:
    ids = topk_idx.reshape(-1).to(torch.int64)
    bad = ids[(ids < -1) | (ids >= num_experts)]
    return ValueError(
        f"moe_ops.dispatch: topk_idx values must be expert ids in [0, {num_experts}) or -1 for an "
        f"unused slot; got {bad.numel()} out-of-range value(s), e.g. {bad[:4].tolist()}"
    )


def _check_combine(
    expert_out: Tensor, topk_weights: Tensor | None, pair_pos: Tensor, num_rows
) -> Exception | None:
    if expert_out.dim() != 2:
        return ValueError(
            f"moe_ops.combine: expert_out must be 2-D [R, H'], got shape {tuple(expert_out.shape)}"
        )
    if expert_out.dtype not in _FLOAT_DTYPES:
        return TypeError(
            f"moe_ops.combine: expert_out must be floating point, got {expert_out.dtype}"
        )
    rows = expert_out.shape[0]
    if isinstance(rows, int) and isinstance(num_rows, int) and rows != num_rows:
        return ValueError(
            f"moe_ops.combine: expert_out must have one row per row of recv_x (R={num_rows}), "
            f"got {rows} rows"
        )
    if expert_out.device != pair_pos.device:
        return ValueError(
            f"moe_ops.combine: expert_out is on {expert_out.device} but dispatch ran on "
            f"{pair_pos.device}; expected the same device"
        )
    if topk_weights is not None:
        if topk_weights.dtype not in _FLOAT_DTYPES:
            return TypeError(
                f"moe_ops.combine: topk_weights must be floating point, got {topk_weights.dtype}"
            )
        if tuple(topk_weights.shape) != tuple(pair_pos.shape):
            return ValueError(
                f"moe_ops.combine: topk_weights must be [T, K] = {list(pair_pos.shape)} like the "
                f"topk_idx given to dispatch, got {list(topk_weights.shape)}"
            )
        if topk_weights.device != pair_pos.device:
            return ValueError(
                f"moe_ops.combine: topk_weights is on {topk_weights.device} but dispatch ran on "
                f"{pair_pos.device}; expected the same device"
            )
    return None


def _num_recv_rows(send_pair_idx: Tensor, recv_perm: Tensor, world_size: int):
    return send_pair_idx.shape[0] if world_size == 1 else recv_perm.shape[0]


# ----------------------------------------------------------------------------- dispatch
@torch.library.custom_op("moe_ops::dispatch", mutates_args=(), tags=_NOT_CUDAGRAPH_SAFE)
def dispatch_op(
    x: Tensor, topk_idx: Tensor, num_experts: int, group_name: str, world_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    group = _comm.resolve_group(group_name, world_size)
    err = _check_dispatch(x, topk_idx, num_experts, world_size)
    W, E = world_size, num_experts
    if err is not None and group is None:
        raise err
    kern = _layout.triton_kernels(x) if err is None else None
    if kern is not None:
        T, K = topk_idx.shape
        lay = kern.send_layout(topk_idx, E, W)
        counts_E, bad_ids = lay.counts_bad[:E], lay.counts_bad[E]  # bad-id count: 0 is good
    elif err is None:
        T, K = topk_idx.shape
        order_P, counts_E = _layout.send_layout(topk_idx, E)
        ids = topk_idx.to(torch.int64)
        bad_ids = ((ids < -1) | (ids >= E)).any()
    else:
        counts_E = torch.zeros(E if E > 0 and E % W == 0 else W, dtype=torch.int64, device=x.device)
        bad_ids = True

    side = None
    if group is None:
        if kern is not None:
            to_read = lay.counts_bad
        else:
            to_read = torch.cat([counts_E, bad_ids.view(1).to(torch.int64)])
    else:
        rank = group.rank()
        recv_WC = _comm.exchange_counts(counts_E, bad_ids, W, group)
        to_read = torch.cat([counts_E, recv_WC.reshape(-1)])
    if kern is not None:
        # Fill a send buffer sized for every pair while the counts travel to the host.
        side = kern.fork_stream(x)
        rows_PH = kern.scatter_rows(x, lay.send_pos, None, T * K)
    host = _comm.read_to_host(to_read, side)
    if group is None:
        if host[-1]:
            raise _bad_id_error(topk_idx, E)
        send_splits = recv_splits = [int(host[:-1].sum())]
        tpe_host = host[:-1].clone()
    else:
        status_W = host[counts_E.shape[0] :].view(W, -1)[:, 0].tolist()
        if status_W[rank]:
            raise err if err is not None else _bad_id_error(topk_idx, E)
        _comm.raise_if_peer_bad(status_W, rank, "dispatch")
        send_splits = host[:E].view(W, -1).sum(1).tolist()
        recv_splits = host[E:].view(W, -1)[:, 1:].sum(1).tolist()
        tpe_host = host[E:].view(W, -1)[:, 1:].sum(0)

    N = sum(send_splits)
    if kern is not None:
        send_pair_idx = lay.send_pair_idx[:N]
        rows_NH = rows_PH[:N]
    else:
        send_pair_idx = order_P[:N]
        rows_NH = x[send_pair_idx // K]
    if group is None:
        recv_x, tokens_per_expert = rows_NH, counts_E
        recv_perm = torch.empty(0, dtype=torch.int64, device=x.device)
    else:
        tokens_per_expert, recv_perm = _comm.expert_major_layout(recv_WC[:, 1:], recv_splits)
        recv_x = _comm.rows_to_experts(rows_NH, send_splits, recv_splits, recv_perm, group)
    if kern is not None:
        pair_pos = lay.pair_pos  # at W > 1 send_layout already shifted it by the destination rank
    elif group is None:
        pair_pos = _layout.pair_positions(send_pair_idx, T * K)
    else:
        # combine gets each chunk back followed by a status row: shift by the destination rank.
        # rows per destination from the device-resident counts (a tensor built from the host's
        # send_splits would be a second, synchronizing host -> device copy)
        dest_N = torch.repeat_interleave(
            torch.arange(W, device=x.device), counts_E.view(W, -1).sum(1), output_size=N
        )
        pair_pos = _layout.pair_positions(send_pair_idx, T * K, dest_N)
    return (
        recv_x,
        tokens_per_expert,
        send_pair_idx,
        pair_pos.view(T, K),
        recv_perm,
        torch.tensor(send_splits, dtype=torch.int64),
        torch.tensor(recv_splits, dtype=torch.int64),
        tpe_host,
    )


@dispatch_op.register_fake
def _(x, topk_idx, num_experts, group_name, world_size):
    err = _check_dispatch(x, topk_idx, num_experts, world_size)
    if err is not None:
        raise err
    T, K = topk_idx.shape
    ctx = torch.library.get_ctx()
    N = ctx.new_dynamic_size()
    torch._check(N <= T * K)
    R = N if world_size == 1 else ctx.new_dynamic_size()
    i64 = dict(dtype=torch.int64, device=x.device)
    return (
        x.new_empty((R, x.shape[1])),
        torch.empty(num_experts // world_size, **i64),
        torch.empty(N, **i64),
        torch.empty((T, K), **i64),
        torch.empty(R if world_size > 1 else 0, **i64),
        torch.empty(world_size, dtype=torch.int64, device="cpu"),
        torch.empty(world_size, dtype=torch.int64, device="cpu"),
        torch.empty(num_experts // world_size, dtype=torch.int64, device="cpu"),
    )


def _dispatch_setup_context(ctx, inputs, output):
    _, _, _, group_name, world_size = inputs
    send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits = output[2:7]
    ctx.save_for_backward(send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits)
    ctx.group_name, ctx.world_size = group_name, world_size


def _dispatch_backward(ctx, grad_recv_x, *_):
    send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits = ctx.saved_tensors
    grad_x, _ = combine_op(
        grad_recv_x,
        None,
        pair_pos,
        send_pair_idx,
        recv_perm,
        send_splits,
        recv_splits,
        ctx.group_name,
        ctx.world_size,
    )
    return grad_x, None, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup_context)


# ----------------------------------------------------------------------------- combine
@torch.library.custom_op("moe_ops::combine", mutates_args=(), tags=_NOT_CUDAGRAPH_SAFE)
def combine_op(
    expert_out: Tensor,
    topk_weights: Tensor | None,
    pair_pos: Tensor,
    send_pair_idx: Tensor,
    recv_perm: Tensor,
    send_splits: Tensor,
    recv_splits: Tensor,
    group_name: str,
    world_size: int,
) -> tuple[Tensor, Tensor]:
    group = _comm.resolve_group(group_name, world_size)
    err = _check_combine(
        expert_out, topk_weights, pair_pos, _num_recv_rows(send_pair_idx, recv_perm, world_size)
    )
    if group is None:
        if err is not None:
            raise err
        rows = expert_out
        returned = expert_out.new_empty((0, expert_out.shape[1]))
    else:
        width = expert_out.shape[-1] if expert_out.dim() >= 1 else 1
        dtype = expert_out.dtype if expert_out.dtype in _FLOAT_DTYPES else torch.float32
        rows_R = (
            expert_out
            if err is None
            else torch.empty((recv_perm.shape[0], width), dtype=dtype, device=pair_pos.device)
        )
        rows = returned = _comm.rows_to_sources(
            rows_R,
            send_splits.tolist(),
            recv_splits.tolist(),
            recv_perm,
            err is not None,
            group.rank(),
            group,
            "combine",
        )
        if err is not None:
            raise err
    kern = _layout.triton_kernels(rows)
    if kern is not None:
        out = kern.combine_rows(rows, pair_pos, topk_weights, expert_out.dtype)
    else:
        out = _layout.weighted_slot_sum(rows, pair_pos, topk_weights, expert_out.dtype)
    return out, returned


@combine_op.register_fake
def _(
    expert_out,
    topk_weights,
    pair_pos,
    send_pair_idx,
    recv_perm,
    send_splits,
    recv_splits,
    group_name,
    world_size,
):
    R = _num_recv_rows(send_pair_idx, recv_perm, world_size)
    err = _check_combine(expert_out, topk_weights, pair_pos, R)
    if err is not None:
        raise err
    torch._check(
        expert_out.shape[0] == R,
        lambda: "moe_ops.combine: expert_out must have one row per row of recv_x",
    )
    T = pair_pos.shape[0]
    M = 0 if world_size == 1 else send_pair_idx.shape[0] + world_size
    return expert_out.new_empty((T, expert_out.shape[1])), expert_out.new_empty(
        (M, expert_out.shape[1])
    )


def _combine_setup_context(ctx, inputs, output):
    expert_out, topk_weights, *handle, group_name, world_size = inputs
    returned = expert_out if world_size == 1 else output[1]
    ctx.save_for_backward(returned, topk_weights, *handle)
    ctx.group_name, ctx.world_size = group_name, world_size


def _combine_backward(ctx, grad_out, _grad_returned):
    returned, topk_weights, *handle = ctx.saved_tensors
    want_w = topk_weights is not None and ctx.needs_input_grad[1]
    grad_expert_out, grad_w = combine_backward_op(
        grad_out,
        returned if want_w else None,
        topk_weights,
        *handle,
        ctx.group_name,
        ctx.world_size,
    )
    return grad_expert_out, grad_w if want_w else None, None, None, None, None, None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


@torch.library.custom_op("moe_ops::_combine_backward", mutates_args=(), tags=_NOT_CUDAGRAPH_SAFE)
def combine_backward_op(
    grad_out: Tensor,
    returned_rows: Tensor | None,
    topk_weights: Tensor | None,
    pair_pos: Tensor,
    send_pair_idx: Tensor,
    recv_perm: Tensor,
    send_splits: Tensor,
    recv_splits: Tensor,
    group_name: str,
    world_size: int,
) -> tuple[Tensor, Tensor]:
    """Combine's gradients: w.r.t. expert_out; w.r.t. topk_weights if ``returned_rows`` is given."""
    group = _comm.resolve_group(group_name, world_size)
    K = pair_pos.shape[1]
    kern = _layout.triton_kernels(grad_out)
    if kern is not None and group is None:
        rows_NH = kern.scatter_rows(grad_out, pair_pos, topk_weights, send_pair_idx.shape[0])
    elif kern is not None:
        w_N = None if topk_weights is None else topk_weights.reshape(-1)[send_pair_idx]
        rows_NH = kern.gather_rows(grad_out, send_pair_idx // K, w_N)
    else:
        rows_NH = grad_out[send_pair_idx // K]
    if topk_weights is not None and kern is None:
        adt = _layout.acc_dtype(grad_out.dtype)
        w_N = topk_weights.reshape(-1)[send_pair_idx].to(adt)
        rows_NH = (rows_NH.to(adt) * w_N[:, None]).to(grad_out.dtype)
    if group is None:
        grad_expert_out = rows_NH
    else:
        grad_expert_out = _comm.rows_to_experts(
            rows_NH, send_splits.tolist(), recv_splits.tolist(), recv_perm, group
        )
    if returned_rows is None:
        grad_w = grad_out.new_empty((0, 0))
    else:
        grad_w = (kern or _layout).slot_dot(grad_out, returned_rows, pair_pos, topk_weights.dtype)
    return grad_expert_out, grad_w


@combine_backward_op.register_fake
def _(
    grad_out,
    returned_rows,
    topk_weights,
    pair_pos,
    send_pair_idx,
    recv_perm,
    send_splits,
    recv_splits,
    group_name,
    world_size,
):
    R = _num_recv_rows(send_pair_idx, recv_perm, world_size)
    grad_w_shape = (0, 0) if returned_rows is None else tuple(pair_pos.shape)
    grad_w_dtype = grad_out.dtype if topk_weights is None else topk_weights.dtype
    return (
        grad_out.new_empty((R, grad_out.shape[1])),
        grad_out.new_empty(grad_w_shape, dtype=grad_w_dtype),
    )
