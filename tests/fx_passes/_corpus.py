"""A corpus of MoE routing implementations from public code, re-written as small test blocks.

Every block is our own code following the routing *spelling* of one public implementation (each
class names the project and file it follows, and says in one line what makes its spelling
distinct); none of their text is copied. JAX code (Grok-1, GShard) is translated to torch.
Sizes are tiny (H=16, I=32, E=4 or 8, T <= 16), init is deterministic, dtype float32.

Each block is an ``nn.Module`` with ``forward(x[T, H]) -> [T, H]`` and its own router. Blocks
marked ``ep=True`` are hand-written expert parallelism (family E style or its relatives): they take
``group=`` (a ``ProcessGroup`` or None = the default group when one is initialized, else one rank),
hold only their ``E / W`` experts (global ids ``r * E / W + j``), and at W = 1 run with every expert
local and no collective.

``run_w1(name)`` compiles one block with the ``"moe"`` backend (``inner="aot_eager"``;
``fullgraph=True`` where Dynamo can capture the block, else ``fx_passes.compile_moe``), checks
output and input/parameter gradients against eager, and returns an :class:`Outcome` (rewritten,
rejected with the reason the backend gave, unnoticed, or crashed). ``w2_case(name)`` runs on every
rank of a gloo world of 2 and checks the compiled block against the single-device block.
``tests/fx_passes/test_corpus.py`` pins each outcome; ``examples/corpus_report.py`` prints the
table.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import nn

import fx_passes

H, I, E, K = 16, 32, 4, 2  # noqa: E741
T_W1, T_W2 = 12, 8  # tokens at W = 1, tokens per rank at W = 2


# ----------------------------------------------------------------------------- shared pieces
def _randn(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * shape[-1] ** -0.5


def _stacked(*shape) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5)


def _fill(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights for one (global) expert, whatever rank builds it."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(_randn(*p.shape, seed=seed * 97 + i))
    return module


def _local_stack(num_experts: int, local: range, shape: tuple, salt: int) -> nn.Parameter:
    """A stacked ``[E_l, ...]`` expert weight whose slice j equals global expert ``local[j]``'s."""
    return nn.Parameter(torch.stack([_randn(*shape, seed=salt * 1000 + e) for e in local]))


