"""The Python API: :func:`dispatch`, :func:`combine` and :class:`DispatchHandle`."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import _fixed
from moe_ops._ops import _check_combine, _check_dispatch, combine_op, dispatch_op


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What :func:`combine` (and both backwards) need from :func:`dispatch`.

    Meant for users: ``tokens_per_expert``, int64 ``[E_l]`` on x's device, rows of ``recv_x``
    per local expert in order (``cumsum`` gives grouped-GEMM offsets); in the default mode also
    ``tokens_per_expert_host``, the same counts on the CPU as dispatch's one sync read them
    (``recv_x.split(handle.tokens_per_expert_host.tolist())`` costs no second sync); in capacity
    mode (where it is None) also
    ``capacity`` (rows of ``recv_x``) and ``num_dropped``, an int64 0-d tensor on x's device:
    this rank's (token, slot) pairs that did not fit (always 0 with ``overflow="error"``). The
    other tensors describe the layout (see ``moe_ops._ops`` and ``moe_ops._fixed``); the ints
    name the group the rows went through.
    """

    tokens_per_expert: Tensor
    send_pair_idx: Tensor
    pair_pos: Tensor
    recv_perm: Tensor
    send_splits: Tensor
    recv_splits: Tensor
    num_experts: int
    group_name: str
    world_size: int
    capacity: int | None = None
    num_dropped: Tensor | None = None
    transport: str = ""
    recv_index: Tensor | None = None
    num_recv: Tensor | None = None
    splits: Tensor | None = None
    tokens_per_expert_host: Tensor | None = None

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    def _layout(self) -> tuple[Tensor, ...]:
        return (
            self.pair_pos,
            self.send_pair_idx,
            self.recv_perm,
            self.send_splits,
            self.recv_splits,
        )


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
    _raise_on_every_rank(err, dispatch_op, (*stand_ins, num_experts, group_name, world_size))


