"""Communication: the count exchange, the one host sync, and the two payload exchanges.

Only this module talks to ``torch.distributed``. Every collective is an ``all_to_all_single``:

* :func:`exchange_counts`: ``[W, 1 + E_l]`` int64 per rank, a status flag then the counts per
  local expert. Its shape depends only on E and W, so a rank whose input is bad still takes part
  (flag set, counts zero) and every rank learns of it from the same call.
* :func:`rows_to_experts`: rows in send order -> rows in expert-major order on their owners
  (dispatch forward, combine backward).
* :func:`rows_to_sources`: the way back (combine forward, dispatch backward). Each chunk carries
  one extra status row so that a rank whose combine input is bad can still complete the exchange
  with the right sizes and tell its peers (no hang, no broken connection, and on CPU every rank
  raises; on GPU reading the flag would cost a host sync, so the bad rank's rows are NaN instead).

:func:`read_to_host` is the single device -> host sync of a dispatch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops._layout import expert_major_perm, triton_kernels

_OK, _BAD = 0, 1


class PeerInputError(ValueError):
    """Another rank's input was bad; that rank raised the detailed error."""


def resolve_group(group_name: str, world_size: int) -> dist.ProcessGroup | None:
    """The process group behind ``group_name``, or None for a single rank."""
    if world_size == 1:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    if group.size() != world_size:
        raise ValueError(
            f"moe_ops: group {group_name!r} has {group.size()} ranks but the op was called "
            f"with world_size={world_size}; pass the group that dispatch used"
        )
    return group


def read_to_host(t: Tensor, stream: torch.cuda.Stream | None = None) -> Tensor:
    """The one device -> host sync of a dispatch (a no-op copy on CPU).

    With a CUDA ``stream`` the copy and the wait run there, so work queued on the current stream
    after ``stream`` forked from it (the send-buffer fill) runs meanwhile.
    """
    if stream is None:
        return t.cpu()
    with torch.cuda.stream(stream):
        return t.cpu()


def exchange_counts(
    counts_E: Tensor, bad: Tensor | bool, world_size: int, group: dist.ProcessGroup
) -> Tensor:
    """Send ``counts_E`` (as ``[W, E_l]``) and a status flag to every rank; returns ``[W, 1 + E_l]``."""
    send = torch.empty((world_size, 1 + counts_E.shape[0] // world_size), dtype=torch.int64,
                       device=counts_E.device)
    send[:, 0] = torch.as_tensor(bad, device=counts_E.device).to(torch.int64)
    send[:, 1:] = counts_E.view(world_size, -1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def raise_if_peer_bad(status_W: list[int], my_rank: int, what: str) -> None:
    bad = [r for r, s in enumerate(status_W) if s != _OK and r != my_rank]
    if bad:
        raise PeerInputError(
            f"moe_ops.{what}: rank(s) {bad} of the group passed bad input (see the error raised "
            f"there); every rank raised and the group can be used again"
        )


def rows_to_experts(
    rows_N: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    recv_perm_R: Tensor,
    group: dist.ProcessGroup,
) -> Tensor:
    """Payload exchange towards the experts; returns rows in expert-major order ``[R, ...]``."""
    recv_RH = rows_N.new_empty((sum(recv_splits), *rows_N.shape[1:]))
    dist.all_to_all_single(recv_RH, rows_N.contiguous(), recv_splits, send_splits, group=group)
    kern = triton_kernels(recv_RH)
    return recv_RH[recv_perm_R] if kern is None else kern.gather_rows(recv_RH, recv_perm_R)


def _int64_on(values: list[int], device: torch.device) -> Tensor:
    """A small int64 tensor on ``device``; to CUDA through pinned memory, with no stream sync."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _status_row_positions(splits: list[int], device: torch.device) -> Tensor:
    pos, end = [], 0
    for n in splits:
        end += n + 1
        pos.append(end - 1)
    return _int64_on(pos, device)


def rows_to_sources(
    rows_R: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    recv_perm_R: Tensor,
    bad: bool,
    my_rank: int,
    group: dist.ProcessGroup,
    what: str,
) -> Tensor:
    """Payload exchange back to the sources.

    ``rows_R`` is in expert-major order, as the experts produced it. Returns the rows this rank
    sent, back in send order, with one status row after each destination's chunk:
    ``[N + W, ...]``, so chunk ``d`` starts at row ``sum(send_splits[:d]) + d``.
    """
    W = len(send_splits)
    device = rows_R.device
    R = sum(recv_splits)
    buf = rows_R.new_empty((R + W, *rows_R.shape[1:]))
    status_pos = _status_row_positions(recv_splits, device)
    if bad:
        buf.fill_(float("nan"))
        buf[status_pos] = _BAD
    else:
        chunk_of_R = torch.repeat_interleave(
            torch.arange(W, device=device), _int64_on(recv_splits, device), output_size=R
        )
        dest_R = recv_perm_R + chunk_of_R[recv_perm_R]
        kern = triton_kernels(rows_R)
        if kern is None:
            buf.index_copy_(0, dest_R, rows_R)
        else:
            kern.scatter_rows(rows_R, dest_R[:, None], None, R + W, out=buf)
        buf[status_pos] = _OK
    out = buf.new_empty((sum(send_splits) + W, *buf.shape[1:]))
    dist.all_to_all_single(
        out, buf, [n + 1 for n in send_splits], [n + 1 for n in recv_splits], group=group
    )
    if out.device.type == "cpu":
        status = out[_status_row_positions(send_splits, device)].reshape(W, -1)[:, 0]
        raise_if_peer_bad([0 if s == _OK else 1 for s in status.tolist()], my_rank, what)
    return out


def expert_major_layout(
    counts_WEl: Tensor, recv_splits: list[int]
) -> tuple[Tensor, Tensor]:
    """``tokens_per_expert`` ``[E_l]`` and the regroup permutation ``[R]`` from received counts."""
    return counts_WEl.sum(0), expert_major_perm(counts_WEl, sum(recv_splits))
