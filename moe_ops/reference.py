"""A plain reference of dispatch/combine over W simulated ranks in one process: the test oracle.

Written for clarity, not speed: it follows the contract in ``moe_ops.dispatch`` /
``moe_ops.combine`` literally and shares no layout code with the real kernels. Its combine
accumulates in the same dtype and slot order as the real one, so results compare bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_2d(topk_idx: Tensor) -> Tensor:
    return topk_idx.unsqueeze(1) if topk_idx.dim() == 1 else topk_idx


def _rows_for_expert(topk_idx: list[Tensor], expert: int) -> list[tuple[int, int, int]]:
    """(source rank, token, slot) of every pair routed to ``expert``, in the contract's order."""
    pairs = []
    for src, idx in enumerate(topk_idx):
        for t, k in torch.nonzero(_as_2d(idx) == expert).tolist():
            pairs.append((src, t, k))
    return pairs


def reference_dispatch(
    xs: list[Tensor], topk_idx: list[Tensor], num_experts: int
) -> list[tuple[Tensor, Tensor]]:
    """``xs[r]``, ``topk_idx[r]``: rank r's inputs. Returns ``(recv_x, tokens_per_expert)`` each."""
    W = len(xs)
    E_l = num_experts // W
    result = []
    for r in range(W):
        rows, counts = [], []
        for e in range(r * E_l, (r + 1) * E_l):
            pairs = _rows_for_expert(topk_idx, e)
            counts.append(len(pairs))
            rows += [xs[s][t] for s, t, _ in pairs]
        recv = torch.stack(rows) if rows else xs[r].new_empty((0, xs[r].shape[1]))
        result.append((recv, torch.tensor(counts, dtype=torch.int64)))
    return result


def reference_combine(
    expert_out: list[Tensor],
    topk_idx: list[Tensor],
    num_experts: int,
    topk_weights: list[Tensor] | None = None,
) -> list[Tensor]:
    """``expert_out[r]``: rows aligned with rank r's ``recv_x``. Returns ``out`` per source rank."""
    W = len(expert_out)
    E_l = num_experts // W
    row_of: dict[tuple[int, int, int], Tensor] = {}
    for r in range(W):
        j = 0
        for e in range(r * E_l, (r + 1) * E_l):
            for pair in _rows_for_expert(topk_idx, e):
                row_of[pair] = expert_out[r][j]
                j += 1
    dtype = expert_out[0].dtype
    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    outs = []
    for s, idx in enumerate(topk_idx):
        T, K = _as_2d(idx).shape
        out = torch.zeros((T, expert_out[0].shape[1]), dtype=acc_dtype)
        for t in range(T):
            for k in range(K):
                if (s, t, k) not in row_of:
                    continue
                contrib = row_of[(s, t, k)].to(acc_dtype)
                if topk_weights is not None:
                    contrib = contrib * _as_2d(topk_weights[s])[t, k].to(acc_dtype)
                out[t] += contrib
        outs.append(out.to(dtype))
    return outs
