"""The Python API: :func:`dispatch`, :func:`combine` and :class:`DispatchHandle`.

Both modes enter here: the inputs are validated once, the mode is picked (default, or capacity
when ``capacity`` is given), and the raw ops' outputs are wrapped in a :class:`DispatchHandle`
that remembers which mode's combine to run.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import _capacity_ops, _ops
from moe_ops._checks import check_combine, check_dispatch


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What :func:`combine` (and both backwards) need from :func:`dispatch`.

    For users:

    * ``tokens_per_expert``: int64 ``[E_l]`` on x's device, rows of ``recv_x`` per local expert
      in order (``cumsum`` gives grouped-GEMM offsets).
    * ``tokens_per_expert_host`` (default mode; None in capacity mode): the same counts on the
      CPU as dispatch's one sync read them (``recv_x.split(handle.tokens_per_expert_host.tolist())``
      costs no second sync).
    * ``capacity`` (capacity mode; None in the default mode): C, the rows of ``recv_x``.
    * ``num_dropped`` (capacity mode): int64 0-d tensor on x's device, this rank's (token, slot)
      pairs that did not fit (always 0 with ``overflow="error"``).
    * ``num_experts``, ``group_name``, ``world_size``: the call's E and group.

    ``layout`` holds the tensors the mode's combine op takes after ``topk_weights``, in its order
    (``moe_ops._ops.Layout`` or ``moe_ops._capacity_ops.Layout``); ``transport`` is the capacity
    mode's transport.
    """

    tokens_per_expert: Tensor
    layout: _ops.Layout | _capacity_ops.Layout
    num_experts: int
    group_name: str
    world_size: int
    tokens_per_expert_host: Tensor | None = None
    capacity: int | None = None
    num_dropped: Tensor | None = None
    transport: str | None = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    def _combine_and_args(self) -> tuple:
        """The mode's combine (op, and its direct call) and its arguments after
        ``topk_weights``."""
        if self.capacity is None:
            return _ops.DIRECT.combine, (*self.layout, self.group_name, self.world_size)
        static = (self.capacity, self.group_name, self.world_size, self.transport)
        return _capacity_ops.DIRECT.combine, (*self.layout, *static)


def _resolve(group: dist.ProcessGroup | None) -> tuple[str, int]:
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return "", 1
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"moe_ops: group must be a ProcessGroup or None, got {type(group).__name__}"
        )
    return group.group_name, group.size()


def _real_device(*tensors: Tensor) -> torch.device:
    return next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))


def _raise_on_every_rank(err: Exception, op, args: tuple) -> None:
    """Raise ``err`` after running ``op`` on ``args``, same-device stand-ins that fail its checks.

    With inputs on several devices (one of them "meta", say) the dispatcher could pick a kernel
    that raises without taking part in the exchange, and the other ranks would wait forever; the
    stand-ins send this rank through the real kernel's error path, which tells them.
    """
    try:
        with torch.no_grad():
            op(*args)
    except (ValueError, TypeError):
        pass
    raise err


def _fail_dispatch_on_every_rank(
    err: Exception, device: torch.device, num_experts: int, group_name: str, world_size: int
) -> None:
    """Raise ``err`` here and make the peers' current dispatch raise ``PeerInputError``."""
    stand_ins = (
        torch.empty(0, device=device),
        torch.empty((0, 1), dtype=torch.int64, device=device),
    )
    _raise_on_every_rank(err, _ops.dispatch_op, (*stand_ins, num_experts, group_name, world_size))


