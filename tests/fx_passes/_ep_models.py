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

Spellings recognised by what they compute (family ep by value, checked in a simulated world),
each a ``ModuleList`` of local experts filled by global expert id (so a block on a one-rank group
equals the same block spread over W ranks), ``group=None`` meaning one rank and no collective:

* ``GatheredCountsEP``: Megatron-LM's all-to-all token dispatcher: counts all-gathered into a
  ``[W, E]`` matrix, a custom autograd.Function around plain ``dist.all_to_all_single``, received
  chunks put expert-major by ``split`` + ``cat`` in a chunk order, and back.
* ``CountMatrixTop2EP``: FastMoE: top-2, the count matrix exchanged by plain
  ``dist.all_to_all_single``, row gather and exchange inside autograd.Functions (scatter /
  gather), received rows moved expert-major by destinations from the matrix's prefix sums
  (``index_copy``), weights applied by ``bmm``.
* ``ShippedIdsEP``: DeepEP-style layout: pairs sorted by destination rank (``torch.sort``),
  per-rank counts by ``one_hot``, the expert ids shipped beside the rows, the receiver sorting by
  ``id % E_l`` and counting with ``histc``; ``scatter_add_`` back to the tokens.
* ``Top1ArgmaxEP``: Switch / DeepSpeed top-1 (``argmax``) in torchtitan's EP layout: ``bincount``
  counts through ``dist.all_to_all_single`` (buffers), a DeepSpeed-style autograd.Function with
  split sizes for the rows, the regroup key ``arange(E) % E_l`` repeated by the received counts,
  ``y[regroup] = ..`` back, and the inverse order by ``argsort``.
* ``SharedExpertEP``: torchtitan's MoE with a shared expert: a normed ``view(-1, H)`` input,
  counts by a list-style ``dist.all_gather``, rows by ``all_to_all_single_autograd``, the routed
  rows ``scatter_add``-ed (out of place) onto the shared expert's output.

