"""MoE blocks spelled in ways no syntactic family knows (the semantic family's test blocks), and
near misses that compute something else. Shape letters: T tokens, H hidden, I expert inner size,
E experts, K top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.fx_passes._harness import H

I, E, K = 24, 4, 2  # noqa: E741


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(H, I)
        self.fc2 = nn.Linear(I, H)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Routed(nn.Module):
    """Router + ``E`` experts (a ModuleList, or a ModuleDict keyed ``expert_e`` when ``keyed``);
    ``variant`` picks the routing code."""

    def __init__(self, variant: str, keyed: bool = False):
        super().__init__()
        self.variant = variant
        self.router = nn.Linear(H, E, bias=False)
        experts = [FFN() for _ in range(E)]
        if keyed:
            self.experts = nn.ModuleDict({f"expert_{e}": m for e, m in enumerate(experts)})
        else:
            self.experts = nn.ModuleList(experts)

    def _experts(self):
        return list(
            self.experts.values() if isinstance(self.experts, nn.ModuleDict) else self.experts
        )

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        return getattr(self, "_" + self.variant)(x, probs)

    def _nonzero_index_put(self, x, probs):
        """``nonzero(as_tuple=True)`` per expert, ``index_put_(..., accumulate=True)``."""
        w, ids = probs.topk(K, dim=-1)
        out = x.new_zeros(x.shape)
        for e, expert in enumerate(self._experts()):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            out.index_put_((tok,), expert(x[tok]) * w[tok, slot].unsqueeze(-1), accumulate=True)
        return out

    def _scatter_add(self, x, probs):
        """Token mask ``any`` over the slots, weight summed over them, ``scatter_add_``."""
        w, ids = probs.topk(K, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self._experts()):
            hit = ids == e
            rows = hit.any(dim=-1).nonzero().squeeze(-1)
            we = (w * hit).sum(dim=-1)[rows]
            y = expert(x.index_select(0, rows)) * we[:, None]
            out.scatter_add_(0, rows[:, None].expand(-1, x.shape[1]), y)
        return out

    def _onehot_einsum(self, x, probs):
        """Dense one-hot dispatch with no capacity: every expert reads its ``[T, H]`` slice of
        ``einsum("te,th->eth")`` (zeros for tokens it does not get); combine by einsum."""
        w, ids = torch.topk(probs, K, dim=-1)
        onehot = F.one_hot(ids, E).to(x.dtype)  # [T, K, E]
        dispatch = onehot.sum(1)
        combine = torch.einsum("tk,tke->te", w, onehot)
        xe = torch.einsum("te,th->eth", dispatch, x)
        ye = torch.stack([expert(xe[e]) for e, expert in enumerate(self._experts())])
        return torch.einsum("te,eth->th", combine, ye)

    def _masked_sum(self, x, probs):
        """Renormalised top-k, one boolean-masked output per expert, summed functionally."""
        w, ids = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        total = 0
        for e, expert in enumerate(self._experts()):
            hit = ids == e
            tok = hit.any(-1)
            y = torch.zeros_like(x)
            y[tok] = expert(x[tok]) * (w * hit).sum(-1, keepdim=True)[tok]
            total = total + y
        return total

    def _argmax_top1(self, x, probs):
        """Top-1 by ``argmax``, weighted by the max probability, ``index_add_``."""
        ids = probs.argmax(dim=-1)
        w = probs.max(dim=-1).values
        out = torch.zeros_like(x)
        for e, expert in enumerate(self._experts()):
            (tok,) = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, None])
        return out

    def _expand_per_slot(self, x, probs):
        """Softmax over the top-k logits; the rows expanded per slot (``[T, K, H]``), a boolean
        ``[T, K]`` mask per expert, an einsum over the slots."""
        v, ids = self.router(x).topk(K, dim=-1)
        w = v.softmax(-1)
        y = x.new_zeros(x.shape[0], K, x.shape[1])
        xk = x.unsqueeze(1).expand(-1, K, -1)
        for e, expert in enumerate(self._experts()):
            hit = ids == e
            y[hit] = expert(xk[hit])
        return torch.einsum("tk,tkh->th", w, y)

    def _repeat_flat_bmm(self, x, probs):
        """Every row repeated K times (``repeat_interleave``), flat ids, ``nonzero`` per expert,
        a ``bmm`` of the weights with the ``[T, K, H]`` outputs."""
        w, ids = probs.topk(K, dim=-1)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(K, dim=0)
        y = torch.empty_like(xr)
        for e, expert in enumerate(self._experts()):
            sel = (flat == e).nonzero().squeeze(-1)
            y[sel] = expert(xr[sel])
        return torch.bmm(w.unsqueeze(1), y.view(-1, K, x.shape[1])).squeeze(1)

    # ------------------------------------------------------------------ near misses
    def _weights_on_input(self, x, probs):
        """The routing weight scales the expert's *input*: not expressible by combine."""
        w, ids = probs.topk(K, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self._experts()):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, tok, expert(x[tok] * w[tok, slot].unsqueeze(-1)))
        return out

    def _capacity(self, x, probs):
        """At most 2 tokens per expert, the first ones in token order: the rest dropped."""
        ids = probs.argmax(dim=-1)
        onehot = F.one_hot(ids, E)
        keep = ((torch.cumsum(onehot, dim=0) * onehot).sum(-1) <= 2) & (onehot.sum(-1) > 0)
        w = probs.max(dim=-1).values * keep
        out = torch.zeros_like(x)
        for e, expert in enumerate(self._experts()):
            (tok,) = torch.where((ids == e) & keep)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, None])
        return out


class SkipsEmpty(Routed):
    """A data-dependent branch inside the expert loop: Dynamo skips the whole frame."""

    def __init__(self):
        super().__init__("argmax_top1")

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        w, ids = probs.topk(K, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self._experts()):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


class WithShared(nn.Module):
    """A routed block plus a shared expert added outside it."""

    def __init__(self, variant: str = "scatter_add"):
        super().__init__()
        self.moe = Routed(variant)
        self.shared = FFN()

    def forward(self, x):
        return self.moe(x) + self.shared(x)