def dispatch(
    x: Tensor,
    topk_idx: Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    *,
    capacity: int | str | None = None,
    overflow: str = "error",
    transport: str | None = None,
    sum_per_rank: bool = False,
    low_memory: bool = False,
) -> tuple[Tensor, DispatchHandle]:
    """Send every (token, slot) pair's row of ``x`` to the rank that owns its expert.

    Args:
        x: ``[T, H]`` float16/bfloat16/float32/float64; ``T`` may be 0.
        topk_idx: ``[T, K]`` (or ``[T]``, meaning K = 1) integer tensor of global expert ids in
            ``[0, num_experts)``, or ``-1`` for a slot that goes nowhere. Same device as ``x``.
        num_experts: E, the same on every rank (a model constant) and a multiple of the group size
            W. Rank ``r`` owns experts ``[r * E / W, (r + 1) * E / W)``.
        group: a ``ProcessGroup``; None means the default group when ``torch.distributed`` is
            initialized, else a single rank (no collective at all).
        capacity: None (default mode: ``recv_x`` has exactly R rows; one device -> host sync
            reads the counts). An int C >= 0 or ``"worst-case"`` turns on the capacity mode:
            no device -> host sync at all, ``recv_x`` is ``[C, H]`` (a static shape: CUDA graphs
            and torch.compile without dynamic shapes), rows past ``tokens_per_expert.sum()``
            are zero padding. ``"worst-case"`` is ``W * T * K`` (every pair of every rank could
            come here; at W = 1 that is T * K). At W > 1 every rank must pass the same T
            (symmetric buffers), unless C <= T * K on every rank with the padded or p2p
            transport.
            Rows reach their owners through one fixed-size ``all_to_all_single`` with
            ``min(C, T * K)`` rows per peer (gloo or NCCL); see ``transport``.
        overflow: capacity mode only: what happens to pairs that do not fit in C rows (the
            receiver's rows past C in its expert-major order). ``"error"``: on the CPU every rank
            raises ``ValueError`` naming the rows each rank would need; on CUDA a device-side
            assertion (``torch._assert_async``) fires, which aborts the CUDA context and reports
            the message at the next synchronizing call (checking on the host would be a sync).
            ``"drop"``: those pairs are not sent, add 0 in combine, get no gradient, and
            ``handle.num_dropped`` counts them on the sending rank. Bad expert ids (and, where
            chunks must be equal, unequal T or ``sum_per_rank`` across ranks) are reported the
            same way: on CUDA one device-side assertion covers every check that applies and
            names them all (the same call on CPU tensors names the one that failed).
        transport: capacity mode only: how rows move. None picks ``"local"`` at W = 1 and
            ``"padded"`` (the fixed-size ``all_to_all_single``) at W > 1. ``"p2p"`` (CUDA, W > 1,
            every GPU of the group in one NVLink domain)
            moves the same rows without NCCL: each rank writes what it sends into its own
            symmetric-memory buffer and reads its chunks straight from its peers' buffers after
            a device-side barrier (``torch.distributed._symmetric_memory``; persistent buffers
            per op, exchange and shape, allocated on first use: warm up before capturing a CUDA
            graph). It cannot share a process with ``"nvshmem"`` (torch's symmetric memory
            takes one backend per process; the second raises ``ValueError``). ``"nvshmem"`` is an
            experimental transport on CUDA with NVSHMEM (``torch.ops.symm_mem.all_to_all_vdev_2d``,
            device-side split sizes, every rank passes the same T; see
            ``moe_ops._capacity_ops``). On one host of 4 H200 it was slower than ``"padded"``
            (docs/notes_gpu.md) and its kernel refused 256 experts. At W > 1 every rank must
            pass the same transport.
        sum_per_rank: :func:`combine` (and dispatch's backward) sums each token's slots on the
            rank that holds their experts and sends one row per (token, rank) back instead of
            one per (token, slot), as dispatch sends them; combine's backward sends the
            gradient's token rows the same way, and the weights travel to the experts' ranks
            (one small exchange in combine). Default mode: K > W only (elsewhere it changes
            nothing), K / min(K, W) times fewer rows at most. Capacity mode: the padded or p2p
            transport with K > 1 only; dispatch then sends each token's row once per rank that
            keeps one of its pairs, with the rows its slots take there (in the same exchange), in
            chunks of ``min(C, T)`` rows per peer instead of ``min(C, T * K)``: K times fewer
            bytes each way at ``capacity="worst-case"``. Sums then run per rank in slot order
            (the partial sums rounded to expert_out's dtype), then over ranks in rank order: equal
            to the slot-order sum up to that rounding, no longer bit-identical across W. Every
            rank must pass the same value.
        low_memory: default mode, combine in slot order (not ``sum_per_rank`` with K > W): when
            a rank's (token, slot) rows take at least 512 MiB (at ``x``'s row size), combine
            gets them back in 8 rounds of that rank's tokens, each round's rows gathered while
            the round before is exchanged: the same sums in the same order (bit for bit), peak
            extra memory of dispatch + combine 1.5x the payload instead of 3x at T=16384
            H=7168 top-8/256, 10-25% slower there (docs/notes_gpu.md); dispatch then makes one
            more small exchange. Ranks may differ.

    Returns:
        ``recv_x``: ``[R, H]``, one row per (token, slot) pair from any rank routed to one of this
        rank's experts, ordered by local expert, then source rank, then source token, then slot.
        ``handle``: a :class:`DispatchHandle` for :func:`combine`.

    Differentiable w.r.t. ``x``. Syncs the device with the host once (the row counts), none in
    capacity mode. Bad input on any rank raises ``ValueError``/``TypeError`` on every rank before
    any row moves (capacity mode on CUDA: see ``overflow``). The kernels follow the device (fused
    Triton ones for CUDA tensors when Triton is installed; see :func:`moe_ops.use_kernels`).
    """
    group_name, world_size = _resolve(group)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool):
        raise TypeError(
            f"moe_ops.dispatch: num_experts must be an int, got {type(num_experts).__name__}"
        )
    if num_experts <= 0 or num_experts % world_size != 0:
        raise ValueError(
            f"moe_ops.dispatch: num_experts must be a positive multiple of the group size "
            f"{world_size}, got {num_experts}"
        )
    if not isinstance(x, Tensor) or not isinstance(topk_idx, Tensor):
        bad = "x" if not isinstance(x, Tensor) else "topk_idx"
        raise TypeError(f"moe_ops.dispatch: {bad} must be a Tensor")
    if topk_idx.dim() == 1:
        topk_idx = topk_idx.unsqueeze(1)
    if x.device != topk_idx.device:
        err = check_dispatch(x, topk_idx, num_experts, world_size)
        dev = _real_device(x, topk_idx)
        _fail_dispatch_on_every_rank(err, dev, num_experts, group_name, world_size)
    for name, value in (("sum_per_rank", sum_per_rank), ("low_memory", low_memory)):
        if not isinstance(value, bool):
            raise TypeError(f"moe_ops.dispatch: {name} must be a bool, got {type(value).__name__}")
    if capacity is not None or overflow != "error" or transport is not None:
        if low_memory:
            raise ValueError(
                "moe_ops.dispatch: low_memory is a default-mode option (the capacity mode's "
                "buffers have fixed sizes); pass capacity=None"
            )
        args = (x, topk_idx, num_experts, group_name, world_size)
        return _dispatch_capacity(*args, capacity, overflow, transport, sum_per_rank)
    out = _ops.DispatchOutputs(
        *_ops.DIRECT.dispatch(
            x, topk_idx, num_experts, group_name, world_size, sum_per_rank, low_memory
        )
    )
    handle = DispatchHandle(
        out.tokens_per_expert,
        out.layout(),
        num_experts,
        group_name,
        world_size,
        tokens_per_expert_host=out.tokens_per_expert_host,
    )
    return out.recv_x, handle