def _group_info(group):
    """``(group, W, rank)``; None means the default group when initialized, else one rank."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


class _SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` (Mixtral / DeepSeek / torchtitan naming)."""

    def __init__(self, inter=I):
        super().__init__()
        self.w1 = nn.Linear(H, inter, bias=False)
        self.w2 = nn.Linear(inter, H, bias=False)
        self.w3 = nn.Linear(H, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _GateUpDown(nn.Module):
    """``down(act(gate x) * up x)`` (transformers naming: OLMoE, Qwen2-MoE, Jamba, Arctic)."""

    def __init__(self, inter=I):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _FFN(nn.Module):
    """``fc2(act(fc1 x))`` with biases (fairseq / DeepSpeed / Switch experts)."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(H, I)
        self.fc2 = nn.Linear(I, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ============================================================================ single-device blocks
class MixtralRef(nn.Module):
    # Follows: mistralai/mistral-inference src/mistral_inference/moe.py (MoeLayer)
    # Distinct: softmax over the top-k *logits*; `enumerate(self.experts)` with
    # `torch.where(ids == i)`; accumulates by indexed read-modify-write `out[rows] += ...` (no
    # index_add_).
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_SwiGLU() for _ in range(E))

    def forward(self, x):
        w, chosen = torch.topk(self.gate(x), K)
        w = F.softmax(w, dim=1, dtype=torch.float).to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows, nth = torch.where(chosen == i)
            out[rows] += w[rows, nth, None] * expert(x[rows])
        return out


class OLMoE(nn.Module):
    # Follows: huggingface/transformers (4.x) src/transformers/models/olmoe/modeling_olmoe.py
    # Distinct: top-k of a softmax over all experts, no renormalisation; one_hot(...).permute(2, 1,
    # 0) mask, `torch.where(mask[e])`, `x[None, tok].reshape(-1, H)`, in-place `index_add_`.
    NE, NK = E, K

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, self.NE, bias=False)
        self.experts = nn.ModuleList(_GateUpDown() for _ in range(self.NE))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        probs, chosen = torch.topk(probs, self.NK, dim=-1)
        probs = probs.to(x.dtype)
        out = torch.zeros((x.shape[0], H), dtype=x.dtype)
        mask = F.one_hot(chosen, num_classes=self.NE).permute(2, 1, 0)
        for e in range(self.NE):
            slot, tok = torch.where(mask[e])
            rows = x[None, tok].reshape(-1, H)
            y = self.experts[e](rows) * probs[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out


class _JetParallelExperts(nn.Module):
    """JetMoE's ParallelExperts: ``[E, out, in]`` weights, ``split`` by sizes, F.linear, cat."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = _stacked(E, n_out, n_in)

    def forward(self, rows, sizes):
        parts = rows.split(sizes, dim=0)
        return torch.cat([F.linear(parts[e], self.weight[e]) for e in range(E)], dim=0)


class JetMoE(nn.Module):
    # Follows: myshell-ai/JetMoE jetmoe/utils/moe.py (MoE, compute_gating) + parallel_experts.py
    # Distinct: softmax over the top-k logits; counts as `zeros.scatter(1, ids, 1).long().sum(0)`
    # then `.tolist()`; `sort` of flat ids, `div(K, rounding_mode="trunc")`; an output bias.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.input_linear = _JetParallelExperts(H, 2 * I)
        self.output_linear = _JetParallelExperts(I, H)
        self.bias = nn.Parameter(torch.randn(H) * 0.1)

    def forward(self, x):
        logits = self.router(x).float()
        top_logits, top_ids = logits.topk(K, dim=1)
        top_gates = torch.softmax(top_logits, dim=1).type_as(x)
        onehot = torch.zeros([x.shape[0], E], dtype=top_gates.dtype).scatter(1, top_ids, 1)
        sizes = onehot.long().sum(0).tolist()
        _, sorted_pairs = top_ids.flatten().sort(0)
        batch_index = sorted_pairs.div(K, rounding_mode="trunc")
        batch_gates = top_gates.flatten()[sorted_pairs]
        h = self.input_linear(x[batch_index], sizes)
        h, g = h.chunk(2, dim=-1)
        y = self.output_linear(F.silu(h) * g, sizes) * batch_gates[:, None]
        out = torch.zeros((x.shape[0], H), dtype=y.dtype).index_add(0, batch_index, y)
        return out + self.bias


class DBRX(nn.Module):
    # Follows: databricks/dbrx (transformers 4.x models/dbrx/modeling_dbrx.py DbrxExperts,
    # DbrxRouter)
    # Distinct: weights stacked 2-D `[E*I, H]` and viewed per expert inside the loop; top-k weights
    # normalised by `torch.norm(p=1)`; `if token_idx.shape[0] == 0: continue` in the loop.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = _stacked(E * I, H)
        self.v1 = _stacked(E * I, H)
        self.w2 = _stacked(E * I, H)

    def forward(self, x):
        probs = self.router(x).softmax(dim=-1, dtype=torch.float32)
        top_w, top_e = torch.topk(probs, K, dim=-1)
        top_w = (top_w / torch.norm(top_w, p=1, dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(top_e, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.shape[0] == 0:
                continue
            rows = x[None, tok].reshape(-1, H)
            w1, v1, w2 = (w.view(E, I, H)[e] for w in (self.w1, self.v1, self.w2))
            h = F.silu(rows.matmul(w1.t())) * rows.matmul(v1.t())
            out.index_add_(0, tok, h.matmul(w2) * top_w[tok, slot, None])
        return out


class Jamba(nn.Module):
    # Follows: huggingface/transformers (4.x) src/transformers/models/jamba/modeling_jamba.py
    # (JambaSparseMoeBlock)
    # Distinct: Mixtral-4.x loop with the data-dependent `if top_x.shape[0] == 0: continue`; no
    # renormalisation of the top-k softmax.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_GateUpDown() for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=1, dtype=torch.float)
        probs, chosen = torch.topk(probs, K, dim=-1)
        probs = probs.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.shape[0] == 0:
                continue
            y = self.experts[e](x[None, tok].reshape(-1, H)) * probs[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out


class Qwen2MoE(nn.Module):
    # Follows: huggingface/transformers (4.40-4.4x)
    # src/transformers/models/qwen2_moe/modeling_qwen2_moe.py
    # Distinct: a shared expert scaled by its own `sigmoid(shared_expert_gate(x))`, added after the
    # static `range(E)` loop (OLMoE-style where/index_add_).
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_GateUpDown() for _ in range(E))
        self.shared_expert = _GateUpDown(2 * I)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        probs, chosen = torch.topk(probs, K, dim=-1)
        probs = probs.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x[None, tok].reshape(-1, H)) * probs[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        shared = F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out + shared


class _ArcticMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_SwiGLU() for _ in range(E))

    def forward(self, x):
        w = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        w, chosen = torch.topk(w, K, dim=-1)
        w /= w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x[None, tok].reshape(-1, H)) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out


class Arctic(nn.Module):
    # Follows: Snowflake-Labs snowflake-arctic, HF remote code modeling_arctic.py
    # (ArcticDecoderLayer with use_residual / parallel_attn_mlp_res, ArcticMoE)
    # Distinct: a dense residual MLP on its own norm runs beside the MoE, and the MoE is a nested
    # submodule (`block_sparse_moe`); the loop is Mixtral-4.x style (the original's empty-expert
    # `continue` is left to the Jamba / DBRX entries), in-place `w /= w.sum(...)`.
    def __init__(self):
        super().__init__()
        self.residual_layernorm = nn.RMSNorm(H)
        self.residual_mlp = _SwiGLU(2 * I)
        self.post_attention_layernorm = nn.RMSNorm(H)
        self.block_sparse_moe = _ArcticMoE()

    def forward(self, x):
        dense = x + self.residual_mlp(self.residual_layernorm(x))
        return dense + self.block_sparse_moe(self.post_attention_layernorm(x))


class Grok1(nn.Module):
    # Follows: xai-org/grok-1 model.py (MoELayer._inference_call, moe_slow_matmul1/2; JAX,
    # translated)
    # Distinct: every (token, slot) row goes through *every* expert (einsum "mk,bkn->bmn") and a
    # one-hot `[E, T*K]` selects the chosen one ("bm,bmn->mn"); rows made by tiling x K times;
    # gelu-gated; weighted sum over k at the end.
    NE = E

    def __init__(self):
        super().__init__()
        self.router_w = _stacked(H, self.NE)  # Router: jnp.dot(x, w)
        self.linear_v = _stacked(self.NE, H, I)
        self.linear = _stacked(self.NE, H, I)
        self.linear_1 = _stacked(self.NE, I, H)

    def _slow_matmul(self, rows, w, onehot):
        every = torch.einsum("mk,bkn->bmn", rows, w)
        return torch.einsum("bm,bmn->mn", onehot, every)

    def forward(self, x):
        probs = torch.softmax(x @ self.router_w, dim=-1)
        gate, index = torch.topk(probs, K)
        rows = x[:, None, :].expand(-1, K, -1).reshape(-1, H)
        onehot = F.one_hot(index.reshape(-1), self.NE).t().to(x.dtype)
        v = self._slow_matmul(rows, self.linear_v, onehot)
        g = F.gelu(self._slow_matmul(rows, self.linear, onehot), approximate="tanh")
        out = self._slow_matmul(v * g, self.linear_1, onehot).view(x.shape[0], K, H)
        return (gate[:, :, None].to(out.dtype) * out).sum(dim=1)


def _gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm's ``gmm`` on the CPU: one matmul per expert's rows (sizes from the host)."""
    parts = a.split(batch_sizes.tolist())
    return torch.cat([p @ (b[e].t() if trans_b else b[e]) for e, p in enumerate(parts)])


class MegablocksDMoE(nn.Module):
    # Follows: databricks/megablocks megablocks/layers/dmoe.py
    # (ParallelDroplessMLP.grouped_forward_once, indices_and_bins) + layers/router.py +
    # layers/mlp.py (GroupedMLP)
    # Distinct: ids cast to int32 and `sort`ed (values = bin ids, indices = pair order) under
    # no_grad; `bincount` histogram + inclusive cumsum "bins"; weights stored 2-D `[E*I, H]` and
    # `.view`ed; gmm by host batch sizes; the weighted scatter reads `weights[indices]` (unsorted
    # flat weights).
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(H, E, bias=False)
        self.w1 = _stacked(E * I, H)
        self.w2 = _stacked(E * I, H)

    def forward(self, x):
        scores = self.layer(x).softmax(dim=-1)
        weights, top = torch.topk(scores, K, dim=-1)
        weights = weights / torch.norm(weights, p=1, dim=-1, keepdim=True)
        weights, top = weights.flatten(), top.flatten()
        with torch.no_grad():
            bin_ids, indices = torch.sort(top.int(), stable=True)
            tokens_per_expert = torch.bincount(top, minlength=E)
            torch._check(tokens_per_expert.shape[0] == E)
            bins = torch.cumsum(tokens_per_expert, 0)
        del bin_ids, bins  # (the gather/scatter kernels' bookkeeping)
        rows = x[indices // K]
        h = F.gelu(_gmm(rows, self.w1.view(E, -1, H), tokens_per_expert, trans_b=True))
        y = _gmm(h, self.w2.view(E, -1, H), tokens_per_expert)
        out = torch.zeros_like(x)
        out.index_add_(0, indices // K, y * weights[indices][:, None])
        return out


def _titan_permute_indices(counts_group, experts_per_rank, num_ranks, align):
    """torchtitan's ``generate_permute_indices`` bookkeeping in vectorised torch (its CPU reference
    loops over ``.item()`` s, its GPU one is Triton): where each (rank, local expert) chunk starts
    among the received rows, where it goes in the expert-major output, and each local expert's
    block size padded up to a multiple of ``align`` (at least ``align``)."""
    start = torch.cumsum(counts_group, 0) - counts_group
    per_expert = counts_group.view(num_ranks, -1).sum(0)
    m_sizes = (torch.clamp_min(per_expert, align) + align - 1) // align * align
    write = torch.cumsum(m_sizes, 0) - m_sizes
    by_rank = counts_group.view(num_ranks, experts_per_rank)
    base = (write[None, :] + torch.cumsum(by_rank, 0) - by_rank).reshape(-1)
    return start, base, m_sizes


def _titan_permute(x, counts_group, experts_per_rank, num_ranks, align=4):
    """torchtitan ``_permute``: pad per expert to ``align``, append a zero row, gather with -1 ->
    zero row. Returns ``(input_shape, permuted_x, permuted_indices, padded_sizes)``."""
    R = x.shape[0]
    max_len = R + experts_per_rank * align
    max_len = (max_len + align - 1) // align * align
    with torch.no_grad():
        start, base, m_sizes = _titan_permute_indices(
            counts_group, experts_per_rank, num_ranks, align
        )
        chunk = torch.repeat_interleave(
            torch.arange(counts_group.numel()), counts_group, output_size=R
        )
        dest = base[chunk] + torch.arange(R) - start[chunk]
        permuted = torch.full((max_len,), -1, dtype=torch.int64)
        permuted[dest] = torch.arange(R)
    x = torch.vstack((x, x.new_zeros(x.shape[-1])))
    input_shape = x.shape
    return input_shape, x[permuted, :], permuted, m_sizes


def _titan_unpermute(out, input_shape, permuted):
    unpermuted = out.new_empty(input_shape)
    unpermuted[permuted, :] = out
    return unpermuted[:-1]


def _titan_experts_for_loop(w1, w2, w3, x, counts):
    """torchtitan ``_run_experts_for_loop`` (fp32; its grouped-mm path casts to bf16)."""
    sizes = counts.tolist()
    num_padding = x.shape[0] - sum(sizes)
    torch._check(num_padding >= 0)
    parts = torch.split(x[: sum(sizes)], sizes, dim=0)
    outs = []
    for e, xe in enumerate(parts):
        h = F.silu(torch.matmul(xe, w1[e].transpose(-2, -1)))
        h = h * torch.matmul(xe, w3[e].transpose(-2, -1))
        outs.append(torch.matmul(h, w2[e].transpose(-2, -1)))
    out = torch.cat(outs, dim=0)
    return torch.vstack((out, out.new_zeros((num_padding, out.shape[-1]))))


class TorchtitanMoE(nn.Module):
    # Follows: pytorch/torchtitan torchtitan/models/moe/moe.py (MoE, TokenChoiceTopKRouter,
    # TokenReorderer, GroupedExperts) + models/moe/utils.py (_permute/_unpermute) + kernels.py
    # (generate_permute_indices)
    # Distinct: histc counts; stable argsort; `gather` with an expanded index; rows regrouped
    # through generate_permute_indices (per-expert blocks padded to a multiple of 4, a zero row
    # appended, -1 -> zero row) and un-permuted with `out[perm] = y`, `[:-1]`; `scatter_add` onto a
    # shared expert. score_before_experts=False (its DeepSeek-V3 configs); `score_before=True`
    # (MoEArgs' default, its Llama-4 configs) scales the expert *input*.
    def __init__(self, score_before=False):
        super().__init__()
        self.score_before = score_before
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = _stacked(E, I, H)
        self.w2 = _stacked(E, H, I)
        self.w3 = _stacked(E, I, H)
        self.shared_experts = _SwiGLU()

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x).to(torch.float32))
        top_scores, chosen = torch.topk(scores, k=K, dim=1)
        counts = torch.histc(chosen.view(-1).float(), bins=E, min=0, max=E).long()
        order = torch.argsort(chosen.view(-1), stable=True)
        top_sorted = top_scores.view(-1)[order]
        tok = (order // K).reshape(-1, 1).expand(-1, H)
        routed = torch.gather(x, dim=0, index=tok)
        if self.score_before:
            routed = (routed.to(torch.float32) * top_sorted.reshape(-1, 1)).to(x.dtype)
        shape, routed, perm, padded = _titan_permute(routed, counts, E, 1)
        y = _titan_experts_for_loop(self.w1, self.w2, self.w3, routed, padded)
        y = _titan_unpermute(y, shape, perm)
        out = self.shared_experts(x)
        if not self.score_before:
            y = (y.to(torch.float32) * top_sorted.reshape(-1, 1)).to(x.dtype)
        return out.scatter_add(dim=0, index=tok, src=y)


class NanoMoE(nn.Module):
    # Follows: wolfecameron/nanoMoE model.py (Router with capacity, MOELayer, MLPExperts;
    # nanoGPT-style)
    # Distinct: softmax over top-k logits scattered into -inf; capacity from a k-major cumsum over
    # `[k*T, E]` (all first choices before any second); `[T, E, C]` combine weights built by
    # broadcasting one-hots; dispatch as `mask.permute(1, 2, 0) @ x`, bmm experts with biases,
    # combine as `weights.view(T, E*C) @ out.view(E*C, H)` (matmuls, not einsums).
    def __init__(self, capacity_factor=1.0, min_capacity=4):
        super().__init__()
        self.cf, self.min_cap = capacity_factor, min_capacity
        self.w_g = nn.Linear(H, E, bias=False)
        self.c_fc = _stacked(E, H, I)
        self.c_proj = _stacked(E, I, H)
        self.fc_bias = nn.Parameter(torch.randn(E, 1, I) * 0.1)
        self.proj_bias = nn.Parameter(torch.randn(E, 1, H) * 0.1)

    def forward(self, x):
        T = x.shape[0]
        logits = self.w_g(x)
        top_logits, top_ids = logits.topk(K, dim=-1)
        probs = torch.full_like(logits, float("-inf")).scatter_(-1, top_ids, top_logits)
        probs = F.softmax(probs, dim=-1)
        cap = math.floor(K * self.cf * T / E)
        cap = max(cap + cap % 2, self.min_cap)
        mask = F.one_hot(top_ids, num_classes=E).view(T, K, E).permute(1, 0, 2)
        rank = (torch.cumsum(mask.reshape(K * T, E), dim=0) - 1).reshape(K, T, E)
        mask = mask * torch.lt(rank, cap)
        rank = torch.sum(mask * rank, dim=-1)
        weights = mask * probs.view(T, E)[None, :]
        rank_sc = F.one_hot(rank, num_classes=cap)
        cb_weight = torch.sum(weights.unsqueeze(3) * rank_sc.unsqueeze(2), dim=0)
        sec_mask = cb_weight.bool()
        batches = sec_mask.permute(1, 2, 0).type_as(x) @ x
        h = F.gelu(torch.bmm(batches, self.c_fc) + self.fc_bias)
        out = torch.bmm(h, self.c_proj) + self.proj_bias
        return cb_weight.view(T, -1) @ out.view(-1, H)


class MakeMoEAnyMask(nn.Module):
    # Follows: AviSoori1x/makeMoE makeMoE.py (SparseMoE; its noise and `if flat_mask.any()`
    # dropped), in the form the issue names as a near miss
    # Distinct: per-expert loop over `enumerate(self.experts)` whose boolean *token* mask is `(ids
    # == i).any(-1)` and whose weight is a masked sum over k; `out[mask] += expert(x[mask]) * w`.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E)
        self.experts = nn.ModuleList(_FFN() for _ in range(E))

    def forward(self, x):
        logits = self.router(x)
        top_logits, ids = logits.topk(K, dim=-1)
        w = F.softmax(top_logits, dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            hit = ids == i
            mask = hit.any(dim=-1)
            wi = (w * hit).sum(dim=-1)
            out[mask] += expert(x[mask]) * wi[mask].unsqueeze(1)
        return out


class SortSplitInverse(nn.Module):
    # Follows: the near miss (a sort-based block with ModuleList experts, as in many small
    # MoE codebases)
    # Distinct: argsort of the flattened top-k ids, rows gathered as `x[order // K]`, `bincount`
    # counts (bounded with torch._check), `split(counts.tolist())`, one ModuleList expert per chunk,
    # `cat`, the inverse permutation built as `inv[order] = arange`, weighted sum over k.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_GateUpDown() for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.flatten()
        order = flat.argsort()
        rows = x[order // K]
        counts = torch.bincount(flat, minlength=E)
        torch._check(counts.shape[0] == E)
        chunks = rows.split(counts.tolist())
        y = torch.cat([self.experts[e](c) for e, c in enumerate(chunks)])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        return (y[inv].view(x.shape[0], K, H) * w.unsqueeze(-1)).sum(1)


def _aria_sequential_gemm(rows, weights, tokens_per_expert):
    out = torch.zeros(rows.shape[0], weights.shape[-1], dtype=rows.dtype)
    ends = torch.cumsum(tokens_per_expert, dim=0)
    bounds = torch.cat((torch.zeros(1, dtype=torch.long), ends))
    for e in range(weights.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        out[start:end] = torch.matmul(rows[start:end], weights[e])
    return out


class AriaTf453(nn.Module):
    # Follows: huggingface/transformers 4.53 src/transformers/models/aria/modeling_aria.py
    # (AriaTextMoELayer, AriaGroupedExpertsGemm, sequential_gemm)
    # Distinct: `histc` counts; `argsort` + `index_select(order // K)`; experts as a loop slicing
    # the rows with *tensor* offsets (`rows[start:end]`, `out[start:end] = ...`); un-permute by
    # `zeros.index_copy_(0, order, y)`, weights after `view(T, K, H)`; shared experts beside.
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.fc1 = _stacked(E, H, 2 * I)
        self.fc2 = _stacked(E, I, H)
        self.shared_experts = _GateUpDown(I)

    def forward(self, x):
        top_logits, top_ids = torch.topk(self.router(x), k=K, dim=1)
        scores = F.softmax(top_logits, dim=-1)
        tokens_per_expert = torch.histc(
            top_ids.flatten().to(torch.float32), bins=E, min=0, max=E - 1
        ).to(top_ids.dtype)
        order = torch.argsort(top_ids.view(-1))
        rows = x.index_select(0, order // K)
        h = _aria_sequential_gemm(rows, self.fc1, tokens_per_expert)
        a, b = h.chunk(2, dim=-1)
        y = _aria_sequential_gemm(F.silu(a) * b, self.fc2, tokens_per_expert)
        unperm = torch.zeros((scores.shape[0] * K, H), dtype=y.dtype)
        unperm.index_copy_(0, order, y)
        out = (unperm.view(-1, K, H) * scores.unsqueeze(-1)).sum(dim=1)
        return out + self.shared_experts(x)


def _aria_tf5(impl: str) -> nn.Module:
    """transformers 5.24's own ``AriaTextMoELayer`` (the real class, small config)."""
    import transformers
    from transformers.models.aria.modeling_aria import AriaTextMoELayer

    cfg = transformers.AriaTextConfig(
        hidden_size=H, intermediate_size=I, moe_num_experts=E, moe_topk=K,
        moe_num_shared_experts=1, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32,
    )  # fmt: skip
    cfg._experts_implementation = impl
    layer = AriaTextMoELayer(cfg)
    return _fill(layer, 5)


# ----------------------------------------------------------------------------- family F (capacity)
class GShard(nn.Module):
    # Follows: tensorflow/lingvo lingvo/core/gshard_layers.py (Top2Gating,
    # second_expert_policy="all") + lingvo/core/gshard_builder.py (MoE feed-forward einsums); TF,
    # translated
    # Distinct: tokens in G=2 groups with capacity per group; exclusive cumsum positions, the second
    # choice queued after all first choices; `[G, S, E, C]` combine tensor from products of
    # one-hots; einsums "GSEC,GSM->EGCM" in and "GSEC,EGCM->GSM" out; experts as einsums on stacked
    # weights.
    G = 2

    def __init__(self, capacity_factor=1.0):
        super().__init__()
        self.cf = capacity_factor
        self.wg = _stacked(H, E)
        self.w_in = _stacked(E, H, I)
        self.w_out = _stacked(E, I, H)

    def forward(self, x):
        G, S = self.G, x.shape[0] // self.G
        xg = x.reshape(G, S, H)
        raw = torch.softmax(torch.einsum("GSM,ME->GSE", xg, self.wg), dim=-1)
        index_1 = raw.argmax(-1)
        mask_1 = F.one_hot(index_1, E).to(x.dtype)
        gate_1 = (raw * mask_1).sum(-1)
        without_1 = raw * (1.0 - mask_1)
        index_2 = without_1.argmax(-1)
        mask_2 = F.one_hot(index_2, E).to(x.dtype)
        gate_2 = (without_1 * mask_2).sum(-1)
        denom = gate_1 + gate_2 + 1e-9
        gate_1, gate_2 = gate_1 / denom, gate_2 / denom
        cap = max(int(2 * S * self.cf / E), 1)
        pos_1 = torch.cumsum(mask_1, dim=1) - mask_1
        mask_1 = mask_1 * (pos_1 < cap).to(x.dtype)
        pos_1 = (pos_1 * mask_1).sum(-1)
        count_1 = mask_1.sum(1, keepdim=True)
        gate_1 = gate_1 * mask_1.sum(-1)
        pos_2 = torch.cumsum(mask_2, dim=1) - mask_2 + count_1
        mask_2 = mask_2 * (pos_2 < cap).to(x.dtype)
        pos_2 = (pos_2 * mask_2).sum(-1)
        gate_2 = gate_2 * mask_2.sum(-1)
        oh_pos_1 = F.one_hot(pos_1.long(), cap).to(x.dtype)
        oh_pos_2 = F.one_hot(pos_2.long(), cap).to(x.dtype)
        combine = (
            gate_1[..., None, None] * mask_1[..., None] * oh_pos_1[..., None, :]
            + gate_2[..., None, None] * mask_2[..., None] * oh_pos_2[..., None, :]
        )
        dispatch = (combine != 0).to(x.dtype)
        expert_in = torch.einsum("GSEC,GSM->EGCM", dispatch, xg)
        hidden = F.relu(torch.einsum("EGCM,EMH->EGCH", expert_in, self.w_in))
        expert_out = torch.einsum("EGCH,EHM->EGCM", hidden, self.w_out)
        return torch.einsum("GSEC,EGCM->GSM", combine, expert_out).reshape(-1, H)


class SwitchHF(nn.Module):
    # Follows: huggingface/transformers (4.x) src/transformers/models/switch_transformers/
    # modeling_switch_transformers.py (SwitchTransformersTop1Router, SwitchTransformersSparseMLP)
    # Distinct: top-1 argmax; capacity by `cumsum(one_hot) <= capacity`; experts in a ModuleDict,
    # `next_states[mask] = expert(x[mask])` over a *clone* of x, so dropped tokens pass through
    # unchanged, and every row (routed or not) is scaled by its max router probability.
    def __init__(self, expert_capacity=3):
        super().__init__()
        self.expert_capacity = expert_capacity
        self.classifier = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleDict({f"expert_{i}": _FFN() for i in range(E)})

    def forward(self, x):
        probs = F.softmax(self.classifier(x).float(), dim=-1)
        index = F.one_hot(torch.argmax(probs, dim=-1), num_classes=E)
        priority = torch.cumsum(index, dim=-2)
        index = index * (priority <= self.expert_capacity)
        router_probs = torch.max(probs, dim=-1).values.unsqueeze(-1)
        router_mask = index.bool()
        next_states = x.clone()
        for idx, expert in enumerate(self.experts.values()):
            tok = router_mask[:, idx]
            next_states[tok] = expert(x[tok]).to(next_states.dtype)
        return (router_probs * next_states).to(x.dtype)


class FairseqTop1(nn.Module):
    # Follows: facebookresearch/fairseq fairseq/modules/moe/top1gate.py + moe/moe_layer.py
    # (MOELayer)
    # Distinct: top-1 gating with `fused_cumsum_sub_one` positions; the `[S, E, C]` combine tensor
    # as a `bmm` of gates `[S, E, 1]` by location one-hots `[S, 1, C]`; dispatch = combine.bool();
    # experts over `chunk(E, dim=0)` of the `[E, C, M]` einsum ("sec,sm->ecm") result.
    def __init__(self, capacity_factor=1.0):
        super().__init__()
        self.cf = capacity_factor
        self.wg = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_FFN() for _ in range(E))

    def forward(self, x):
        gates = F.softmax(self.wg(x), dim=1)
        cap = int(math.ceil(x.shape[0] / E * self.cf))
        idx1 = torch.argmax(gates, dim=1)
        mask1 = torch.zeros_like(gates).scatter_(1, idx1.unsqueeze(-1), 1)
        gates1_s = (gates * mask1).sum(dim=1)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        mask1 = mask1 * torch.lt(loc1, cap)
        loc1_s = torch.sum(loc1 * mask1, dim=1).long()
        gates1 = gates1_s.unsqueeze(-1) * mask1.to(gates1_s.dtype)
        loc1_sc = torch.zeros(x.shape[0], cap, dtype=x.dtype).scatter_(1, loc1_s.unsqueeze(-1), 1)
        combine = torch.bmm(gates1.unsqueeze(-1), loc1_sc.unsqueeze(1))
        dispatch = combine.bool()
        dispatched = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
        chunks = dispatched.chunk(E, dim=0)
        out = torch.cat([expert(c) for c, expert in zip(chunks, self.experts, strict=True)], dim=0)
        return torch.einsum("sec,ecm->sm", combine, out)


