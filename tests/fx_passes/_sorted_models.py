"""Small sort-based (family D) and batched (family B) MoE blocks for the fx_passes tests.

transformers 4.x cannot be installed beside transformers 5, so the 4.x blocks are our own
re-implementations of their routing structure (same ops, same shapes), written for these tests:

* ``GraniteStyle``: GraniteMoE / JetMoE 4.x: one-hot counts ``.tolist()``, ``sort`` of the
  flattened ids, ``x[perm // K]``, stacked ``[E, out, in]`` weights applied by ``split`` + one
  ``F.linear`` per expert + ``cat``, weights on the sorted rows, ``zeros.index_add``.
* ``AriaStyle``: Aria 4.x unpermute: ``histc`` counts, ``argsort``, ``index_select``,
  ``zeros.index_copy_(0, perm, y)``, weights applied after ``view(T, K, H)``, a shared expert
  beside. (Aria's own expert loop slices with tensor offsets; here the experts run on
  ``split(counts.tolist())``.)
* ``TitanStyle``: torchtitan-style local dispatch: ``bincount`` + ``torch._check`` on its
  length, stable ``argsort``, ``gather`` with an expanded index, ``torch._grouped_mm`` (bf16) or a
  ``split`` loop of ``matmul`` s, ``scatter_add`` onto a shared expert's output.
* ``SentinelStyle``: transformers 5.17 ``"grouped_mm"`` structure (5.24 runs it only for
  expert-parallel experts): ``sort``, ``histc``, the sentinel mask ``(ids_sorted >= E)[:, None]``
  and ``ids_sorted.clamp_(max=E - 1)``, ``rows.masked_fill_(mask, 0)`` and ``masked_fill`` after
  each ``torch._grouped_mm``, inverse permutation. ``variant="not_sentinel"`` masks real experts.
* ``BatchedStyle``: transformers 5 ``"batched_mm"`` structure: ``repeat_interleave``, ``W[ids]``
  + ``bmm``, optional gathered biases, weighted ``view(T, K, H).sum(1)``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tests.fx_passes._harness import H, stacked_param

INTER, E, K = 32, 4, 2


class GraniteStyle(nn.Module):
    def __init__(self, num_experts=E, variant="index_add"):
        super().__init__()
        self.E, self.variant = num_experts, variant
        self.router = nn.Linear(H, num_experts, bias=False)
        self.w_in = stacked_param(num_experts, 2 * INTER, H)
        self.w_out = stacked_param(num_experts, H, INTER)

    def _experts(self, rows, sizes, w):
        parts = rows.split(sizes, dim=0)
        return torch.cat([F.linear(parts[e], w[e]) for e in range(self.E)], dim=0)

    def forward(self, x):
        logits = self.router(x).float()
        top_v, top_i = logits.topk(K, dim=1)
        gates_k = torch.softmax(top_v, dim=1).type_as(x)
        onehot = torch.zeros(x.shape[0], self.E, dtype=gates_k.dtype, device=x.device)
        onehot = onehot.scatter(1, top_i, 1)
        sizes = onehot.long().sum(0).tolist()
        _, order = top_i.flatten().sort(0)
        batch_index = order.div(K, rounding_mode="trunc")
        batch_gates = gates_k.flatten()[order]
        rows = x[batch_index]
        if self.variant == "weights_on_input":
            rows = rows * batch_gates[:, None]
        if self.variant == "rows_mixed":
            rows = rows - rows.mean(0, keepdim=True)
        h = self._experts(rows, sizes, self.w_in)
        a, b = h.chunk(2, dim=-1)
        y = self._experts(F.silu(a) * b, sizes, self.w_out)
        if self.variant != "weights_on_input":
            y = y * batch_gates[:, None]
        if self.variant == "no_way_back":  # rows stay in sorted order: not a routing sum
            return y.view(x.shape[0], K, H).sum(1)
        return torch.zeros_like(x).index_add(0, batch_index, y)


class AriaStyle(nn.Module):
    def __init__(self, num_experts=E):
        super().__init__()
        self.E = num_experts
        self.router = nn.Linear(H, num_experts, bias=False)
        self.fc1 = stacked_param(num_experts, H, 2 * INTER)
        self.fc2 = stacked_param(num_experts, INTER, H)
        self.shared = nn.Sequential(nn.Linear(H, INTER), nn.SiLU(), nn.Linear(INTER, H))

    def forward(self, x):
        top_v, top_i = torch.topk(self.router(x), k=K, dim=1)
        scores = F.softmax(top_v, dim=-1)
        counts = torch.histc(top_i.flatten().float(), bins=self.E, min=0, max=self.E - 1)
        sizes = counts.long().tolist()
        order = torch.argsort(top_i.view(-1))
        rows = x.index_select(0, order // K)
        parts = rows.split(sizes)
        h = torch.cat([torch.matmul(parts[e], self.fc1[e]) for e in range(self.E)])
        a, g = torch.chunk(h, 2, dim=-1)
        parts = (F.silu(a) * g).split(sizes)
        y = torch.cat([torch.matmul(parts[e], self.fc2[e]) for e in range(self.E)])
        unperm = torch.zeros((x.shape[0] * K, H), dtype=y.dtype)
        unperm.index_copy_(0, order, y)
        out = (unperm.view(-1, K, H) * scores.unsqueeze(-1)).sum(dim=1)
        return out + self.shared(x)


class TitanStyle(nn.Module):
    def __init__(self, num_experts=E, grouped=False):
        super().__init__()
        self.E, self.grouped = num_experts, grouped
        self.gate = nn.Linear(H, num_experts, bias=False)
        self.w1 = stacked_param(num_experts, INTER, H)
        self.w3 = stacked_param(num_experts, INTER, H)
        self.w2 = stacked_param(num_experts, H, INTER)
        self.shared = nn.Sequential(nn.Linear(H, INTER), nn.SiLU(), nn.Linear(INTER, H))

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x).float())
        top, idx = torch.topk(scores, k=K, dim=1)
        top = top / (top.sum(-1, keepdim=True) + 1e-20)
        counts = torch.bincount(idx.view(-1), minlength=self.E)
        torch._check(counts.shape[0] == self.E)
        order = torch.argsort(idx.view(-1), stable=True)
        top_sorted = top.view(-1)[order]
        tok = (order // K).reshape(-1, 1).expand(-1, H)
        rows = torch.gather(x, 0, tok)
        if self.grouped:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            w1, w3, w2 = (w.transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
            h = F.silu(torch._grouped_mm(rows, w1, offs=offs))
            h = h * torch._grouped_mm(rows, w3, offs=offs)
            y = torch._grouped_mm(h, w2, offs=offs)
        else:
            sizes = counts.tolist()
            parts = torch.split(rows[: sum(sizes)], sizes, dim=0)
            outs = []
            for e, xe in enumerate(parts):
                h = F.silu(torch.matmul(xe, self.w1[e].transpose(-2, -1)))
                h = h * torch.matmul(xe, self.w3[e].transpose(-2, -1))
                outs.append(torch.matmul(h, self.w2[e].transpose(-2, -1)))
            y = torch.cat(outs, 0)
        y = (y.to(torch.float32) * top_sorted.reshape(-1, 1)).to(x.dtype)
        return self.shared(x).scatter_add(dim=0, index=tok, src=y)


class SentinelStyle(nn.Module):
    def __init__(self, num_experts=E, variant="sentinel"):
        super().__init__()
        self.E, self.variant = num_experts, variant
        self.router = nn.Linear(H, num_experts, bias=False)
        self.gate_up = stacked_param(num_experts, 2 * INTER, H)
        self.down = stacked_param(num_experts, H, INTER)

    def forward(self, x):
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_w, top_i = torch.topk(probs, K, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        ids_g, perm = torch.sort(top_i.reshape(-1))
        rows = x[perm // K]
        w_g = top_w.reshape(-1)[perm]
        counts = torch.histc(ids_g.float(), bins=self.E, min=0, max=self.E - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        mask = (ids_g >= (self.E if self.variant == "sentinel" else 1)).unsqueeze(-1)
        ids_g.clamp_(max=self.E - 1)
        rows.masked_fill_(mask, 0.0)
        h = torch._grouped_mm(rows, self.gate_up.transpose(-2, -1), offs=offs)
        a, b = h.masked_fill(mask, 0.0).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(a) * b, self.down.transpose(-2, -1), offs=offs)
        y = y.masked_fill(mask, 0.0) * w_g.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0))
        return y[inv].view(x.shape[0], K, H).sum(dim=1)


class BatchedStyle(nn.Module):
    def __init__(self, num_experts=E, bias=False, transposed=False, ids="topk"):
        super().__init__()
        self.E, self.transposed, self.ids = num_experts, transposed, ids
        self.router = nn.Linear(H, num_experts, bias=False)
        shape_up = (num_experts, H, 2 * INTER) if transposed else (num_experts, 2 * INTER, H)
        shape_down = (num_experts, INTER, H) if transposed else (num_experts, H, INTER)
        self.gate_up = stacked_param(*shape_up)
        self.down = stacked_param(*shape_down)
        self.b_up = nn.Parameter(torch.randn(num_experts, 2 * INTER) * 0.1) if bias else None

    def _lin(self, a, w):
        if self.transposed:
            return torch.bmm(a.unsqueeze(1), w).squeeze(1)
        return torch.bmm(w, a.unsqueeze(-1)).squeeze(-1)

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, K, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        rows = x.repeat_interleave(K, dim=0)
        ids = top_i.reshape(-1)
        if self.ids == "shifted":  # not routing: each row uses the next slot's expert
            ids = ids.roll(1)
        h = self._lin(rows, self.gate_up[ids])
        if self.b_up is not None:
            h.add_(self.b_up[ids])
        a, b = h.chunk(2, dim=-1)
        y = self._lin(F.silu(a) * b, self.down[ids])
        y = y * top_w.reshape(-1).unsqueeze(-1)
        return y.view(x.shape[0], K, H).sum(dim=1).to(x.dtype)


MODELS = {  # classes and partials: sent to the ranks of a world by reference
    "granite": GraniteStyle,
    "aria": AriaStyle,
    "titan_loop": TitanStyle,
    "titan_grouped": partial(TitanStyle, grouped=True),
    "sentinel": SentinelStyle,
    "batched": BatchedStyle,
    "batched_bias_t": partial(BatchedStyle, bias=True, transposed=True),
}
