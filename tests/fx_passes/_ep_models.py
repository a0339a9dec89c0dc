"""Small hand-written expert-parallel MoE blocks (family E) for the fx_passes tests.

Each rank holds only its ``E_l = E / W`` local experts (global ids ``r * E_l + j``) and routes
tokens itself with ``all_to_all_single``, the way EP code is written by hand:

* ``TitanEP``: torchtitan-style token dispatcher: ``bincount`` + ``torch._check``, stable
  ``argsort``, ``x[perm // K]``, a functional count exchange (``_functional_collectives.
  all_to_all_single``), split sizes by ``.tolist()``, the payload and its way back through
  ``all_to_all_single_autograd``, rows regrouped by local expert with ``repeat_interleave`` +
  stable ``argsort``, stacked ``[E_l, ...]`` weights (a ``split`` loop, or ``torch._grouped_mm``
  in bf16), rows put back with an inverse index, weights on the returned rows and
  ``scatter_add`` onto a shared expert's output.
* ``SeedEP``: the reference algorithm of the original dispatch/combine PR written with plain
  ``torch.distributed.all_to_all_single`` into preallocated buffers: ``histc`` counts, ``argsort``,
  a ``ModuleList`` of ``E_l`` experts on ``split(tokens_per_expert.tolist())``, ``index_copy_``
  back to the received order, the inverse permutation ``inv[perm] = arange`` and a weighted
  ``view(T, K, H).sum(1)``. Plain ``dist`` collectives are not differentiable, so the eager
  reference for gradients (``differentiable = True``) swaps in ``all_to_all_single_autograd``.

Near misses (``variant=``): ``no_regroup`` runs the experts on rows grouped by source rank (not
by local expert); ``swapped_back`` sends the way back with the forward split sizes;
``ActivationA2A`` sends rows sorted by a ``topk`` with an equal-split ``all_to_all`` and never
brings them back.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import nn

from tests.fx_passes._harness import H, stacked_param

INTER, E, K = 32, 4, 2


def _regroup_order(recv_counts, W: int, E_l: int, rows: int):
    """Stable order that groups received rows (source rank major) by local expert."""
    local_ids = torch.arange(E_l, device=recv_counts.device).repeat(W)
    row_expert = torch.repeat_interleave(local_ids, recv_counts, output_size=rows)
    return torch.argsort(row_expert, stable=True)


class TitanEP(nn.Module):
    def __init__(self, num_experts=E, grouped=False, variant="ok", group=None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.W = dist.get_world_size(self.group)
        self.E, self.E_l = num_experts, num_experts // self.W
        self.grouped, self.variant = grouped, variant
        self.gate = nn.Linear(H, num_experts, bias=False)
        self.w1 = stacked_param(self.E_l, INTER, H)
        self.w3 = stacked_param(self.E_l, INTER, H)
        self.w2 = stacked_param(self.E_l, H, INTER)
        self.shared = nn.Sequential(nn.Linear(H, INTER), nn.SiLU(), nn.Linear(INTER, H))

    def _experts(self, rows, tokens_per_expert):
        if self.grouped:
            offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
            w1, w3, w2 = (w.transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
            h = F.silu(torch._grouped_mm(rows, w1, offs=offs))
            h = h * torch._grouped_mm(rows, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        sizes = tokens_per_expert.tolist()
        outs = []
        for e, xe in enumerate(torch.split(rows, sizes, dim=0)):
            h = F.silu(torch.matmul(xe, self.w1[e].transpose(-2, -1)))
            h = h * torch.matmul(xe, self.w3[e].transpose(-2, -1))
            outs.append(torch.matmul(h, self.w2[e].transpose(-2, -1)))
        return torch.cat(outs, 0)

    def forward(self, x):
        W, E_l = self.W, self.E_l
        scores = torch.sigmoid(self.gate(x).float())
        top, idx = torch.topk(scores, k=K, dim=1)
        top = top / (top.sum(-1, keepdim=True) + 1e-20)
        counts = torch.bincount(idx.view(-1), minlength=self.E)
        torch._check(counts.shape[0] == self.E)
        order = torch.argsort(idx.view(-1), stable=True)
        top_sorted = top.view(-1)[order]
        tok = order // K
        rows = x[tok]

        recv_counts = fc.all_to_all_single(counts, None, None, self.group)
        recv_counts = torch.ops._c10d_functional.wait_tensor(recv_counts)
        send_splits = counts.view(W, E_l).sum(1).tolist()
        recv_splits = recv_counts.view(W, E_l).sum(1).tolist()
        recv = fc.all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)

        if self.variant == "no_regroup":  # experts read rows in source-rank order
            y = self._experts(recv, recv_counts.view(W, E_l).sum(0))
        else:
            regroup = _regroup_order(recv_counts, W, E_l, recv.shape[0])
            y_grouped = self._experts(recv[regroup], recv_counts.view(W, E_l).sum(0))
            y = torch.empty_like(y_grouped)
            y[regroup] = y_grouped
        if self.variant == "swapped_back":
            back = fc.all_to_all_single_autograd(y, recv_splits, send_splits, self.group)
        else:
            back = fc.all_to_all_single_autograd(y, send_splits, recv_splits, self.group)

        back = (back.to(torch.float32) * top_sorted.reshape(-1, 1)).to(x.dtype)
        index = tok.reshape(-1, 1).expand(-1, H)
        return self.shared(x).scatter_add(0, index, back)


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(H, 2 * INTER)
        self.down = nn.Linear(INTER, H)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class SeedEP(nn.Module):
    def __init__(self, num_experts=E, group=None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.W = dist.get_world_size(self.group)
        self.E, self.E_l = num_experts, num_experts // self.W
        self.router = nn.Linear(H, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(self.E_l))
        self.differentiable = False  # the test's eager reference for gradients

    def _a2a(self, out, inp, out_splits=None, in_splits=None):
        if self.differentiable:
            return fc.all_to_all_single_autograd(inp, out_splits, in_splits, self.group)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
        return out

    def forward(self, x):
        W, E_l, T = self.W, self.E_l, x.shape[0]
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        topk_w, topk_idx = torch.topk(probs, K, dim=-1)
        topk_w = topk_w / topk_w.sum(-1, keepdim=True)
        ids = topk_idx.flatten()
        counts = torch.histc(ids.float(), bins=self.E, min=0, max=self.E - 1).long()
        perm = torch.argsort(ids)
        send_x = x.index_select(0, perm // K)

        recv_counts = self._a2a(torch.empty_like(counts), counts)
        send_splits = counts.view(W, E_l).sum(1).tolist()
        recv_splits = recv_counts.view(W, E_l).sum(1).tolist()
        torch._check(sum(send_splits) == send_x.shape[0])  # torch 2.11 Dynamo needs it
        recv_x = x.new_empty(sum(recv_splits), H)
        recv_x = self._a2a(recv_x, send_x, recv_splits, send_splits)

        regroup = _regroup_order(recv_counts, W, E_l, recv_x.shape[0])
        tokens_per_expert = recv_counts.view(W, E_l).sum(0)
        parts = recv_x[regroup].split(tokens_per_expert.tolist())
        y_grouped = torch.cat([self.experts[j](parts[j]) for j in range(E_l)])
        y = torch.zeros_like(y_grouped).index_copy_(0, regroup, y_grouped)

        back = self._a2a(torch.empty_like(send_x), y, send_splits, recv_splits)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return (back[inv].view(T, K, H) * topk_w.unsqueeze(-1)).sum(1).to(x.dtype)


class ActivationA2A(nn.Module):
    """Not routing: top-k scores scale the features, and an equal-split ``all_to_all``
    exchanges activations (sequence-parallel style)."""

    def __init__(self, num_experts=E, group=None):
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.router = nn.Linear(H, num_experts, bias=False)
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        top, idx = torch.topk(self.router(x), K, dim=-1)
        order = torch.argsort(idx.view(-1), stable=True)
        rows = self.proj(x)[order // K]
        swapped = fc.all_to_all_single_autograd(rows, None, None, self.group)
        return swapped * top.view(-1)[order].unsqueeze(-1)


MODELS = {  # classes and partials: sent to the ranks of a world by reference
    "titan": TitanEP,
    "titan_grouped": partial(TitanEP, grouped=True),
    "seed": SeedEP,
}