class Tutel(nn.Module):
    # Follows: microsoft/tutel tutel/impls/moe_layer.py (MOELayer, top-k gate) +
    # tutel/impls/fast_dispatch.py (extract_critical, fast_encode / fast_decode) + experts/ffn.py
    # Distinct: no `[T, E, C]` tensor at all: per slot k, a flat slot index `expert * C + location`
    # (locations of slot k queued after all of slot k-1) scatters rows into an `[E*C, H]` buffer
    # (overflow -> a spare row); batched matmul experts with biases; decode gathers slots back and
    # weights them by the (renormalised) gates.
    def __init__(self, capacity_factor=1.0):
        super().__init__()
        self.cf = capacity_factor
        self.wg = nn.Linear(H, E, bias=False)
        self.fc1_w = _stacked(E, H, I)
        self.fc1_b = nn.Parameter(torch.randn(E, 1, I) * 0.1)
        self.fc2_w = _stacked(E, I, H)
        self.fc2_b = nn.Parameter(torch.randn(E, 1, H) * 0.1)

    def forward(self, x):
        T = x.shape[0]
        scores = F.softmax(self.wg(x), dim=1)
        top = torch.topk(scores, K, dim=1).indices
        ids_s = [t.view(-1) for t in top.chunk(K, dim=1)]
        masks_se = [F.one_hot(i, E) for i in ids_s]
        gates_s = [(scores * m).sum(dim=1) for m in masks_se]
        denom = torch.clamp(sum(gates_s), min=torch.finfo(x.dtype).eps)
        gates_s = [g / denom for g in gates_s]
        cap = int(math.ceil(K * self.cf * T / E))
        locs_s, base = [], torch.zeros(1, E, dtype=torch.long)
        for m in masks_se:
            loc = torch.cumsum(m, dim=0) - 1 + base
            locs_s.append(torch.sum(loc * m, dim=1))
            base = base + torch.sum(m, dim=0, keepdim=True)
        slots = [
            torch.where(loc < cap, i * cap + loc, E * cap)
            for i, loc in zip(ids_s, locs_s, strict=True)
        ]
        buf = x.new_zeros(E * cap + 1, H)
        for s in slots:
            buf = buf.index_add(0, s, x)
        h = buf[:-1].view(E, cap, H)
        h = F.relu(torch.matmul(h, self.fc1_w) + self.fc1_b)
        y = (torch.matmul(h, self.fc2_w) + self.fc2_b).view(E * cap, H)
        y = torch.cat([y, y.new_zeros(1, H)])
        return sum(g[:, None] * y[s] for g, s in zip(gates_s, slots, strict=True))


