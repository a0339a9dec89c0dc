"""Pure routing/layout helpers: no communication, no host syncs (and nothing a CUDA graph cannot
capture: no boolean-mask indexing, no ``bincount``, no ``repeat_interleave`` without
``output_size``, no tensors built from host values).

Shape letters used across the package:

    T  tokens on this rank          H  hidden size (H' for expert outputs)
    K  slots per token (top-k)      E  experts in the model, E_l = E / W on each rank
    W  ranks in the group           N  (token, slot) pairs this rank sends (valid slots only)
    R  rows this rank receives      P  = T * K, all (token, slot) pairs

A "pair" is one (token, slot); its flat index is ``t * K + k``. Send order is by global expert
ascending, then pair index ascending, which is by destination rank, then local expert, then token,
then slot: exactly the order the receiver wants within one source rank.
"""

from __future__ import annotations

import torch
from torch import Tensor


def send_layout(topk_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Sort the valid pairs by global expert (stable).

    Returns ``order_P`` (int64 ``[P]``: pair indices, valid pairs first in send order, then the
    ``-1`` slots and any out-of-range ids) and ``counts_E`` (int64 ``[E]``: valid pairs per
    global expert).
    """
    ids_P = topk_idx_TK.reshape(-1).to(torch.int64)
    valid_P = (ids_P >= 0) & (ids_P < num_experts)  # out-of-range ids are reported by the caller
    key_P = torch.where(valid_P, ids_P, num_experts)
    sorted_P, order_P = torch.sort(key_P, stable=True)
    # Counts from the sorted keys: no boolean-mask indexing and no bincount (on CUDA both read
    # sizes back to the host), so this is sync-free and can be captured in a CUDA graph.
    bounds = torch.searchsorted(
        sorted_P, torch.arange(num_experts + 1, dtype=torch.int64, device=sorted_P.device)
    )
    counts_E = bounds[1:] - bounds[:-1]
    return order_P, counts_E


def pair_positions(
    send_pair_idx_N: Tensor, num_pairs: int, row_offset_N: Tensor | int = 0
) -> Tensor:
    """Inverse of the send order: each pair's row in it (plus ``row_offset``), -1 if unused."""
    pos_P = torch.full((num_pairs,), -1, dtype=torch.int64, device=send_pair_idx_N.device)
    rows_N = torch.arange(send_pair_idx_N.shape[0], device=send_pair_idx_N.device) + row_offset_N
    return pos_P.index_copy_(0, send_pair_idx_N, rows_N)


def expert_major_perm(counts_WEl: Tensor, num_rows: int) -> Tensor:
    """Gather index that regroups rows received source-major into expert-major order.

    ``counts_WEl[s, e]`` rows arrived from source ``s`` for local expert ``e``, laid out by source,
    then expert. Returns int64 ``[R]`` with ``recv_source_major[perm] == recv_expert_major``.
    """
    src_major_off = torch.cumsum(counts_WEl.reshape(-1), 0) - counts_WEl.reshape(-1)
    counts_ElW = counts_WEl.t().reshape(-1)
    exp_major_off = torch.cumsum(counts_ElW, 0) - counts_ElW
    shift = src_major_off.view_as(counts_WEl).t().reshape(-1) - exp_major_off
    return torch.arange(num_rows, device=counts_WEl.device) + torch.repeat_interleave(
        shift, counts_ElW, output_size=num_rows
    )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of combine: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def weighted_slot_sum(
    rows_M: Tensor, pair_pos_TK: Tensor, topk_weights_TK: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``out[t] = sum_k w[t, k] * rows[pair_pos[t, k]]`` summed in slot order, ``-1`` slots add 0.

    Accumulates in :func:`acc_dtype`, so the result is bitwise reproducible and equal to the
    reference oracle's.
    """
    T, K = pair_pos_TK.shape
    adt = acc_dtype(out_dtype)
    acc_TH = torch.zeros((T, rows_M.shape[1]), dtype=adt, device=rows_M.device)
    if rows_M.shape[0] == 0:
        return acc_TH.to(out_dtype)
    for k in range(K):
        pos_T = pair_pos_TK[:, k]
        contrib_TH = rows_M[pos_T.clamp(min=0)].to(adt)
        if topk_weights_TK is not None:
            contrib_TH = contrib_TH * topk_weights_TK[:, k, None].to(adt)
        acc_TH += torch.where(pos_T[:, None] >= 0, contrib_TH, 0)
    return acc_TH.to(out_dtype)


def slot_dot(
    grad_TH: Tensor, rows_M: Tensor, pair_pos_TK: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``g[t, k] = <grad[t], rows[pair_pos[t, k]]>``, 0 for ``-1`` slots (weight gradient)."""
    T, K = pair_pos_TK.shape
    adt = acc_dtype(grad_TH.dtype)
    if rows_M.shape[0] == 0:
        return torch.zeros((T, K), dtype=out_dtype, device=grad_TH.device)
    g_TH = grad_TH.to(adt)
    cols = []
    for k in range(K):
        pos_T = pair_pos_TK[:, k]
        dot_T = (rows_M[pos_T.clamp(min=0)].to(adt) * g_TH).sum(-1)
        cols.append(torch.where(pos_T >= 0, dot_T, 0))
    return torch.stack(cols, 1).to(out_dtype)


def triton_kernels(t: Tensor):
    """``moe_ops._triton`` when ``t`` is on a CUDA device and the Triton path is on, else None.

    Imported lazily: CPU-only installs of torch come without Triton, and the CPU path needs none.
    """
    if not t.is_cuda:
        return None
    from moe_ops import _triton

    return _triton if _triton.enabled else None
