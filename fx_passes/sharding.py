"""Keep only this rank's experts' weights: :func:`shard_experts`.

Rank ``r`` of ``W`` keeps experts ``[r * E / W, (r + 1) * E / W)`` of every expert ModuleList;
the other experts' parameters are replaced by zero-stride placeholders of the same shape and
dtype (one element of storage each, ``requires_grad=False``). The module structure and every
parameter's shape stay as they were, so Dynamo traces the model exactly as before, and the
rewritten graph (which only runs local experts) never reads the placeholders.

With ``stack=True`` the local experts' parameters are also moved into one ``[E_l, ...]``
parameter per name, registered on the ModuleList (``experts.stacked_gate_weight``), and each
local expert reads its slice ``stacked[j]`` (a view, made at every access: autograd sends the
gradient to the stacked parameter). Every expert computes what it computed before, bit for
bit, and the rewrite's ``torch._grouped_mm`` reads the stacked parameter instead of stacking
the experts' weights at every forward. The state dict's keys change accordingly; create the
optimizer after this call.
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
    stack: bool = False,
) -> list[ShardedExperts]:
    """Drop the weights of experts this rank does not own, in place (expert memory / W).

    Args:
        model: the single-device model (the same on every rank).
        group: the expert-parallel group; None means the default group when
            ``torch.distributed`` is initialized, else a single rank (nothing else changes).
        experts: dotted paths of the expert ``nn.ModuleList`` s; default: every ModuleList whose
            name ends in ``experts``.
        stack: also store the local experts' parameters as one ``[E_l, ...]`` parameter per
            name (see the module docstring); at W = 1 this is all that changes.

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
        if stack:
            _stack_local(path, mod, local)
        out.append(ShardedExperts(path, E, local))
    return out


def _stack_local(path: str, mod: nn.ModuleList, local: range) -> None:
    """Move the local experts' parameters into one ``[E_l, ...]`` parameter per name."""
    experts = [mod[e] for e in local]
    names = [n for n, _ in experts[0].named_parameters()]
    for e, expert in zip(local, experts, strict=True):
        got = [(n, p.shape, p.dtype, p.device) for n, p in expert.named_parameters()]
        want = [(n, p.shape, p.dtype, p.device) for n, p in experts[0].named_parameters()]
        if got != want:
            raise ValueError(
                f"shard_experts(stack=True): expert {e} of {path} must have the parameters of "
                f"expert {local[0]} (names, shapes, dtypes, devices), got {got} and {want}"
            )
    for name in names:
        attr = "stacked_" + name.replace(".", "_")
        if hasattr(mod, attr):
            raise ValueError(f"shard_experts(stack=True): {path} already has {attr}")
        parts = [expert.get_parameter(name) for expert in experts]
        stacked = nn.Parameter(
            torch.stack([p.detach() for p in parts]),
            requires_grad=any(p.requires_grad for p in parts),
        )
        mod.register_parameter(attr, stacked)
        owner_path, _, leaf = name.rpartition(".")
        for j, expert in enumerate(experts):
            sub = expert.get_submodule(owner_path)
            del sub._parameters[leaf]
            sub.__class__ = _reading_slices(type(sub), leaf)
            sub.__dict__.setdefault("_stacked_slices", {})[leaf] = (mod, attr, j)


_SLICE_CLASSES: dict[tuple[type, str], type] = {}


def _reading_slices(cls: type, leaf: str) -> type:
    """``cls`` with attribute ``leaf`` read as ``owner.<stacked>[j]`` (a fresh view each time)."""
    if leaf in getattr(cls, "_stacked_leaves", ()):
        return cls
    key = (cls, leaf)
    if key not in _SLICE_CLASSES:

        def read(self, leaf=leaf):
            owner, attr, j = self._stacked_slices[leaf]
            return getattr(owner, attr)[j]

        leaves = (*getattr(cls, "_stacked_leaves", ()), leaf)
        _SLICE_CLASSES[key] = type(
            cls.__name__, (cls,), {leaf: property(read), "_stacked_leaves": leaves}
        )
    return _SLICE_CLASSES[key]