# ============================================================================ hand-written EP
def _no_comm(group, W):
    return group is None or W == 1


class DeepSeekV3Gate(nn.Module):
    def __init__(self, num_experts, groups=4, topk_groups=2, route_scale=1.5):
        super().__init__()
        self.groups, self.topk_groups, self.route_scale = groups, topk_groups, route_scale
        self.weight = nn.Parameter(torch.randn(num_experts, H) * H**-0.5)
        self.register_buffer("bias", torch.randn(num_experts) * 0.1)

    def forward(self, x):
        scores = F.linear(x, self.weight).sigmoid()
        original = scores
        scores = scores + self.bias
        scores = scores.view(x.size(0), self.groups, -1)
        group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
        keep = group_scores.topk(self.topk_groups, dim=-1)[1]
        mask = scores.new_ones(x.size(0), self.groups, dtype=torch.bool).scatter_(1, keep, False)
        scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, K, dim=-1)[1]
        weights = original.gather(1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices


class DeepSeekV3(nn.Module):
    # Follows: deepseek-ai/DeepSeek-V3 inference/model.py (Gate, MoE)
    # Distinct: group-limited sigmoid gate with a routing-only bias; `bincount(...).tolist()` and
    # `if counts[i] == 0: continue` over `range(start, end)` of *this rank's* experts (None
    # elsewhere in the ModuleList); every rank gets every token and the partial sums meet in
    # `dist.all_reduce(y)` (an inference code path: no backward through it).
    NE = 8

    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, rank = _group_info(group)
        self.n_local = self.NE // self.W
        self.start, self.end = rank * self.n_local, (rank + 1) * self.n_local
        self.gate = DeepSeekV3Gate(self.NE)
        self.shared_experts = _SwiGLU(2 * I)
        self.experts = nn.ModuleList(
            _fill(_SwiGLU(), 100 + i) if self.start <= i < self.end else None
            for i in range(self.NE)
        )

    def forward(self, x):
        weights, indices = self.gate(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.NE).tolist()
        for i in range(self.start, self.end):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        z = self.shared_experts(x)
        if not _no_comm(self.group, self.W):
            dist.all_reduce(y, group=self.group)
        return y + z


class TorchtitanEP(nn.Module):
    # Follows: pytorch/torchtitan torchtitan/distributed/expert_parallel.py (ExpertParallel
    # _token_dispatch / _token_combine) + models/moe/moe.py + models/moe/utils.py (_permute)
    # Distinct: counts exchanged with the functional `all_to_all_single` + explicit `wait_tensor`;
    # split sizes `.view(W, -1).sum(1).to("cpu")` then `.tolist()`; payload both ways through
    # `all_to_all_single_autograd`; received rows regrouped by generate_permute_indices (rank-major
    # -> expert-major, padded) and un-permuted before going back; sigmoid scores applied after.
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, rank = _group_info(group)
        self.E_l = E // self.W
        local = range(rank * self.E_l, (rank + 1) * self.E_l)
        self.gate = nn.Linear(H, E, bias=False)
        self.shared_experts = _SwiGLU()
        self.w1 = _local_stack(E, local, (I, H), 1)
        self.w2 = _local_stack(E, local, (H, I), 2)
        self.w3 = _local_stack(E, local, (I, H), 3)

    def forward(self, x):
        W, E_l, group = self.W, self.E_l, self.group
        scores = torch.sigmoid(self.gate(x).to(torch.float32))
        top_scores, chosen = torch.topk(scores, k=K, dim=1)
        counts = torch.histc(chosen.view(-1).float(), bins=E, min=0, max=E).long()
        order = torch.argsort(chosen.view(-1), stable=True)
        top_sorted = top_scores.view(-1)[order]
        tok = (order // K).reshape(-1, 1).expand(-1, H)
        routed = torch.gather(x, dim=0, index=tok)
        if _no_comm(group, W):
            counts_group, recv = counts, routed
        else:
            with torch.no_grad():
                counts_group = fc.all_to_all_single(counts, None, None, group)
                counts_group = torch.ops._c10d_functional.wait_tensor(counts_group)
                in_splits = counts.view(W, -1).sum(dim=1).to(torch.device("cpu")).tolist()
                out_splits = counts_group.view(W, -1).sum(dim=1).to(torch.device("cpu")).tolist()
            recv = fc.all_to_all_single_autograd(routed, out_splits, in_splits, group)
        shape, recv, perm, padded = _titan_permute(recv, counts_group, E_l, W)
        y = _titan_experts_for_loop(self.w1, self.w2, self.w3, recv, padded)
        y = _titan_unpermute(y, shape, perm)
        if not _no_comm(group, W):
            y = fc.all_to_all_single_autograd(y, in_splits, out_splits, group)
        out = self.shared_experts(x)
        y = (y.to(torch.float32) * top_sorted.reshape(-1, 1)).to(x.dtype)
        return out.scatter_add(dim=0, index=tok, src=y)


class _MegatronAllToAll(torch.autograd.Function):
    """Megatron's ``_AllToAll``: ``dist.all_to_all_single`` into a new buffer, reversed backward."""

    @staticmethod
    def forward(ctx, group, inp, output_split_sizes, input_split_sizes):
        ctx.group, ctx.out_s, ctx.in_s = group, output_split_sizes, input_split_sizes
        inp = inp.contiguous()
        out = inp.new_empty(size=[sum(output_split_sizes), *inp.shape[1:]])
        dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = _MegatronAllToAll.apply(ctx.group, grad, ctx.in_s, ctx.out_s)
        return None, back, None, None


class MegatronEP(nn.Module):
    # Follows: NVIDIA/Megatron-LM megatron/core/transformer/moe/token_dispatcher.py
    # (MoEAlltoAllTokenDispatcher) + moe/moe_utils.py (permute, unpermute, sort_chunks_by_idxs) +
    # moe/router.py (TopKRouter) + moe/experts.py (SequentialMLP)
    # Distinct: a `[T, E]` bool routing map; rows permuted expert-major by `masked_select` of a
    # token-index grid; per-expert counts *all-gathered* into a `[W, E]` matrix; a custom
    # autograd.Function around `dist.all_to_all_single`; received chunks reordered by `split(...)` +
    # `cat` in a precomputed chunk order (and back); probs applied in unpermute with `scatter_add_`.
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _group_info(group)
        self.E_l = E // self.W
        self.weight = nn.Parameter(torch.randn(E, H) * H**-0.5)
        self.local_experts = nn.ModuleList(
            _fill(_FFN(F.gelu), 300 + self.rank * self.E_l + j) for j in range(self.E_l)
        )
        grid = torch.arange(E).reshape(-1, self.E_l)
        self.sort_by_expert = grid.T.ravel().tolist()
        self.restore_by_rank = torch.arange(E).reshape(self.E_l, -1).T.ravel().tolist()

    def _a2a(self, t, out_splits, in_splits):
        if _no_comm(self.group, self.W):
            return t
        return _MegatronAllToAll.apply(self.group, t, out_splits, in_splits)

    def forward(self, x):
        W, E_l, T = self.W, self.E_l, x.shape[0]
        logits = F.linear(x, self.weight)
        scores, top = torch.topk(logits, K, dim=1)
        probs_k = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
        probs = torch.zeros_like(logits).scatter(1, top, probs_k)
        routing_map = torch.zeros_like(logits).int().scatter(1, top, 1).bool()
        local_counts = routing_map.sum(dim=0).long()
        in_splits = local_counts.reshape(W, E_l).sum(dim=1).tolist()
        if _no_comm(self.group, W):
            global_counts = local_counts.reshape(1, E)
        else:
            gathered = local_counts.new_empty(W * E)
            dist.all_gather_into_tensor(gathered, local_counts, group=self.group)
            global_counts = gathered.reshape(W, E)
        per_local = global_counts[:, self.rank * E_l : (self.rank + 1) * E_l].contiguous()
        out_splits = per_local.sum(dim=-1).tolist()
        tokens_per_expert = per_local.sum(dim=0)
        # permute (moe_utils.permute)
        rmap = routing_map.T.contiguous()
        grid = torch.arange(T).unsqueeze(0).expand(E, -1)
        sorted_indices = grid.masked_select(rmap)
        permuted = x.index_select(0, sorted_indices)
        permuted_probs = probs.T.contiguous().masked_select(rmap)
        recv = self._a2a(permuted, out_splits, in_splits)
        chunks = recv.split(per_local.ravel().tolist(), dim=0)
        recv = torch.cat([chunks[i] for i in self.sort_by_expert], dim=0)
        parts = torch.split(recv, tokens_per_expert.tolist())
        y = torch.cat([expert(p) for expert, p in zip(self.local_experts, parts, strict=True)])
        chunks = y.split(per_local.T.ravel().tolist(), dim=0)
        y = torch.cat([chunks[i] for i in self.restore_by_rank], dim=0)
        back = self._a2a(y, in_splits, out_splits)
        back = back * permuted_probs.unsqueeze(-1)
        out = torch.zeros_like(x)
        out.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, H), back)
        return out