def _transport(
    x: Tensor, world_size: int, transport: str | None = None, group_name: str = ""
) -> str:
    """The capacity mode's transport: ``transport`` if given (checked), else ``"local"`` at
    W = 1 and ``"padded"`` at W > 1. At W = 1 the other transports need a (one-rank) group."""
    if transport is None:
        return "local" if world_size == 1 else "padded"
    if world_size > 1:
        allowed, where = ("padded", "p2p", "nvshmem"), f"{world_size} ranks"
    elif group_name:
        allowed, where = ("local", "padded", "nvshmem"), "a one-rank group"
    else:
        allowed, where = ("local",), "no process group"
    if transport not in allowed:
        raise ValueError(
            f"moe_ops.dispatch: transport must be None or one of {allowed} with {where}, "
            f"got {transport!r}"
        )
    if transport == "p2p" and x.device.type != "cuda":
        raise ValueError(
            f"moe_ops.dispatch: transport='p2p' reads the peers' GPU memory directly (CUDA "
            f"symmetric memory); x is on {x.device.type}: use transport='padded'"
        )
    return transport


def _dispatch_capacity(
    x, topk_idx, num_experts, group_name, world_size, capacity, overflow, transport, sum_per_rank
):
    if overflow not in ("error", "drop"):
        raise ValueError(f"moe_ops.dispatch: overflow must be 'error' or 'drop', got {overflow!r}")
    if capacity is None:
        option = "transport" if transport is not None else "overflow"
        raise ValueError(f"moe_ops.dispatch: {option} is a capacity-mode option; pass capacity too")
    K = topk_idx.shape[1] if topk_idx.dim() == 2 else 1
    if capacity == "worst-case":
        capacity = world_size * x.shape[0] * K
    elif isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)):
        raise TypeError(
            f"moe_ops.dispatch: capacity must be None, an int or 'worst-case', got {capacity!r}"
        )
    elif isinstance(capacity, int) and capacity < 0:
        raise ValueError(f"moe_ops.dispatch: capacity must be >= 0 rows, got {capacity}")
    transport = _transport(x, world_size, transport, group_name)
    drop = overflow == "drop"
    args = (x, topk_idx, num_experts, capacity, drop, group_name, world_size, transport)
    out = _capacity_ops.DispatchOutputs(*_capacity_ops.DIRECT.dispatch(*args, sum_per_rank))
    handle = DispatchHandle(
        out.tokens_per_expert,
        out.layout(),
        num_experts,
        group_name,
        world_size,
        capacity=capacity,
        num_dropped=out.num_dropped,
        transport=transport,
    )
    return out.recv_x, handle