Near misses of ``GatheredCountsEP`` (``variant=``): ``no_regroup`` (experts read rows in
source-rank order), ``swapped_back`` (the way back with the forward split sizes),
``crossed_ranks`` (rows go back in reversed source-rank order: each rank gets another's).

Near misses of ``TitanEP`` (``variant=``): ``no_regroup`` runs the experts on rows grouped by
source rank (not by local expert); ``swapped_back`` sends the way back with the forward split
sizes; ``ActivationA2A`` sends rows sorted by a ``topk`` with an equal-split ``all_to_all``
and never brings them back.
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


# ----------------------------------------------------------------------------- by value
def _world(group):
    """``(group, W, rank)``; None means one rank and no collective."""
    if group is None:
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _local_experts(rank: int, e_l: int) -> nn.ModuleList:
    """This rank's experts, each filled from its global id's own generator."""
    experts = nn.ModuleList(Expert() for _ in range(e_l))
    with torch.no_grad():
        for j, ex in enumerate(experts):
            gen = torch.Generator().manual_seed(1000 + rank * e_l + j)
            for p in ex.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return experts


class _MegatronStyleA2A(torch.autograd.Function):
    """Rows out through ``dist.all_to_all_single`` into a new buffer; the backward is the same
    exchange with the split sizes swapped (Megatron-LM's ``_AllToAll``)."""

    @staticmethod
    def forward(ctx, group, rows, out_splits, in_splits):
        ctx.group, ctx.splits = group, (out_splits, in_splits)
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = _MegatronStyleA2A.apply(ctx.group, grad.contiguous(), in_splits, out_splits)
        return None, back, None, None


class GatheredCountsEP(nn.Module):
    # Follows: NVIDIA/Megatron-LM megatron/core/transformer/moe/token_dispatcher.py
    # (MoEAlltoAllTokenDispatcher: all-gathered counts, sort_chunks_by_idxs) + moe/experts.py
    def __init__(self, group=None, variant="ok"):
        super().__init__()
        self.group, self.W, self.rank = _world(group)
        self.E_l, self.variant = E // self.W, variant
        self.router = nn.Linear(H, E, bias=False)
        self.experts = _local_experts(self.rank, self.E_l)

    def forward(self, x):
        W, E_l, group = self.W, self.E_l, self.group
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))
        rows = x.index_select(0, order // K)
        if group is None:
            recv, tokens_per_expert = rows, counts
        else:
            gathered = counts.new_empty(W * E)
            dist.all_gather_into_tensor(gathered, counts, group=group)
            mine = gathered.view(W, E)[:, self.rank * E_l : (self.rank + 1) * E_l]
            send = counts.view(W, E_l).sum(1).tolist()
            recv_sizes = mine.sum(1).tolist()
            recv = _MegatronStyleA2A.apply(group, rows, recv_sizes, send)
            chunks = recv.split(mine.reshape(-1).tolist())  # (source rank, local expert)
            if self.variant != "no_regroup":
                recv = torch.cat([chunks[s * E_l + j] for j in range(E_l) for s in range(W)])
            tokens_per_expert = mine.sum(0)
        parts = recv.split(tokens_per_expert.tolist())
        y = torch.cat([self.experts[j](parts[j]) for j in range(E_l)])
        if group is not None:
            chunks = y.split(mine.t().reshape(-1).tolist())  # (local expert, source rank)
            ranks = range(W) if self.variant != "crossed_ranks" else range(W - 1, -1, -1)
            if self.variant != "no_regroup":
                y = torch.cat([chunks[j * W + s] for s in ranks for j in range(E_l)])
            back = (send, recv_sizes) if self.variant != "swapped_back" else (recv_sizes, send)
            y = _MegatronStyleA2A.apply(group, y, *back)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, order // K, y)


class _ScatterRows(torch.autograd.Function):
    """FastMoE's ``MOEScatter``: gather the token rows of the sorted pairs and send them, in
    one Function; backward sends the gradient back and adds it onto the tokens."""

    @staticmethod
    def forward(ctx, x, tok, out_splits, in_splits, group):
        ctx.save_for_backward(tok)
        ctx.meta = (x.shape[0], out_splits, in_splits, group)
        rows = x[tok]
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        (tok,) = ctx.saved_tensors
        T, out_splits, in_splits, group = ctx.meta
        back = grad.new_empty(sum(in_splits), grad.shape[1])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=group)
        return grad.new_zeros(T, grad.shape[1]).index_add(0, tok, back), None, None, None, None


class _GatherRows(torch.autograd.Function):
    """FastMoE's ``MOEGather``: send the expert rows back and put them in pair order."""

    @staticmethod
    def forward(ctx, y, order, out_splits, in_splits, group):
        ctx.save_for_backward(order)
        ctx.meta = (out_splits, in_splits, group)
        back = y.new_empty(sum(in_splits), y.shape[1])
        dist.all_to_all_single(back, y.contiguous(), in_splits, out_splits, group=group)
        return torch.zeros_like(back).index_copy(0, order, back)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        out_splits, in_splits, group = ctx.meta
        rows = grad[order].contiguous()
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=group)
        return out, None, None, None, None