class _MOEScatter(torch.autograd.Function):
    """FastMoE's ``MOEScatter``: rows gathered by ``pos`` (local scatter) and sent by the count
    matrix (global scatter) in one autograd.Function; backward sends back and scatter-adds."""

    @staticmethod
    def forward(ctx, inp, pos, out_splits, in_splits, group):
        ctx.save_for_backward(pos)
        ctx.args = (inp.shape[0], out_splits, in_splits, group)
        rows = inp[pos]
        if group is None:
            return rows
        return fc.wait_tensor(fc.all_to_all_single(rows, out_splits, in_splits, group))

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        T, out_splits, in_splits, group = ctx.args
        if group is not None:
            grad = fc.wait_tensor(
                fc.all_to_all_single(grad.contiguous(), in_splits, out_splits, group)
            )
        return grad.new_zeros(T, grad.shape[1]).index_add(0, pos, grad), None, None, None, None


class _MOEGather(torch.autograd.Function):
    """FastMoE's ``MOEGather``: rows sent back (global gather), then put at ``pos``."""

    @staticmethod
    def forward(ctx, rows, pos, out_splits, in_splits, group, T):
        ctx.save_for_backward(pos)
        ctx.args = (out_splits, in_splits, group)
        if group is not None:
            rows = fc.wait_tensor(fc.all_to_all_single(rows, in_splits, out_splits, group))
        return rows.new_zeros(T, rows.shape[1]).index_copy(0, pos, rows)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        out_splits, in_splits, group = ctx.args
        rows = grad[pos]
        if group is not None:
            rows = fc.wait_tensor(fc.all_to_all_single(rows, out_splits, in_splits, group))
        return rows, None, None, None, None, None


