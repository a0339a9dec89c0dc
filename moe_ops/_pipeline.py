"""Overlap experiment: :func:`chunked_moe`, dispatch of one micro-batch while the experts run on
another. Not part of the public API: at W = 1 on an H100 it was slower at every shape measured
(README, "Overlap"); it is kept for the W >= 2 measurement, where it could pay, and should go if
it does not win there either.

The tokens are cut into ``chunks`` micro-batches. On CUDA, micro-batch ``i + 1`` is dispatched on
a side stream while the experts of micro-batch ``i`` run on the current stream, so these overlap
with the expert GEMMs:

* its count exchange and the host's wait for the counts (the one sync of a dispatch: with the
  experts of ``i`` already queued, the GPU keeps working while the host waits);
* its layout and row-scatter kernels (memory bound, beside compute-bound GEMMs);
* its payload ``all_to_all`` (NCCL runs it on its own stream).

The order in which the host issues collectives is the same on every rank: ``d0, d1, c0, d2, c1,
..., c(n-1)`` (``d`` dispatch, ``c`` combine), so ranks agree without extra coordination. On the
CPU (gloo) the micro-batches run one after another: the result is the same, nothing overlaps.

Costs: ``chunks`` host syncs and ``3 * chunks`` collectives per forward instead of 1 and 3, and
``chunks`` launches of every expert kernel (each on fewer rows). See ``examples/bench_overlap.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops._api import (
    DispatchHandle,
    _fail_dispatch_on_every_rank,
    _real_device,
    _resolve,
    combine,
    dispatch,
)
from moe_ops._ops import _FLOAT_DTYPES, _check_dispatch

ExpertsFn = Callable[[Tensor, Tensor], Tensor]


@functools.cache
def _dispatch_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def _keep_for(stream: torch.cuda.Stream, recv_x: Tensor, handle: DispatchHandle) -> None:
    """Tell the caching allocator that tensors made on the side stream are used on ``stream``."""
    for t in (recv_x, *(v for v in vars(handle).values() if isinstance(v, Tensor))):
        if t.is_cuda:
            t.record_stream(stream)


def _check_inputs(x, topk_idx, topk_weights, num_experts: int, world_size: int):
    """Everything that can be checked before the first collective; the error or None."""
    if not isinstance(x, Tensor) or not isinstance(topk_idx, Tensor):
        return TypeError("moe_ops.chunked_moe: x and topk_idx must be Tensors")
    idx = topk_idx.unsqueeze(1) if topk_idx.dim() == 1 else topk_idx
    err = _check_dispatch(x, idx, num_experts, world_size)
    if err is not None or topk_weights is None:
        return err
    if not isinstance(topk_weights, Tensor) or topk_weights.dtype not in _FLOAT_DTYPES:
        return TypeError(
            "moe_ops.chunked_moe: topk_weights must be a floating-point Tensor or None"
        )
    if topk_weights.shape != topk_idx.shape or topk_weights.device != x.device:
        return ValueError(
            f"moe_ops.chunked_moe: topk_weights must match topk_idx ({list(topk_idx.shape)} on "
            f"{x.device}), got {list(topk_weights.shape)} on {topk_weights.device}"
        )
    return None


@torch.compiler.disable
def chunked_moe(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor | None,
    num_experts: int,
    experts: ExpertsFn,
    group: dist.ProcessGroup | None = None,
    *,
    chunks: int = 2,
) -> Tensor:
    """``combine(experts(*dispatch(x)))`` over ``chunks`` micro-batches of tokens, overlapped.

    Args:
        x, topk_idx, num_experts, group: as for :func:`moe_ops.dispatch` (default mode).
        topk_weights: as for :func:`moe_ops.combine`, or None.
        experts: ``experts(recv_x, tokens_per_expert) -> expert_out``, this rank's experts: rows
            of ``recv_x`` come grouped by local expert, ``tokens_per_expert`` (int64 ``[E_l]``,
            on the device) counts them; returns ``[R, H']``, one row per row of ``recv_x``.
            Called once per micro-batch, on the current stream.
        chunks: micro-batches (>= 1), the same on every rank of the group: consecutive runs of
            tokens as ``torch.tensor_split`` cuts them (the first ``T % chunks`` get one token
            more); a rank with fewer tokens than ``chunks`` sends empty micro-batches.
            ``chunks=1`` is plain dispatch, experts, combine.

    Returns:
        ``[T, H']``. Equal to the unchunked ``combine(experts(recv_x), handle, topk_weights)``
        when ``experts`` computes each row the same way whatever the other rows (the sums run in
        the same slot order); a GEMM library may pick other kernels for other row counts, so
        low-precision results can differ in the last bits.

    Bad inputs raise on every rank before any row moves, as in :func:`moe_ops.dispatch`. Not
    covered: an ``experts`` that fails (or returns the wrong rows) on one rank only at W > 1;
    that rank raises while its peers may wait for it in the next micro-batch's collectives until
    the process group times out.

    Differentiable like :func:`moe_ops.dispatch` and :func:`moe_ops.combine`. Runs eagerly (under
    ``torch.compile`` it is a graph break); forward syncs ``chunks`` times, backward never.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"moe_ops.chunked_moe: chunks must be an int >= 1, got {chunks!r}")
    if not callable(experts):
        raise TypeError(
            f"moe_ops.chunked_moe: experts must be callable(recv_x, tokens_per_expert), "
            f"got {type(experts).__name__}"
        )
    group_name, world_size = _resolve(group)
    err = _check_inputs(x, topk_idx, topk_weights, num_experts, world_size)
    if err is not None:
        if world_size == 1:
            raise err
        # Through dispatch's error path, so that the peers (in their first dispatch) raise too.
        dev = _real_device(*(t for t in (x, topk_idx) if isinstance(t, Tensor)))
        _fail_dispatch_on_every_rank(err, dev, num_experts, group_name, world_size)
    xs = x.tensor_split(chunks)
    idxs = topk_idx.tensor_split(chunks)
    ws = [None] * chunks if topk_weights is None else topk_weights.tensor_split(chunks)

    if not x.is_cuda or chunks == 1:
        outs = []
        for i in range(chunks):
            recv_x, handle = dispatch(xs[i], idxs[i], num_experts, group)
            outs.append(combine(experts(recv_x, handle.tokens_per_expert), handle, ws[i]))
        return torch.cat(outs)

    main = torch.cuda.current_stream(x.device)
    side = _dispatch_stream(x.device.index)
    inputs_ready = main.record_event()

    def start(i: int):
        side.wait_event(inputs_ready)
        with torch.cuda.stream(side):
            recv_x, handle = dispatch(xs[i], idxs[i], num_experts, group)
            done = side.record_event()
        return recv_x, handle, done

    outs = []
    pending = start(0)
    for i in range(chunks):
        recv_x, handle, done = pending
        main.wait_event(done)
        _keep_for(main, recv_x, handle)
        expert_out = experts(recv_x, handle.tokens_per_expert)
        if i + 1 < chunks:
            # The host waits for micro-batch i + 1's counts here, with i's experts queued.
            pending = start(i + 1)
        outs.append(combine(expert_out, handle, ws[i]))
    return torch.cat(outs)