class CountMatrixTop2EP(nn.Module):
    # Follows: laekov/fastmoe fmoe/functions.py (count_by_gate, prepare_forward, MOEScatter,
    # MOEGather) + fmoe/layers.py (_fmoe_general_global_forward), top-2 (fmoe/gates/naive_gate)
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _world(group)
        self.E_l = E // self.W
        self.gate = nn.Linear(H, E)
        self.experts = _local_experts(self.rank, self.E_l)

    def forward(self, x):
        W, E_l, group, T = self.W, self.E_l, self.group, x.shape[0]
        val, idx = torch.topk(self.gate(x), K, dim=-1)
        score = F.softmax(val, dim=-1)
        with torch.no_grad():
            _, order = torch.sort(idx.view(-1), stable=True)
            local_count = torch.bincount(idx.view(-1), minlength=E)
            torch._check(local_count.shape[0] == E)
            if group is None:
                global_count = local_count
            else:
                global_count = torch.empty_like(local_count)
                dist.all_to_all_single(global_count, local_count, group=group)
            matrix = global_count.view(W, E_l)  # [source rank, local expert]
            flat = matrix.reshape(-1)
            src_start = torch.cumsum(flat, 0) - flat
            by_expert = matrix.t().reshape(-1)
            dst_start = (torch.cumsum(by_expert, 0) - by_expert).view(E_l, W).t().reshape(-1)
            in_splits = local_count.view(W, E_l).sum(1).tolist()
            out_splits = matrix.sum(1).tolist()
            R = sum(out_splits)
            block = torch.repeat_interleave(torch.arange(W * E_l), flat, output_size=R)
            dest = dst_start[block] - src_start[block] + torch.arange(R)
        if group is None:
            recv = x[order // K]
        else:
            recv = _ScatterRows.apply(x, order // K, out_splits, in_splits, group)
        grouped = recv.new_zeros(R, H).index_copy(0, dest, recv)
        parts = grouped.split(matrix.sum(0).tolist())
        y = torch.cat([ex(p) for ex, p in zip(self.experts, parts, strict=True)])[dest]
        if group is None:
            pairs = torch.zeros_like(y).index_copy(0, order, y)
        else:
            pairs = _GatherRows.apply(y, order, out_splits, in_splits, group)
        return torch.bmm(score.unsqueeze(1), pairs.view(T, K, H)).squeeze(1)


class ShippedIdsEP(nn.Module):
    # Follows: deepseek-ai/DeepEP deep_ep/buffer.py (get_dispatch_layout: tokens per rank,
    # dispatch shipping topk_idx with the rows, local expert ids on the receiver) written with
    # torch.distributed._functional_collectives
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _world(group)
        self.E_l = E // self.W
        self.router = nn.Linear(H, E, bias=False)
        self.experts = _local_experts(self.rank, self.E_l)

    def forward(self, x):
        W, E_l, group = self.W, self.E_l, self.group
        logits = self.router(x)
        ids = torch.topk(logits, K, dim=-1).indices
        w = torch.softmax(logits.gather(1, ids), dim=-1)
        dest = ids.reshape(-1) // E_l
        _, order = torch.sort(dest, stable=True)
        rows, ids_out = x[order // K], ids.reshape(-1)[order]
        per_rank = F.one_hot(dest, W).sum(0)
        if group is None:
            recv, recv_ids = rows, ids_out
        else:
            recv_per_rank = fc.wait_tensor(fc.all_to_all_single(per_rank, None, None, group))
            send, got = per_rank.tolist(), recv_per_rank.tolist()
            recv = fc.all_to_all_single_autograd(rows, got, send, group)
            recv_ids = fc.wait_tensor(fc.all_to_all_single(ids_out, got, send, group))
        local = recv_ids % E_l
        by_expert = torch.sort(local, stable=True)[1]
        sizes = torch.histc(local.float(), bins=E_l, min=0, max=E_l - 1).long()
        parts = recv[by_expert].split(sizes.tolist())
        ys = torch.cat([self.experts[j](parts[j]) for j in range(E_l)])
        y = ys.new_empty(ys.shape).index_copy_(0, by_expert, ys)
        if group is not None:
            y = fc.all_to_all_single_autograd(y, send, got, group)
        index = (order // K).unsqueeze(1).expand(-1, H)
        return torch.zeros_like(x).scatter_add_(0, index, y * w.reshape(-1)[order, None])


class _SplitA2A(torch.autograd.Function):
    """DeepSpeed's ``_AllToAll`` with split sizes: ``dist.all_to_all_single`` into
    ``empty``, the same exchange reversed in backward."""

    @staticmethod
    def forward(ctx, group, rows, out_splits, in_splits):
        ctx.args = (group, in_splits, out_splits)
        out = torch.empty(sum(out_splits), rows.shape[1], dtype=rows.dtype)
        dist.all_to_all_single(out, rows, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group, out_splits, in_splits = ctx.args
        return None, _SplitA2A.apply(group, grad.contiguous(), out_splits, in_splits), None, None


class Top1ArgmaxEP(nn.Module):
    # Follows: microsoft/DeepSpeed deepspeed/moe/sharded_moe.py (top1gating's argmax, _AllToAll)
    # laid out as pytorch/torchtitan torchtitan/distributed/expert_parallel.py (_token_dispatch:
    # counts exchanged, split sizes by .tolist(), received rows regrouped by local expert)
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _world(group)
        self.E_l = E // self.W
        self.wg = nn.Linear(H, E, bias=False)
        self.experts = _local_experts(self.rank, self.E_l)

    def forward(self, x):
        W, E_l, group = self.W, self.E_l, self.group
        probs = F.softmax(self.wg(x), dim=-1)
        ids = torch.argmax(probs, dim=-1)
        gate = probs.max(dim=-1).values
        order = torch.argsort(ids)
        counts = torch.bincount(ids, minlength=E)
        torch._check(counts.shape[0] == E)
        rows = x[order]
        if group is None:
            recv, recv_counts = rows, counts
        else:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=group)
            send = counts.view(W, -1).sum(1).tolist()
            got = recv_counts.view(W, -1).sum(1).tolist()
            recv = _SplitA2A.apply(group, rows, got, send)
        key = torch.repeat_interleave(torch.arange(E) % E_l, recv_counts, output_size=len(recv))
        regroup = torch.argsort(key, stable=True)
        ys = recv[regroup].split(recv_counts.view(W, E_l).sum(0).tolist())
        y_grouped = torch.cat([self.experts[j](ys[j]) for j in range(E_l)])
        y = torch.empty_like(y_grouped)
        y[regroup] = y_grouped
        if group is not None:
            y = _SplitA2A.apply(group, y, send, got)
        return y[torch.argsort(order)] * gate.unsqueeze(-1)


class SharedExpertEP(nn.Module):
    # Follows: pytorch/torchtitan torchtitan/models/moe/moe.py (MoE.forward: the routed rows
    # scatter-added onto the shared experts' output) + torchtitan/distributed/expert_parallel.py
    # (_token_dispatch), with the counts gathered by a plain list-style dist.all_gather
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _world(group)
        self.E_l = E // self.W
        self.norm = nn.LayerNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        self.shared = nn.Linear(H, H)
        self.experts = _local_experts(self.rank, self.E_l)

    def forward(self, x_in):
        W, E_l, group = self.W, self.E_l, self.group
        x = self.norm(x_in).view(-1, H)
        w, ids = torch.topk(torch.softmax(self.router(x), -1), K, dim=-1)
        flat = ids.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        torch._check(counts.shape[0] == E)
        rows = x[order // K]
        if group is None:
            recv, mine = rows, counts.view(1, E)
        else:
            outs = [torch.empty_like(counts) for _ in range(W)]
            dist.all_gather(outs, counts, group=group)
            mine = torch.stack(outs)[:, self.rank * E_l : (self.rank + 1) * E_l]
            send = counts.view(W, E_l).sum(1).tolist()
            got = mine.sum(1).tolist()
            recv = fc.all_to_all_single_autograd(rows, got, send, group)
        key = torch.arange(E_l).repeat(W).repeat_interleave(mine.reshape(-1), output_size=len(recv))
        regroup = torch.argsort(key, stable=True)
        parts = recv[regroup].split(mine.sum(0).tolist())
        ys = torch.cat([self.experts[j](parts[j]) for j in range(E_l)])
        y = torch.empty_like(ys)
        y[regroup] = ys
        if group is not None:
            y = fc.all_to_all_single_autograd(y, send, got, group)
        y = y * w.view(-1)[order, None]
        index = (order // K)[:, None].expand(-1, H)
        return self.shared(x).scatter_add(0, index, y).view(x_in.shape)


BY_VALUE = {  # hand-written EP spellings the ep family recognises by what they compute
    "gathered_counts": GatheredCountsEP,
    "count_matrix_top2": CountMatrixTop2EP,
    "shipped_ids": ShippedIdsEP,
    "top1_argmax": Top1ArgmaxEP,
    "shared_expert": SharedExpertEP,
}

MODELS = {  # classes and partials: sent to the ranks of a world by reference
    "titan": TitanEP,
    "titan_grouped": partial(TitanEP, grouped=True),
    "seed": SeedEP,
}