class FastMoETop1(nn.Module):
    # Follows: laekov/fastmoe fmoe/layers.py (FMoE, _fmoe_general_global_forward) +
    # fmoe/functions.py (prepare_forward, MOEScatter, MOEGather) + fmoe/gates/switch_gate.py
    # Distinct: top-1; local expert counts exchanged into a `[W, E_l]` "global_expert_count" matrix;
    # the row gather by the sorted order *and* the exchange live inside custom autograd.Functions
    # (MOEScatter / MOEGather); received rows (rank-major) moved expert-major by destinations
    # computed from the count matrix's two prefix sums (`regrouped[dest] = recv`), read back with
    # `y[dest]`; the gate score applied with a `bmm` at the end.
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, rank = _group_info(group)
        self.E_l = E // self.W
        self.gate = nn.Linear(H, E)
        self.experts = nn.ModuleList(
            _fill(_FFN(F.gelu), 400 + rank * self.E_l + j) for j in range(self.E_l)
        )

    def forward(self, x):
        W, E_l, T = self.W, self.E_l, x.shape[0]
        group = None if _no_comm(self.group, W) else self.group
        score = F.softmax(self.gate(x), dim=-1)
        top_score, top_idx = torch.topk(score, k=1, dim=-1)
        with torch.no_grad():
            _, pos = torch.sort(top_idx.view(-1))
            local_count = torch.bincount(top_idx.view(-1), minlength=E)
            torch._check(local_count.shape[0] == E)
            if group is None:
                global_count = local_count
            else:
                global_count = fc.wait_tensor(fc.all_to_all_single(local_count, None, None, group))
            matrix = global_count.view(W, E_l)
            flat = matrix.reshape(-1)
            src_start = torch.cumsum(flat, 0) - flat
            em = matrix.t().reshape(-1)
            dst_start = (torch.cumsum(em, 0) - em).view(E_l, W).t().reshape(-1)
            fwd_expert_count = matrix.sum(dim=0)
            in_splits = local_count.view(W, E_l).sum(1).tolist()
            out_splits = matrix.sum(1).tolist()
            rows = sum(out_splits)
            chunk = torch.repeat_interleave(torch.arange(W * E_l), flat, output_size=rows)
            dest = (dst_start - src_start)[chunk] + torch.arange(rows)
        recv = _MOEScatter.apply(x, pos, out_splits, in_splits, group)
        regrouped = recv.new_zeros(rows, H)
        regrouped[dest] = recv
        parts = regrouped.split(fwd_expert_count.tolist())
        y = torch.cat([expert(p) for expert, p in zip(self.experts, parts, strict=True)])[dest]
        out = _MOEGather.apply(y, pos, out_splits, in_splits, group, T)
        return torch.bmm(top_score.view(-1, 1, 1), out.view(-1, 1, H)).reshape(-1, H)


