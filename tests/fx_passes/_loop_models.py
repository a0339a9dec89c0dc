"""Small MoE blocks written the way single-device model code writes them (families A and C),
and their near misses. Shape letters: T tokens, H hidden, I expert inner size, E experts, K
top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.fx_passes._harness import H

I, E, K = 24, 4, 2  # noqa: E741


class Expert(nn.Module):
    def __init__(self, act=F.silu, bias=False):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(H, I, bias=bias)
        self.up = nn.Linear(H, I, bias=bias)
        self.down = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Router + ModuleList experts; ``forward`` variants pick the routing code."""

    def __init__(
        self,
        variant="onehot_where",
        *,
        routing="softmax",
        renorm=True,
        shared=False,
        act=F.silu,
        bias=False,
        num_experts=E,
        top_k=K,
    ):
        super().__init__()
        self.variant, self.routing, self.renorm = variant, routing, renorm
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(H, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(act, bias) for _ in range(num_experts))
        self.shared = Expert() if shared or variant == "base_acc" else None

    def _route(self, x):
        logits = self.router(x)
        if self.routing == "sigmoid":
            scores = torch.sigmoid(logits.float())
            _, idx = torch.topk(scores, self.top_k, dim=-1)
            w = scores.gather(1, idx)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x):
        w, idx = self._route(x)
        if self.variant == "base_acc":  # routed outputs accumulate onto the shared expert's
            return self._onehot_where(x, w, idx, self.shared(x))
        out = getattr(self, "_" + self.variant)(x, w, idx, torch.zeros_like(x))
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    # family A: one_hot mask, torch.where per expert (transformers 4.x OLMoE)
    def _onehot_where(self, x, w, idx, out):
        mask = F.one_hot(idx, self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x[None, tok].reshape(-1, H)) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out

    # family A: mask = idx == e, nonzero
    def _eq_nonzero(self, x, w, idx, out):
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, w[tok, slot][:, None] * self.experts[e](x[tok]))
        return out

    # family A, functional: out = out.index_add(...) per expert
    def _chain(self, x, w, idx, out):
        for e in range(self.num_experts):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out

    # family C: boolean-mask loop over slots and experts
    def _mask_loop(self, x, w, idx, out):
        for k in range(self.top_k):
            for e in range(self.num_experts):
                m = idx[:, k] == e
                out[m] += self.experts[e](x[m]) * w[m, k, None]
        return out

    # near miss: the mask is not a routing mask (>= instead of ==)
    def _not_routing_mask(self, x, w, idx, out):
        for e in range(self.num_experts):
            m = idx[:, 0] >= e
            out[m] += self.experts[e](x[m]) * w[m, 0, None]
        return out

    # near miss: the body is not per-expert (expert 0 for every e)
    def _same_expert(self, x, w, idx, out):
        for e in range(self.num_experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.experts[0](x[tok]) * w[tok, slot, None])
        return out

    # near miss: weights scale the expert input, which combine cannot express
    def _weights_on_input(self, x, w, idx, out):
        for e in range(self.num_experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.experts[e](x[tok] * w[tok, slot, None]))
        return out


class WithAuxLoss(Block):
    """Family A whose routing mask also feeds a load-balancing statistic (kept in the graph)."""

    def forward(self, x):
        w, idx = self._route(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out, mask.float().sum((1, 2)) / x.shape[0]


class ExpertChoice(nn.Module):
    """Near miss: a top-k over tokens (expert choice), not per-token routing."""

    def __init__(self, capacity=3):
        super().__init__()
        self.capacity = capacity
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x):
        scores = self.router(x).softmax(-1)
        w, tok = torch.topk(scores, self.capacity, dim=0)  # [C, E]: tokens per expert
        out = torch.zeros_like(x)
        for e in range(E):
            out.index_add_(0, tok[:, e], self.experts[e](x[tok[:, e]]) * w[:, e, None])
        return out


class ExpertHitLoop(nn.Module):
    """transformers 4.x Mixtral-style: a loop over experts found at run time."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x):
        w, idx = torch.topk(self.router(x).softmax(-1), K, dim=-1)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, E).permute(2, 1, 0)
        expert_hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit:
            slot, tok = torch.where(mask[e].squeeze(0))
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out


class Stack(nn.Module):
    """Residual MoE layers (nested module paths ``layers.<i>``)."""

    def __init__(self, layers=2, **block_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(Block(**block_kwargs) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x
