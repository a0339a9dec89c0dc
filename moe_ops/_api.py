"""The Python API: :func:`dispatch`, :func:`combine` and :class:`DispatchHandle`."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops._ops import _check_combine, _check_dispatch, combine_op, dispatch_op


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What :func:`combine` (and both backwards) need from :func:`dispatch`.

    Only ``tokens_per_expert`` is meant for users: int64 ``[E_l]`` on x's device, rows of ``recv_x``
    per local expert in order (``cumsum`` gives grouped-GEMM offsets). The other tensors describe
    the layout (see ``moe_ops._ops``); the ints name the group the rows went through.
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

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    def _layout(self) -> tuple[Tensor, ...]:
        return (self.pair_pos, self.send_pair_idx, self.recv_perm, self.send_splits, self.recv_splits)


def _resolve(group: dist.ProcessGroup | None) -> tuple[str, int]:
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return "", 1
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"moe_ops: group must be a ProcessGroup or None, got {type(group).__name__}")
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


def dispatch(
    x: Tensor, topk_idx: Tensor, num_experts: int, group: dist.ProcessGroup | None = None
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

    Returns:
        ``recv_x``: ``[R, H]``, one row per (token, slot) pair from any rank routed to one of this
        rank's experts, ordered by local expert, then source rank, then source token, then slot.
        ``handle``: a :class:`DispatchHandle` for :func:`combine`.

    Differentiable w.r.t. ``x``. Syncs the device with the host once (the row counts). Bad input on
    any rank raises ``ValueError``/``TypeError`` on every rank before any row moves.
    """
    group_name, world_size = _resolve(group)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool):
        raise TypeError(f"moe_ops.dispatch: num_experts must be an int, got {type(num_experts).__name__}")
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
        dev = _real_device(x, topk_idx)
        stand_ins = (torch.empty(0, device=dev), torch.empty((0, 1), dtype=torch.int64, device=dev))
        err = _check_dispatch(x, topk_idx, num_experts, world_size)
        _raise_on_every_rank(err, dispatch_op, (*stand_ins, num_experts, group_name, world_size))
    recv_x, tokens_per_expert, *layout = dispatch_op(
        x, topk_idx, num_experts, group_name, world_size
    )
    send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits = layout
    handle = DispatchHandle(
        tokens_per_expert, send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits,
        num_experts, group_name, world_size,
    )
    return recv_x, handle


def combine(
    expert_out: Tensor,
    handle: DispatchHandle,
    topk_weights: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Send expert outputs back to their tokens and sum them: the inverse of :func:`dispatch`.

    Args:
        expert_out: ``[R, H']``, row-aligned with ``recv_x`` (``H'`` may differ from ``H``).
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