class ShipIdsTop2(nn.Module):
    # Follows: this project's original dispatch/combine PR (its reference algorithm shipped per-row
    # metadata next to the payload; ARCHITECTURE.md "Collectives"), a common hand-written EP style
    # Distinct: pairs ordered by *destination rank* only; `bincount` send counts per rank exchanged
    # with the functional all_to_all; each row's global expert id shipped in its own all_to_all next
    # to the payload (`all_to_all_single_autograd`); the receiver argsorts by the shipped id, runs
    # its experts on `split(bincount(local).tolist())` and puts rows back with `y[order] = ..`.
    def __init__(self, group=None):
        super().__init__()
        self.group, self.W, self.rank = _group_info(group)
        self.E_l = E // self.W
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(
            _fill(_GateUpDown(), 500 + self.rank * self.E_l + j) for j in range(self.E_l)
        )

    def forward(self, x):
        W, E_l, group = self.W, self.E_l, self.group
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.flatten()
        dest = flat // E_l
        order = torch.argsort(dest, stable=True)
        rows, ids_sorted = x[order // K], flat[order]
        send_counts = torch.bincount(dest, minlength=W)
        torch._check(send_counts.shape[0] == W)
        if _no_comm(group, W):
            recv, recv_ids = rows, ids_sorted
        else:
            recv_counts = fc.all_to_all_single(send_counts, None, None, group)
            recv_counts = torch.ops._c10d_functional.wait_tensor(recv_counts)
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
            recv = fc.all_to_all_single_autograd(rows, recv_splits, send_splits, group)
            recv_ids = fc.all_to_all_single(ids_sorted, recv_splits, send_splits, group)
            recv_ids = torch.ops._c10d_functional.wait_tensor(recv_ids)
        local = recv_ids - self.rank * E_l
        by_expert = torch.argsort(local, stable=True)
        tpe = torch.bincount(local, minlength=E_l)
        torch._check(tpe.shape[0] == E_l)
        parts = recv[by_expert].split(tpe.tolist())
        ys = torch.cat([self.experts[j](parts[j]) for j in range(E_l)])
        y = torch.empty_like(ys)
        y[by_expert] = ys
        if not _no_comm(group, W):
            y = fc.all_to_all_single_autograd(y, send_splits, recv_splits, group)
        y = y * w.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, order // K, y)


class _DeepSpeedAllToAll(torch.autograd.Function):
    """DeepSpeed's ``_AllToAll``: equal-split ``dist.all_to_all_single``, same in backward."""

    @staticmethod
    def forward(ctx, group, inp):
        ctx.group = group
        inp = inp.contiguous()
        out = torch.empty_like(inp)
        dist.all_to_all_single(out, inp, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, _DeepSpeedAllToAll.apply(ctx.group, grad)


class DeepSpeedTop2(nn.Module):
    # Follows: microsoft/DeepSpeed deepspeed/moe/sharded_moe.py (top2gating, MOELayer, _AllToAll) +
    # deepspeed/moe/experts.py (Experts)
    # Distinct: capacity `ceil(2 * T / E)`; second choice = argmax of logits with the first masked
    # to -inf (its gumbel noise omitted), queued after all first choices; `[S, E, C]` combine from
    # einsums "se,sc->sec"; dispatch einsum "sec,sm->ecm"; the *padded* `[E, C, M]` buffer moves by
    # an equal-split all_to_all (custom autograd.Function), experts on `chunk(E_l, dim=1)` of `[W,
    # E_l, C, M]`; combine einsum "sec,ecm->sm".
    def __init__(self, group=None, capacity_factor=1.0, min_capacity=2):
        super().__init__()
        self.group, self.W, rank = _group_info(group)
        self.E_l = E // self.W
        self.cf, self.min_cap = capacity_factor, min_capacity
        self.wg = nn.Linear(H, E, bias=False)
        self.deepspeed_experts = nn.ModuleList(
            _fill(_FFN(), 600 + rank * self.E_l + j) for j in range(self.E_l)
        )

    def _gate(self, logits):
        S = logits.shape[0]
        gates = F.softmax(logits, dim=1)
        cap = max(int(math.ceil(S / E * 2 * self.cf)), self.min_cap)
        mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=E)
        except1 = logits.masked_fill(mask1.bool(), float("-inf"))
        mask2 = F.one_hot(torch.argmax(except1, dim=1), num_classes=E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        loc2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(loc1, cap)
        mask2 = mask2 * torch.lt(loc2, cap)
        loc1_s, loc2_s = torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)
        m1, m2 = mask1.float(), mask2.float()
        g1 = torch.einsum("se,se->s", gates, m1)
        g2 = torch.einsum("se,se->s", gates, m2)
        denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        gates1 = torch.einsum("s,se->se", g1, m1)
        gates2 = torch.einsum("s,se->se", g2, m2)
        sc1 = F.one_hot(loc1_s, cap).float()
        sc2 = F.one_hot(loc2_s, cap).float()
        combine = torch.einsum("se,sc->sec", gates1, sc1) + torch.einsum("se,sc->sec", gates2, sc2)
        return combine, combine.bool()

    def _a2a(self, t):
        return t if _no_comm(self.group, self.W) else _DeepSpeedAllToAll.apply(self.group, t)

    def forward(self, x):
        combine, dispatch = self._gate(self.wg(x).float())
        dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
        dispatched = self._a2a(dispatched).reshape(self.W, self.E_l, -1, H)
        chunks = dispatched.chunk(self.E_l, dim=1)
        out = torch.cat(
            [ex(c) for c, ex in zip(chunks, self.deepspeed_experts, strict=True)], dim=1
        )
        out = self._a2a(out).reshape(self.W * self.E_l, -1, H)
        return torch.einsum("sec,ecm->sm", combine.type_as(x), out)


# ============================================================================ the corpus
@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[..., nn.Module]  # ep entries: make(group)
    source: str  # project and file it follows
    family: str  # our guess of its routing family (ARCHITECTURE.md A-F)
    fullgraph: bool = True  # False: Dynamo cannot capture it whole; compiled by compile_moe
    ep: bool = False  # hand-written expert parallelism (local experts only)
    w2_grads: bool = True  # False: forward-only at W = 2 (inference code, no backward)
    replicated_input: bool = False  # every rank gets the same tokens (all_reduce EP)


_ENTRIES = [
    Entry(
        "mixtral_ref",
        MixtralRef,
        "mistralai/mistral-inference src/mistral_inference/moe.py",
        "C (where + indexed +=)",
    ),
    Entry(
        "deepseek_v3",
        DeepSeekV3,
        "deepseek-ai/DeepSeek-V3 inference/model.py",
        "A + E (all_reduce EP)",
        fullgraph=False,
        ep=True,
        w2_grads=False,
        replicated_input=True,
    ),
    Entry("olmoe", OLMoE, "transformers 4.x models/olmoe/modeling_olmoe.py", "A"),
    Entry("jetmoe", JetMoE, "myshell-ai/JetMoE jetmoe/utils/moe.py, parallel_experts.py", "D"),
    Entry(
        "dbrx",
        DBRX,
        "transformers 4.x models/dbrx/modeling_dbrx.py (databricks/dbrx)",
        "A (continue branch)",
        fullgraph=False,
    ),
    Entry(
        "jamba",
        Jamba,
        "transformers 4.x models/jamba/modeling_jamba.py",
        "A (continue branch)",
        fullgraph=False,
    ),
    Entry(
        "qwen2_moe",
        Qwen2MoE,
        "transformers 4.4x models/qwen2_moe/modeling_qwen2_moe.py",
        "A + gated shared",
    ),
    Entry(
        "arctic",
        Arctic,
        "Snowflake arctic HF remote code modeling_arctic.py",
        "A + dense residual",
    ),
    Entry("grok1", Grok1, "xai-org/grok-1 model.py (JAX)", "dense compute + one-hot select"),
    Entry(
        "megablocks_dmoe",
        MegablocksDMoE,
        "databricks/megablocks megablocks/layers/dmoe.py",
        "D",
    ),
    Entry(
        "torchtitan",
        TorchtitanMoE,
        "pytorch/torchtitan torchtitan/models/moe/moe.py, utils.py, kernels.py",
        "D (padded permute)",
    ),
    Entry(
        "torchtitan_score_before",
        lambda: TorchtitanMoE(score_before=True),
        "pytorch/torchtitan torchtitan/models/moe/moe.py (score_before_experts=True)",
        "D (weights on input)",
    ),
    Entry("nanomoe", NanoMoE, "wolfecameron/nanoMoE model.py", "F"),
    Entry(
        "makemoe_any_mask",
        MakeMoEAnyMask,
        "AviSoori1x/makeMoE makeMoE.py (issue near miss)",
        "C (any over k)",
    ),
    Entry(
        "sort_split_inverse",
        SortSplitInverse,
        "issue near miss (sort + split(tolist) + ModuleList)",
        "D (ModuleList)",
    ),
    Entry(
        "aria_tf453",
        AriaTf453,
        "transformers 4.53 models/aria/modeling_aria.py",
        "D (tensor offsets)",
    ),
    Entry(
        "aria_tf5_grouped_mm",
        lambda: _aria_tf5("grouped_mm"),
        "transformers 5.24 AriaTextMoELayer (real class), grouped_mm",
        "D",
    ),
    Entry(
        "aria_tf5_eager",
        lambda: _aria_tf5("eager"),
        "transformers 5.24 AriaTextMoELayer (real class), eager",
        "expert_hit loop",
        fullgraph=False,
    ),
    Entry("gshard", GShard, "tensorflow/lingvo lingvo/core/gshard_layers.py (TF)", "F (groups)"),
    Entry(
        "switch_hf",
        SwitchHF,
        "transformers 4.x models/switch_transformers/modeling_switch_transformers.py",
        "F (mask loop, passthrough)",
    ),
    Entry(
        "fairseq_top1",
        FairseqTop1,
        "facebookresearch/fairseq fairseq/modules/moe/top1gate.py, moe_layer.py",
        "F",
    ),
    Entry(
        "tutel",
        Tutel,
        "microsoft/tutel tutel/impls/fast_dispatch.py, moe_layer.py",
        "F (flat slots)",
    ),
    Entry(
        "torchtitan_ep",
        TorchtitanEP,
        "pytorch/torchtitan torchtitan/distributed/expert_parallel.py",
        "E",
        ep=True,
    ),
    Entry(
        "megatron_ep",
        MegatronEP,
        "NVIDIA/Megatron-LM megatron/core/transformer/moe/token_dispatcher.py",
        "E",
        ep=True,
    ),
    Entry(
        "fastmoe_top1_ep",
        FastMoETop1,
        "laekov/fastmoe fmoe/layers.py, fmoe/functions.py",
        "E (top-1)",
        ep=True,
    ),
    Entry(
        "ship_ids_top2_ep",
        ShipIdsTop2,
        "moe-ops original dispatch PR (per-row metadata)",
        "E (ids shipped)",
        ep=True,
    ),
    Entry(
        "deepspeed_top2_ep",
        DeepSpeedTop2,
        "microsoft/DeepSpeed deepspeed/moe/sharded_moe.py",
        "F + E (padded a2a)",
        ep=True,
    ),
]
CORPUS: dict[str, Entry] = {e.name: e for e in _ENTRIES}


# ============================================================================ running one entry
@dataclasses.dataclass
class Outcome:
    outcome: str  # "rewritten" | "rejected" (with the backend's reason) | "unnoticed" | "crashed"
    reason: str = ""  # why not rewritten (or the crash summary)
    reason_from: str = ""  # "warning" | "moe_rejected" (debug log only) | ""
    families: tuple[str, ...] = ()  # families of the rewritten blocks
    graphs: int = 0  # graphs Dynamo handed the backend


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _short(msg: str) -> str:
    """The reason of a "was not rewritten" warning, without the code location and the generic
    hint (``block <path>: `` in front when the block is not the top module)."""
    msg = msg.split(". To have it rewritten", 1)[0]
    m = re.match(
        r"fx_passes: MoE-looking block (\S+) (?:\(.*?\) )?was not rewritten: (.*)", msg, re.S
    )
    if m is None:
        return msg
    block, why = m.groups()
    return why if block == "<top>" else f"block {block}: {why}"


def build(name: str, group=None) -> nn.Module:
    entry = CORPUS[name]
    torch.manual_seed(0)
    return entry.make(group) if entry.ep else entry.make()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def compile_block(entry: Entry, model: nn.Module, group=None):
    """``(compiled callable, backend or None, graphs the inner compiler received)``. The graphs are
    the ones the pass rewrote in place (compile_moe builds its backend itself: None then)."""
    from torch._dynamo.backends.registry import lookup_backend

    aot = lookup_backend("aot_eager")
    graphs: list = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    if entry.fullgraph:
        backend = fx_passes.moe_backend(group, inner=inner)
        return torch.compile(model, backend=backend, fullgraph=True), backend, graphs
    return fx_passes.compile_moe(model, group=group, inner=inner), None, graphs


_DISPATCH = ("moe_ops.dispatch", "moe_ops.dispatch_fixed")


def rewritten_blocks(graphs) -> int:
    """moe_ops dispatch calls in the graphs the pass handed on (one per rewritten block)."""
    return sum(
        1
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).split(".default")[0].endswith(_DISPATCH)
    )


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-7)


