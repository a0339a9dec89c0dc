"""Keep only this rank's experts' weights: :func:`shard_experts`.

Rank ``r`` of ``W`` keeps experts ``[r * E / W, (r + 1) * E / W)`` of every expert ModuleList;
the other experts' parameters are replaced by zero-stride placeholders of the same shape and
dtype (one element of storage each, ``requires_grad=False``). The module structure and every
parameter's shape stay as they were, so Dynamo traces the model exactly as before, and the
rewritten graph (which only runs local experts) never reads the placeholders.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from fx_passes.rewrite import resolve_group


@dataclasses.dataclass(frozen=True)
class ShardedExperts:
    """One expert ModuleList after :func:`shard_experts`: its path, E, and this rank's experts."""

    path: str
    num_experts: int
    local_experts: range


def _expert_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and name.rsplit(".", 1)[-1].endswith("experts")
        and len(mod) > 0
    ]


def _placeholder(p: nn.Parameter) -> nn.Parameter:
    stub = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    return nn.Parameter(stub, requires_grad=False)


def shard_experts(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    experts: list[str] | None = None,
) -> list[ShardedExperts]:
    """Drop the weights of experts this rank does not own, in place (expert memory / W).

    Args:
        model: the single-device model (the same on every rank).
        group: the expert-parallel group; None means the default group when
            ``torch.distributed`` is initialized, else a single rank (nothing changes).
        experts: dotted paths of the expert ``nn.ModuleList`` s; default: every ModuleList whose
            name ends in ``experts``.

    Returns one :class:`ShardedExperts` per ModuleList. Compile the model with the ``"moe"``
    backend on the same group afterwards; its local experts' gradients are the sums over all
    ranks' tokens, as in the unsharded model run on every rank's tokens.
    """
    _, world_size, rank = resolve_group(group)
    if experts is None:
        lists = _expert_lists(model)
    else:
        lists = [(path, model.get_submodule(path)) for path in experts]
        for path, mod in lists:
            if not isinstance(mod, nn.ModuleList):
                raise TypeError(
                    f"shard_experts: experts entry {path!r} must name an nn.ModuleList, "
                    f"got {type(mod).__name__}"
                )
    out = []
    for path, mod in lists:
        E = len(mod)
        if E % world_size:
            raise ValueError(
                f"shard_experts: {path} has {E} experts, not a multiple of the group size "
                f"{world_size}"
            )
        e_l = E // world_size
        local = range(rank * e_l, (rank + 1) * e_l)
        for e, expert in enumerate(mod):
            if e in local:
                continue
            for sub in expert.modules():
                for name, p in list(sub.named_parameters(recurse=False)):
                    setattr(sub, name, _placeholder(p))
        out.append(ShardedExperts(path, E, local))
    return out
