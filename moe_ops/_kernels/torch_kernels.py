"""The row kernels in plain torch ops: the CPU path, and the CUDA path under
``use_kernels("torch")``.

Same functions and signatures as ``moe_ops._kernels.triton_kernels``, same results bit for bit
(except ``slot_dot``, whose sums run in another fixed order there). Nothing here syncs with the
host or indexes with a boolean mask, so the capacity mode stays capturable in a CUDA graph.
Shape letters: see ``moe_ops._layout``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import _layout
from moe_ops._layout import (
    FIXED_BAD,
    FIXED_PER_RANK,
    FIXED_T,
    FixedPlan,
    SendLayout,
    acc_dtype,
    excl_cumsum,
)


def send_layout(
    topk_idx_TK: Tensor, num_experts: int, world_size: int, count_row: Tensor | None = None
) -> SendLayout:
    """Stable sort of the pairs by global expert; see :class:`~moe_ops._layout.SendLayout`.

    ``count_row``: int64 ``[W, 2 + E / W]``, each row contiguous; if given, the count row that
    dispatch's count exchange sends is written there (``moe_ops._layout.write_count_row``).
    """
    T, K = topk_idx_TK.shape
    E, P = num_experts, T * K
    dev = topk_idx_TK.device
    ids_P = topk_idx_TK.reshape(-1).to(torch.int64)
    valid_P = (ids_P >= 0) & (ids_P < E)
    key_P = torch.where(valid_P, ids_P, E)  # unused and out-of-range slots sort last
    sorted_P, order_P = torch.sort(key_P, stable=True)
    # Counts from the sorted keys: no boolean-mask indexing and no bincount (on CUDA both read
    # sizes back to the host).
    bounds = torch.searchsorted(sorted_P, torch.arange(E + 1, dtype=torch.int64, device=dev))
    counts_E = bounds[1:] - bounds[:-1]
    bad = ((ids_P < -1) | (ids_P >= E)).sum().view(1)
    row_P = torch.empty_like(order_P).index_copy_(0, order_P, torch.arange(P, device=dev))
    send_pos = torch.where(valid_P, row_P, -1).view(T, K)
    if world_size > 1:
        pair_pos = torch.where(valid_P, row_P + ids_P // (E // world_size), -1).view(T, K)
    else:
        pair_pos = send_pos
    if count_row is not None:
        _layout.write_count_row(count_row, counts_E, bad)
    return SendLayout(send_pos, pair_pos, order_P, torch.cat([counts_E, bad]))


def token_rows(
    topk_idx_TK: Tensor, num_experts: int, world_size: int, rows_out: Tensor | None = None
) -> _layout.TokenRows:
    """``moe_ops._layout.token_rows``; ``rows_W`` is written into ``rows_out`` (``[W]`` int64,
    may be strided: the token-row column of the count row) when given."""
    return _layout.token_rows(topk_idx_TK, num_experts, world_size, rows_out)


def expert_major_rows(counts_WEl: Tensor, num_rows: int, max_count: int) -> tuple[Tensor, Tensor]:
    """``moe_ops._layout.expert_major_rows`` and the rows per local expert, ``counts.sum(0)``
    (``max_count`` sizes the Triton version's grid)."""
    return _layout.expert_major_rows(counts_WEl, num_rows), counts_WEl.sum(0)


def regroup_by_expert(
    src_MH: Tensor, counts_WEl: Tensor, num_rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows received source-major with a spare row after each source's chunk (``src_MH``,
    ``counts_WEl[s, e]`` rows from source s for local expert e) in expert-major order: returns
    ``(rows [R, H], expert_major_rows [R + W], rows per local expert [E_l])``."""
    perm, tokens = expert_major_rows(counts_WEl, num_rows, 0)
    return gather_rows(src_MH, perm[:num_rows]), perm, tokens


def scatter_rows(
    src_MH: Tensor, pos_MK: Tensor, w_MK: Tensor | None, num_rows: int, out: Tensor | None = None
) -> Tensor:
    """``dst[pos[m, k]] = src[m]`` (times ``w[m, k]`` in the accumulation dtype, then cast back).

    ``pos_MK`` int64 ``[M, K]`` (-1: skip). Returns ``dst`` ``[num_rows, H]`` in src's dtype
    (``out`` if given); rows no pair points at hold whatever was there.
    """
    H = src_MH.shape[1]
    adt = acc_dtype(src_MH.dtype)
    buf = src_MH.new_empty((num_rows + 1, H))  # the spare last row takes the -1 slots
    if out is not None:  # rows no pair points at keep out's values
        buf[:num_rows].copy_(out)
    for k in range(pos_MK.shape[1]):
        rows = src_MH
        if w_MK is not None:
            rows = (src_MH.to(adt) * w_MK[:, k, None].to(adt)).to(src_MH.dtype)
        pos_M = pos_MK[:, k]
        buf.index_copy_(0, torch.where(pos_M >= 0, pos_M, num_rows), rows)
    if out is None:
        return buf[:num_rows]
    return out.copy_(buf[:num_rows])


def place_rows(
    src_MH: Tensor, dest_M: Tensor, out: Tensor, fill_rows: Tensor | None = None, value: float = 0
) -> Tensor:
    """``out[dest[m]] = src[m]`` for a ``dest_M`` of distinct valid rows, and ``value`` in the
    rows ``fill_rows`` (distinct from ``dest_M``'s) if given; returns ``out``."""
    out.index_copy_(0, dest_M, src_MH)
    if fill_rows is not None:
        # index_fill_ takes the value as a kernel argument: ``out[rows] = value`` would copy a
        # Python scalar to the device from pageable memory (a host sync on CUDA)
        out.index_fill_(0, fill_rows, value)
    return out


def gather_rows(
    src_SH: Tensor,
    idx_M: Tensor,
    w_M: Tensor | None = None,
    per_row: int = 1,
    negative: bool = False,
) -> Tensor:
    """``dst[i] = src[idx[i] // per_row]`` (times ``w[i]``, in the accumulation dtype): ``[M,
    H]``; with ``negative``, ``idx`` may hold negative entries, which give zero rows."""
    src_M = idx_M if per_row == 1 else idx_M // per_row
    if not negative:
        rows = src_SH[src_M]
    elif src_SH.shape[0] == 0:  # every index is negative
        rows = src_SH.new_zeros((idx_M.shape[0], src_SH.shape[1]))
    else:
        rows = torch.where(src_M[:, None] >= 0, src_SH[src_M.clamp(min=0)], 0)
    if w_M is None:
        return rows
    adt = acc_dtype(src_SH.dtype)
    return (rows.to(adt) * w_M[:, None].to(adt)).to(src_SH.dtype)


def combine_rows(
    rows_MH: Tensor,
    pair_pos_TK: Tensor,
    topk_weights_TK: Tensor | None,
    out_dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum_k w[t, k] * rows[pair_pos[t, k]]`` summed in slot order, ``-1`` slots add 0;
    written into ``out`` (``[T, H]`` of ``out_dtype``) when given.

    Accumulates in ``acc_dtype``, so the result is bitwise reproducible and equal to the
    reference oracle's.
    """
    T, K = pair_pos_TK.shape
    adt = acc_dtype(out_dtype)
    acc_TH = torch.zeros((T, rows_MH.shape[1]), dtype=adt, device=rows_MH.device)
    if rows_MH.shape[0] > 0:
        for k in range(K):
            pos_T = pair_pos_TK[:, k]
            contrib_TH = rows_MH[pos_T.clamp(min=0)].to(adt)
            if topk_weights_TK is not None:
                contrib_TH = contrib_TH * topk_weights_TK[:, k, None].to(adt)
            acc_TH += torch.where(pos_T[:, None] >= 0, contrib_TH, 0)
    if out is None:
        return acc_TH.to(out_dtype)
    return out.copy_(acc_TH)


def slot_dot(
    grad_TH: Tensor, rows_MH: Tensor, pair_pos_TK: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``g[t, k] = <grad[t], rows[pair_pos[t, k]]>``, 0 for ``-1`` slots (weight gradient)."""
    T, K = pair_pos_TK.shape
    adt = acc_dtype(grad_TH.dtype)
    if rows_MH.shape[0] == 0:
        return torch.zeros((T, K), dtype=out_dtype, device=grad_TH.device)
    g_TH = grad_TH.to(adt)
    cols = []
    for k in range(K):
        pos_T = pair_pos_TK[:, k]
        dot_T = (rows_MH[pos_T.clamp(min=0)].to(adt) * g_TH).sum(-1)
        cols.append(torch.where(pos_T >= 0, dot_T, 0))
    return torch.stack(cols, 1).to(out_dtype)


def zero_tail(dst_MH: Tensor, n: Tensor) -> Tensor:
    """``dst[n:] = 0`` in place, with ``n`` an int64 tensor on the device (no host sync)."""
    tail_M = torch.arange(dst_MH.shape[0], device=dst_MH.device) >= n.reshape(1)
    return dst_MH.masked_fill_(tail_M[:, None], 0)  # a fill, not boolean-mask indexing


# ----------------------------------------------------------------------------- capacity mode
def fixed_plan(
    every_WX: Tensor, num_experts: int, capacity: int, rank: int, rows_per_token: int, checks: int
) -> FixedPlan:
    """The capacity mode's :class:`~moe_ops._layout.FixedPlan` from every rank's count row
    (``every_WX[s]``: rank s's counts per global expert, then the ``FIXED_*`` columns);
    ``checks``: which of the first four ``ok`` flags ``ok[4]`` requires (bit i: ``ok[i]``)."""
    W, E, C = every_WX.shape[0], num_experts, capacity
    counts_sde = every_WX[:, :E].reshape(W, W, E // W)  # [source, destination, local expert]
    before_e = excl_cumsum(counts_sde.sum(0), 1)  # [destination, expert]
    off_sde = before_e[None] + excl_cumsum(counts_sde, 0)
    kept_sde = (C - off_sde).clamp(min=0).minimum(counts_sde)
    mine_E = counts_sde[rank].reshape(E)
    kept_E = kept_sde[rank].reshape(E)
    kept_se = kept_sde[:, rank]
    tokens_per_expert = kept_se.sum(0)
    S_W = (every_WX[:, E + FIXED_T] * rows_per_token).clamp(max=C)
    per_rank_W = every_WX[:, E + FIXED_PER_RANK]
    ok = torch.stack(
        [
            (every_WX[:, E + FIXED_BAD] == 0).all(),
            (S_W[0] == S_W).all(),
            (per_rank_W == per_rank_W[0]).all(),
            (counts_sde == kept_sde).all(),
        ]
    )
    asked = [ok[i] for i in range(4) if checks >> i & 1]  # int indices: views, no host copy
    ok = torch.cat([ok, torch.stack(asked).all().view(1) if asked else ok.new_ones(1)])
    ok = ok.to(torch.int64)
    return FixedPlan(
        start_E=excl_cumsum(mine_E, 0),
        kept_E=kept_E,
        off_E=off_sde[rank].reshape(E),
        kept_se=kept_se,
        tokens_per_expert=tokens_per_expert,
        num_recv=tokens_per_expert.sum().view(1),
        num_dropped=(mine_E - kept_E).sum(),
        ok=ok,
    )


def fixed_token_rows(
    topk_idx_TK: Tensor,
    send_pos_TK: Tensor,
    plan: FixedPlan,
    W: int,
    S: int,
    slots_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The capacity mode's token rows (``sum_per_rank``): each kept pair's row in recv_x on its
    expert's rank (``pair_pos [T, K]``, -1 if unused or dropped); ``token_pos [T, W]``, the row
    of token t in this rank's token-row buffers of ``S`` rows per peer (the next row of rank d's
    chunk in token order when one of t's kept pairs goes to d, else -1); and the slots sent with
    the rows (``[W * S, K]``: the kept pairs' rows in recv_x there, -1 elsewhere and in rows no
    token takes; written into ``slots_out`` when given, whose rows may be strided)."""
    T, K = topk_idx_TK.shape
    E_l = plan.kept_E.shape[0] // W
    g, j, keep = _layout.kept_pairs(topk_idx_TK, send_pos_TK, plan)
    pair_pos = torch.where(keep, plan.off_E[g] + j, -1)
    arange_W = torch.arange(W, device=g.device)
    to_d = keep[:, None, :] & (g[:, None, :] // E_l == arange_W[None, :, None])  # [T, W, K]
    has_TW = to_d.any(2)
    rows_TW = torch.cumsum(has_TW, 0) - 1 + arange_W * S
    token_pos = torch.where(has_TW, rows_TW, -1)
    slots_TWK = torch.where(to_d, pair_pos[:, None, :], -1)
    if slots_out is None:
        slots = torch.full((W * S, K), -1, dtype=torch.int64, device=g.device)
    else:
        slots = slots_out.fill_(-1)
    scatter_rows(slots_TWK.view(T * W, K), token_pos.view(-1, 1), None, W * S, out=slots)
    return pair_pos, token_pos, slots


def pull_chunks(peers: list[Tensor], peer_ptrs: Tensor, out: Tensor, first_row: int) -> Tensor:
    """``out[r * S : (r + 1) * S] = peers[r][first_row : first_row + S]`` for every rank r, with
    ``S = out.shape[0] / W``: the ``"p2p"`` transport's read of every rank's symmetric buffer
    (``peers``: those buffers as tensors on this device; ``peer_ptrs``: their addresses, which
    the Triton version reads). W copies."""
    S = out.shape[0] // len(peers)
    for r, peer in enumerate(peers):
        out[r * S : (r + 1) * S].copy_(peer[first_row : first_row + S])
    return out


def pull_sum(
    peers: list[Tensor], peer_ptrs: Tensor, pos_TW: Tensor, first_row: int, S: int
) -> Tensor:
    """``combine_rows(pulled, pos_TW, None, dtype)`` where ``pulled`` is what
    :func:`pull_chunks` would read (chunks of S rows from ``first_row``): each token's rows on
    the ranks with ``pos_TW[t, r] >= 0`` summed in rank order (the Triton version reads them
    straight from the peers' buffers)."""
    pulled = torch.cat([peer[first_row : first_row + S] for peer in peers])
    return combine_rows(pulled, pos_TW, None, pulled.dtype)