def _grads(out, x, model, g):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], g, allow_unused=True)


def _crash_summary(err: BaseException) -> str:
    """``where: Type: message [innermost fx_passes frame]`` of an exception escaping compile;
    ``where`` is "pass" when the backend raised it, else "dynamo" (tracing, before the backend)."""
    inner = getattr(err, "inner_exception", None)
    where = "pass" if isinstance(err, torch._dynamo.exc.BackendCompilerFailed) else "dynamo"
    cause = inner or err
    frames = [f for f in traceback.extract_tb(cause.__traceback__) if "fx_passes" in f.filename]
    at = ""
    if frames:
        f = frames[-1]
        at = f" [{f.filename.split('fx_passes/')[-1]}:{f.lineno} in {f.name}: {f.line}]"
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{where}: {type(cause).__name__}: {msg}{at}"


def run_w1(name: str) -> Outcome:
    """Compile ``name`` at W = 1 and check output and gradients against eager (AssertionError if
    they differ). Returns what the backend did with it."""
    entry = CORPUS[name]
    model = build(name)
    reference = copy.deepcopy(model)
    x = tokens(T_W1, 1)
    x_ref, x_out = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = reference(x_ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = _grads(ref, x_ref, reference, g)

    # The backend warns once per (block, reason, code line) per process; blocks sharing code
    # (torchtitan and torchtitan_score_before) must each get their own warning here.
    getattr(fx_passes.backend, "_warned", set()).clear()
    log = logging.getLogger("fx_passes")
    cap = _Capture()
    log.addHandler(cap)
    try:
        compiled, backend, graphs = compile_block(entry, model)
        try:
            out = compiled(x_out)
        except Exception as err:  # an exception escaping compile is a result too
            return Outcome("crashed", _crash_summary(err), graphs=len(graphs))
    finally:
        log.removeHandler(cap)
    out_grads = _grads(out, x_out, model, g)
    torch.testing.assert_close(out, ref, **_tol(x.dtype), msg=f"{name}: output differs from eager")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads, strict=True)):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), (name, i)
            continue
        torch.testing.assert_close(a, b, **_tol(x.dtype), msg=f"{name}: gradient {i} differs")

    if rewritten_blocks(graphs):
        families = tuple(m.family for m in backend.matches) if backend is not None else ("?",)
        return Outcome("rewritten", families=families, graphs=len(graphs))
    warned = [_short(m) for m in cap.messages if "was not rewritten" in m]
    if warned:
        return Outcome("rejected", "; ".join(dict.fromkeys(warned)), "warning", graphs=len(graphs))
    rejects = [r for gm in graphs for r in gm.meta.get("moe_rejected", [])]
    if rejects:
        why = "; ".join(dict.fromkeys(f"family {r.family}: {r.reason}" for r in rejects))
        return Outcome("rejected", why, "moe_rejected", graphs=len(graphs))
    return Outcome("unnoticed", graphs=len(graphs))


def run_w1_safe(name: str) -> tuple[bool, Outcome | str]:
    """:func:`run_w1` for a worker process: ``(True, outcome)`` or ``(False, traceback)``."""
    try:
        return True, run_w1(name)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        return False, traceback.format_exc()


def _worker_init() -> None:
    torch.set_num_threads(1)


def w1_pool(workers: int = 2):
    """A pool of spawned processes (no process group: W = 1) for :func:`run_w1_safe`."""
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
    )


# ============================================================================ W = 2 (gloo)
def w2_case(name: str, compiled: bool = True) -> dict:
    """On every rank of the default (gloo) group: the block compiled with the "moe" backend at W
    ranks against the single-device block (built on a one-rank group for EP blocks) run on this
    rank's tokens. Single-device blocks keep every weight on every rank (the rewrite runs only
    the local experts; ``shard_experts`` is tested elsewhere); EP blocks hold only their local
    experts. Checks the output on this rank's tokens, the input gradient, and the parameter
    gradients against the single-device block's summed over every rank's tokens (replicated
    parameters' and whole stacked weights' gradients summed over ranks; local experts' as they
    are). Returns how many blocks the pass rewrote on this rank. ``compiled=False`` checks the
    block itself, run eagerly (a hand-written EP block whose compile crashes)."""
    entry = CORPUS[name]
    rank, W = dist.get_rank(), dist.get_world_size()
    solo_groups = [dist.new_group([r]) for r in range(W)]  # every rank makes every group
    solo = solo_groups[rank]
    x = tokens(T_W2, 1 if entry.replicated_input else 10 + rank)
    g = torch.randn(T_W2, H, generator=torch.Generator().manual_seed(20 + rank))

    reference = build(name, solo) if entry.ep else build(name)
    model = build(name, None) if entry.ep else build(name)
    x_ref = x.clone().requires_grad_(entry.w2_grads)
    x_out = x.clone().requires_grad_(entry.w2_grads)
    with torch.set_grad_enabled(entry.w2_grads):
        ref = reference(x_ref)
    run, graphs = model, []
    if compiled:
        run, _, graphs = compile_block(entry, model)
    with torch.set_grad_enabled(entry.w2_grads):
        out = run(x_out)
    tol = _tol(x.dtype)
    torch.testing.assert_close(out, ref, **tol, msg=f"{name}: output at W={W} (rank {rank})")
    result = dict(rewritten=rewritten_blocks(graphs))
    if not entry.w2_grads:
        return result
    (ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(x_out.grad, x_ref.grad, **tol, msg=f"{name}: input gradient")
    ref_params = dict(reference.named_parameters())
    for pname in ref_params:  # reference grads: summed over every rank's tokens
        p = ref_params[pname]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        p.grad = grad
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # a placeholder of shard_experts
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if entry.ep:
            m = re.search(r"(^|\.)(experts|local_experts|deepspeed_experts)\.(\d+)\.", pname)
            if m is not None and name != "deepseek_v3":
                gid = rank * (E // W) + int(m.group(3))
                ref_name = pname[: m.start(3)] + str(gid) + pname[m.end(3) :]
                want = ref_params[ref_name].grad
            elif p.shape != ref_params[pname].shape:  # stacked [E_l, ...]: this rank's slice
                want = ref_params[pname].grad[rank * p.shape[0] : (rank + 1) * p.shape[0]]
            else:  # replicated (or DeepSeek's globally named experts)
                if name != "deepseek_v3" or ".experts." not in "." + pname:
                    dist.all_reduce(grad)
                want = ref_params[pname].grad
        else:  # every weight whole on every rank: the rewrite runs (and grads) local experts only
            dist.all_reduce(grad)
            want = ref_params[pname].grad
        torch.testing.assert_close(grad, want, **tol, msg=f"{name}: gradient of {pname}")
    return result