def dispatch(
    x: Tensor,
    topk_idx: Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
    *,
    capacity: int | str | None = None,
    overflow: str = "error",
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
            (symmetric buffers), unless C <= T * K on every rank with the padded transport.
            Rows reach their owners through one fixed-size ``all_to_all_single`` with
            ``min(C, T * K)`` rows per peer (gloo or NCCL); an experimental NVSHMEM transport
            (``torch.ops.symm_mem.all_to_all_vdev_2d``, device-side split sizes) is opt-in, see
            ``moe_ops._fixed``.
        overflow: capacity mode only: what happens to pairs that do not fit in C rows (the
            receiver's rows past C in its expert-major order). ``"error"``: on the CPU every rank
            raises ``ValueError`` naming the rows each rank would need; on CUDA a device-side
            assertion (``torch._assert_async``) fires, which aborts the CUDA context and reports
            the message at the next synchronizing call (checking on the host would be a sync).
            ``"drop"``: those pairs are not sent, add 0 in combine, get no gradient, and
            ``handle.num_dropped`` counts them on the sending rank. Bad expert ids are reported
            the same way as overflow errors, on CUDA by a device-side assertion.

    Returns:
        ``recv_x``: ``[R, H]``, one row per (token, slot) pair from any rank routed to one of this
        rank's experts, ordered by local expert, then source rank, then source token, then slot.
        ``handle``: a :class:`DispatchHandle` for :func:`combine`.

    Differentiable w.r.t. ``x``. Syncs the device with the host once (the row counts), none in
    capacity mode. Bad input on any rank raises ``ValueError``/``TypeError`` on every rank before
    any row moves (capacity mode on CUDA: see ``overflow``).
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
        err = _check_dispatch(x, topk_idx, num_experts, world_size)
        dev = _real_device(x, topk_idx)
        _fail_dispatch_on_every_rank(err, dev, num_experts, group_name, world_size)
    if capacity is not None or overflow != "error":
        return _dispatch_fixed(x, topk_idx, num_experts, group_name, world_size, capacity, overflow)
    recv_x, tokens_per_expert, *layout, tokens_per_expert_host = dispatch_op(
        x, topk_idx, num_experts, group_name, world_size
    )
    send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits = layout
    handle = DispatchHandle(
        tokens_per_expert,
        send_pair_idx,
        pair_pos,
        recv_perm,
        send_splits,
        recv_splits,
        num_experts,
        group_name,
        world_size,
        tokens_per_expert_host=tokens_per_expert_host,
    )
    return recv_x, handle


def _transport(x: Tensor, world_size: int) -> str:
    if _fixed.transport_override is not None:
        return _fixed.transport_override
    if world_size == 1:
        return "local"
    # The NVSHMEM transport passes its tests at W = 2 but has not been timed against the padded
    # one, so it is opt-in: set ``moe_ops._fixed.transport_override = "nvshmem"``.
    return "padded"


def _dispatch_fixed(x, topk_idx, num_experts, group_name, world_size, capacity, overflow):
    if overflow not in ("error", "drop"):
        raise ValueError(f"moe_ops.dispatch: overflow must be 'error' or 'drop', got {overflow!r}")
    if capacity is None:
        raise ValueError("moe_ops.dispatch: overflow is a capacity-mode option; pass capacity too")
    K = topk_idx.shape[1] if topk_idx.dim() == 2 else 1
    if capacity == "worst-case":
        capacity = world_size * x.shape[0] * K
    elif isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)):
        raise TypeError(
            f"moe_ops.dispatch: capacity must be None, an int or 'worst-case', got {capacity!r}"
        )
    elif isinstance(capacity, int) and capacity < 0:
        raise ValueError(f"moe_ops.dispatch: capacity must be >= 0 rows, got {capacity}")
    transport = _transport(x, world_size)
    recv_x, tpe, num_dropped, pair_pos, recv_index, num_recv, splits = _fixed.dispatch_fixed_op(
        x, topk_idx, num_experts, capacity, overflow == "drop", group_name, world_size, transport
    )
    empty = pair_pos.new_empty(0)
    handle = DispatchHandle(
        tpe,
        empty,
        pair_pos,
        empty,
        empty,
        empty,
        num_experts,
        group_name,
        world_size,
        capacity=capacity,
        num_dropped=num_dropped,
        transport=transport,
        recv_index=recv_index,
        num_recv=num_recv,
        splits=splits,
    )
    return recv_x, handle


def _combine_fixed(expert_out, handle, topk_weights):
    if expert_out.device != handle.pair_pos.device:
        raise ValueError(
            f"moe_ops.combine: expert_out is on {expert_out.device} but dispatch ran on "
            f"{handle.pair_pos.device}; expected the same device"
        )
    out, _ = _fixed.combine_fixed_op(
        expert_out,
        topk_weights,
        handle.pair_pos,
        handle.recv_index,
        handle.num_recv,
        handle.splits,
        handle.capacity,
        handle.group_name,
        handle.world_size,
        handle.transport,
    )
    return out


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
        (``-1`` slots add 0), accumulated in float32 for half types, in slot order.

    Differentiable w.r.t. ``expert_out`` and ``topk_weights``. No host sync.
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
    if topk_weights is not None and topk_weights.dim() == 1 and handle.pair_pos.shape[1] == 1:
        topk_weights = topk_weights.unsqueeze(1)
    if handle.capacity is not None:
        return _combine_fixed(expert_out, handle, topk_weights)
    layout = handle._layout()
    pair_pos = handle.pair_pos
    if expert_out.device != pair_pos.device or (
        topk_weights is not None and topk_weights.device != pair_pos.device
    ):
        R = handle.recv_perm.shape[0] if handle.world_size > 1 else handle.send_pair_idx.shape[0]
        err = _check_combine(expert_out, topk_weights, pair_pos, R)
        stand_ins = (
            torch.empty(expert_out.shape, dtype=expert_out.dtype, device=pair_pos.device),
            torch.empty((0, 0), device=pair_pos.device),  # never [T, K]: flags this rank as bad
        )
        _raise_on_every_rank(
            err, combine_op, (*stand_ins, *layout, handle.group_name, handle.world_size)
        )
    out, _ = combine_op(expert_out, topk_weights, *layout, handle.group_name, handle.world_size)
    return out