def combine(
    expert_out: Tensor,
    handle: DispatchHandle,
    topk_weights: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Send expert outputs back to their tokens and sum them: the inverse of :func:`dispatch`.

    Args:
        expert_out: ``[R, H']``, row-aligned with ``recv_x`` (``H'`` may differ from ``H``); in
            capacity mode ``[C, H']`` (padding rows are never read).
        handle: the :class:`DispatchHandle` that :func:`dispatch` returned for these rows.
        topk_weights: optional ``[T, K]`` floating weights; None means 1 for every slot.
        group: optional; when given it must be the group ``dispatch`` used.

    Returns:
        ``[T, H']`` in ``expert_out``'s dtype, ``out[t] = sum_k w[t, k] * expert_out[row(t, k)]``
        (``-1`` slots add 0), accumulated in float32 for half types, in slot order (per rank,
        then over ranks, when dispatch had ``sum_per_rank``).

    Differentiable w.r.t. ``expert_out`` and ``topk_weights``; in the default mode at W > 1 the
    rows that came back (one per pair) are kept for the backward only when ``topk_weights``
    requires grad (the weight gradient reads them). No host sync. Runs the capacity mode's ops
    when ``handle`` comes from the capacity mode.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(
            f"moe_ops.combine: handle must be the DispatchHandle returned by moe_ops.dispatch, "
            f"got {type(handle).__name__}"
        )
    if group is not None or handle.world_size > 1:
        group_name, world_size = _resolve(group)
        if (group_name, world_size) != (handle.group_name, handle.world_size):
            raise ValueError(
                f"moe_ops.combine: handle comes from dispatch on group {handle.group_name!r} "
                f"({handle.world_size} ranks) but combine runs on group {group_name!r} "
                f"({world_size} ranks); pass the group that dispatch used"
            )
    pair_pos = handle.layout.pair_pos
    if topk_weights is not None and topk_weights.dim() == 1 and pair_pos.shape[1] == 1:
        topk_weights = topk_weights.unsqueeze(1)
    direct, args = handle._combine_and_args()
    if handle.capacity is None:  # the rows that came back are kept only for a weight gradient
        wants_grad = topk_weights is not None and topk_weights.requires_grad
        args = (*args, False, wants_grad and torch.is_grad_enabled())
    if handle.capacity is not None:
        if expert_out.device != pair_pos.device:
            raise ValueError(
                f"moe_ops.combine: expert_out is on {expert_out.device} but dispatch ran on "
                f"{pair_pos.device}; expected the same device"
            )
    elif expert_out.device != pair_pos.device or (
        topk_weights is not None and topk_weights.device != pair_pos.device
    ):
        lay = handle.layout
        R = _ops.num_recv_rows(lay.send_pair_idx, lay.recv_perm, handle.world_size)
        err = check_combine(expert_out, topk_weights, pair_pos, R)
        stand_ins = (
            torch.empty(expert_out.shape, dtype=expert_out.dtype, device=pair_pos.device),
            torch.empty((0, 0), device=pair_pos.device),  # never [T, K]: flags this rank as bad
        )
        _raise_on_every_rank(err, direct.op, (*stand_ins, *args))
    out, _ = direct(expert_out, topk_weights, *args)
    return out
