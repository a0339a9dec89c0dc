"""Stacked-expert MoE blocks in spellings of our own (the sorted family's bodies checked on split
experts), and a near miss. Experts are stacked ``[E, ...]`` parameters, or 2-D ``[E * I, H]``
weights viewed per expert. Shape letters: T tokens, H hidden, I expert inner size, E experts, K
top-k, P = T * K (token, slot) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.fx_passes._harness import H, stacked_param

I, E, K = 8, 4, 2  # noqa: E741
ALIGN = 4  # rows per expert padded to a multiple of this (``Padded``)


class _Block(nn.Module):
    """Router (softmax, top-k, renormalised) and the sort of the flat ids shared by the blocks."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)

    def route(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        torch._check(counts.shape[0] == E)
        return w, flat, order, counts


class OffsetSlices(_Block):
    """Experts as a loop over ``w[e]`` on row segments cut by *tensor* offsets
    (``F.pad(cumsum)``), written into a fresh buffer by ``buf[lo:hi] = ...``; back with
    ``index_add_`` of the weighted rows."""

    def __init__(self):
        super().__init__()
        self.w_in = stacked_param(E, H, I)
        self.w_out = stacked_param(E, I, H)

    def forward(self, x):
        w, _, order, counts = self.route(x)
        rows = x.index_select(0, order // K)
        offs = F.pad(torch.cumsum(counts, 0), (1, 0))
        y = rows.new_zeros(rows.shape[0], H)
        for e in range(E):
            lo, hi = offs[e], offs[e + 1]
            y[lo:hi] = F.gelu(rows[lo:hi] @ self.w_in[e]) @ self.w_out[e]
        y = self.grouped_output(y) * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, order // K, y)

    def grouped_output(self, y):
        """The experts' rows, grouped by expert, as the block weighs them."""
        return y


class FlatViewedEnds(_Block):
    """2-D ``[E * I, H]`` weights viewed ``(E, I, H)`` per expert; segments from the host
    inclusive ends ``counts.cumsum(0).tolist()``; outputs ``cat``-ed; back through the inverse
    permutation and a weighted sum over the slots."""

    def __init__(self):
        super().__init__()
        self.up = stacked_param(E * I, H)
        self.down = stacked_param(E * I, H)

    def forward(self, x):
        w, _, order, counts = self.route(x)
        rows = x[order // K]
        ends = counts.cumsum(0).tolist()
        up, down = self.up.view(E, I, H), self.down.view(E, I, H)
        outs = []
        for e in range(E):
            seg = rows[(ends[e - 1] if e else 0) : ends[e]]
            outs.append(F.silu(seg @ up[e].t()) @ down[e])
        y = torch.cat(outs)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        return (y[inv].view(x.shape[0], K, H) * w.unsqueeze(-1)).sum(1)


class Padded(_Block):
    """Rows copied into per-expert blocks padded to a multiple of :data:`ALIGN` (a buffer of the
    worst-case size), ``split`` by the padded sizes, a linear per expert, and gathered back from
    the padded layout; the token index ``order // K`` computed again for the way back."""

    def __init__(self):
        super().__init__()
        self.w1 = stacked_param(E, I, H)
        self.w2 = stacked_param(E, H, I)

    def forward(self, x):
        w, flat, order, counts = self.route(x)
        P = flat.numel()
        rows = x[order // K]
        padded_sizes = (counts + ALIGN - 1) // ALIGN * ALIGN
        starts = torch.cumsum(counts, 0) - counts
        padded_starts = torch.cumsum(padded_sizes, 0) - padded_sizes
        expert = torch.repeat_interleave(torch.arange(E), counts, output_size=P)
        dest = padded_starts[expert] + torch.arange(P) - starts[expert]
        buf = rows.new_zeros(P + E * (ALIGN - 1), H).index_copy(0, dest, rows)
        parts = buf[: int(padded_sizes.sum())].split(padded_sizes.tolist())
        y = torch.cat(
            [F.linear(F.relu(F.linear(parts[e], self.w1[e])), self.w2[e]) for e in range(E)]
        )
        y = y[dest] * w.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add(0, order // K, y)


class OneHotCounts(_Block):
    """Counts as a one-hot sum, 2-D weights viewed with ``reshape(E, -1, H)``, ``split`` by the
    counts' host copy, ``transpose`` of each slice; ``scatter_add`` back onto a shared expert's
    output."""

    def __init__(self):
        super().__init__()
        self.gate = stacked_param(E * I, H)
        self.proj = stacked_param(E * H, I)
        self.shared = nn.Linear(H, H, bias=False)

    def forward(self, x):
        w, flat, order, _ = self.route(x)
        counts = F.one_hot(flat, E).sum(0)
        tok = (order // K).unsqueeze(-1).expand(-1, H)
        rows = torch.gather(x, 0, tok)
        gate, proj = self.gate.reshape(E, -1, H), self.proj.reshape(E, -1, I)
        chunks = rows.split(counts.tolist())
        y = torch.cat(
            [
                torch.tanh(c @ gate[e].transpose(0, 1)) @ proj[e].transpose(0, 1)
                for e, c in enumerate(chunks)
            ]
        )
        return self.shared(x).scatter_add(0, tok, y * w.reshape(-1)[order].unsqueeze(-1))


class DenseOneHot(_Block):
    """Every expert on every (token, slot) row (``einsum`` over stacked ``[E, in, out]``
    weights), the row's own expert picked by a one-hot ``[E, P]`` einsum; rows made by
    ``unsqueeze(1).expand(...)``; weights applied after ``view(T, K, H)``."""

    def __init__(self):
        super().__init__()
        self.w_a = stacked_param(E, H, I)
        self.w_b = stacked_param(E, I, H)

    def forward(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), K, dim=-1)
        rows = x.unsqueeze(1).expand(x.shape[0], K, H).reshape(-1, H)
        pick = F.one_hot(ids.flatten(), E).T.to(x.dtype)
        h = torch.einsum("ep,epo->po", pick, torch.einsum("pi,eio->epo", rows, self.w_a))
        y = torch.einsum("ep,epo->po", pick, torch.einsum("pi,eio->epo", F.silu(h), self.w_b))
        return (w.unsqueeze(-1) * y.view(x.shape[0], K, H)).sum(1)


class CenteredNearMiss(OffsetSlices):
    """Near miss: :class:`OffsetSlices` whose expert output is centred over *all* grouped rows
    (``y - y.mean(0)``): the same function at W = 1, but not one of each expert alone."""

    def grouped_output(self, y):
        return y - y.mean(0)


# name -> (block, the family that rewrites it)
REWRITTEN = {
    "offset_slices": (OffsetSlices, "sorted"),
    "flat_viewed_ends": (FlatViewedEnds, "sorted"),
    "padded": (Padded, "sorted"),
    "one_hot_counts": (OneHotCounts, "sorted"),
    "dense_one_hot": (DenseOneHot, "batched"),
}
