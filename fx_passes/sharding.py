"""Keep only this rank's experts in memory: :func:`shard_experts`.

Rank ``r`` of ``W`` owns experts ``[r * E / W, (r + 1) * E / W)``. Two expert layouts are sharded:

* Stacked ``[E, ...]`` parameters (transformers 5 ``*Experts`` modules with their biases,
  GraniteMoE / JetMoE ``input_linear`` / ``output_linear``): each becomes a DTensor parameter with
  ``Shard(0)`` on a 1-D ``DeviceMesh`` of the group, holding only this rank's ``[E / W, ...]``
  rows, under the same name. ``state_dict()`` keeps the unsharded model's keys, the optimizer's
  state is sharded the same way, and ``torch.distributed.checkpoint`` saves it and loads it at
  any other W (W = 1 included, into a plain model).
* An ``nn.ModuleList`` of expert modules: the parameters of experts this rank does not own are
  dropped; the local experts keep theirs, unchanged. Here a whole tensor is the unit of
  ownership, so no DTensor is needed: every rank's ``state_dict()`` holds its own experts' keys,
  and the ranks together hold every key of the unsharded model, which is what
  ``torch.distributed.checkpoint`` saves and reloads at any other W. (A DTensor would have to
  shard one expert's matrix across ranks, which is not how the experts are owned.)

The module code is not changed: reading a sharded attribute (``experts.gate_up_proj``,
``experts[5].w1.weight``) gives, while ``torch.compile`` traces the model, a stand-in of the
unsharded shape and dtype that holds one element of memory (a zero-stride tensor). The stand-in
carries :class:`ShardInfo`, so the pass (``fx_passes.fuse_moe_routing``) knows which block reads
it: the rewritten block reads the local rows (``DTensor.to_local()``) instead, and a graph that
still reads a stand-in after the pass is an error, never a silent result computed on zeros.
Outside ``torch.compile`` a sharded stacked attribute reads as its DTensor parameter (so
``torch.distributed.checkpoint.state_dict`` helpers work), which a plain forward rejects (it mixes
DTensor and Tensor), and an expert another rank owns raises: the model runs expert-parallel only
through the ``"moe"`` backend.

With ``stack=True`` (ModuleList experts) the local experts' parameters also move into one
``[E_l, ...]`` parameter per name, registered on the ModuleList (``experts.stacked_gate_weight``),
and each local expert reads its slice ``stacked[j]``, so the rewrite's ``torch._grouped_mm`` reads
the stacked parameter instead of stacking the experts' weights at every forward. The state dict's
keys then change (a checkpoint can only be reloaded by a model sharded the same way); create the
optimizer after this call.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from fx_passes.group import resolve_group
from fx_passes.match import ShardInfo, shard_info


@dataclasses.dataclass(frozen=True)
class ShardedExperts:
    """One expert holder after :func:`shard_experts`.

    ``layout`` is ``"module_list"`` or ``"stacked"``; ``params`` names the sharded parameters
    (relative to ``path``).
    """

    path: str
    num_experts: int
    local_experts: range
    layout: str
    params: tuple[str, ...]


def _stand_in(shape: torch.Size, like: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """A zero-stride tensor of ``shape`` with ``like``'s dtype and device: one element of memory."""
    stub = torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)
    stub._moe_shard = info
    return stub


def _stacked_stand_in(shape: torch.Size, info: ShardInfo) -> torch.Tensor:
    """``shape`` ``[E, ...]`` over the local rows' memory, expert stride 0: every expert reads local
    expert 0. Only the first dim has stride 0, so kernels that check the strides of their last two
    dims (``torch._grouped_mm``) trace on it; it costs no memory of its own."""
    rows = info.param.to_local()
    stub = rows.detach().as_strided(shape, (0, *rows.stride()[1:]), rows.storage_offset())
    stub._moe_shard = info
    return stub


class _ShardedAttrs:
    """Mixin of the classes :func:`_reader_class` makes: sharded attributes read through here."""

    def _moe_read(self, leaf: str) -> torch.Tensor:
        kind, *rest = self.__dict__["_moe_attrs"][leaf]
        if kind == "slice":
            owner, attr, j = rest
            return getattr(owner, attr)[j]
        if not torch.compiler.is_compiling():
            if leaf in self._parameters:  # stacked: the DTensor parameter itself (state dict
                return self._parameters[leaf]  # helpers read it so; a forward rejects DTensor)
            info = rest[0]._moe_shard
            raise RuntimeError(
                f"{info.name} is sharded over the expert-parallel group by "
                f"fx_passes.shard_experts (this rank holds experts {info.local_experts.start}.."
                f"{info.local_experts.stop - 1} of {info.num_experts}); run the model through "
                f'torch.compile(model, backend="moe"), which reads only the local experts'
            )
        return rest[0]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        attrs = self.__dict__["_moe_attrs"]
        for leaf, (kind, *rest) in list(attrs.items()):
            if kind != "stub":
                continue
            old = rest[0]
            info = old._moe_shard
            if leaf in self._parameters:  # stacked: the DTensor moved, view its new rows
                _mesh_on_local_device(self._parameters[leaf])
                info = dataclasses.replace(info, param=self._parameters[leaf])
                attrs[leaf] = ("stub", _stacked_stand_in(old.shape, info))
            else:
                like = fn(torch.zeros((), dtype=old.dtype, device=old.device))
                attrs[leaf] = ("stub", _stand_in(old.shape, like, info))
        return out


def _mesh_on_local_device(param: nn.Parameter) -> None:
    """After ``Module.to`` / ``to_empty`` a DTensor parameter holds its rows on the new device, but
    its mesh keeps the old device type (``"meta"`` for a model sharded on the meta device, ``"cpu"``
    for one sharded on the CPU and then moved to a GPU): put it, in place, on a mesh of its rows'
    device type."""
    from torch.distributed.tensor import DTensor

    rows = param.to_local()
    if param.device_mesh.device_type == rows.device.type:
        return
    mesh = _mesh(param.device_mesh.get_group(), rows.device.type)
    moved = DTensor.from_local(
        rows.detach(), mesh, param.placements, run_check=False, shape=param.shape,
        stride=param.stride(),
    )  # fmt: skip
    torch.utils.swap_tensors(param, nn.Parameter(moved, requires_grad=param.requires_grad))


_READER_CLASSES: dict[tuple[type, str], type] = {}


def _reader_class(cls: type, leaf: str) -> type:
    """``cls`` with attribute ``leaf`` read through ``_ShardedAttrs._moe_read``."""
    if leaf in getattr(cls, "_moe_leaves", ()):
        return cls
    key = (cls, leaf)
    if key not in _READER_CLASSES:
        bases = (cls,) if issubclass(cls, _ShardedAttrs) else (_ShardedAttrs, cls)
        leaves = (*getattr(cls, "_moe_leaves", ()), leaf)
        prop = property(lambda self, leaf=leaf: self._moe_read(leaf))
        _READER_CLASSES[key] = type(cls.__name__, bases, {leaf: prop, "_moe_leaves": leaves})
    return _READER_CLASSES[key]


def _read_through(sub: nn.Module, leaf: str, entry: tuple) -> None:
    sub.__class__ = _reader_class(type(sub), leaf)
    sub.__dict__.setdefault("_moe_attrs", {})[leaf] = entry


# ----------------------------------------------------------------------------- finding experts
def _expert_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and name.rsplit(".", 1)[-1].endswith("experts")
        and len(mod) > 0
    ]


def _stacked_params(mod: nn.Module) -> tuple[int, list[str]] | str:
    """``(E, names)`` of ``mod``'s own ``[E, ...]`` parameters, or why it holds none."""
    E = getattr(mod, "num_experts", None)
    if not isinstance(E, int) or isinstance(E, bool) or E <= 0:
        return "no int num_experts attribute"
    names = [
        n
        for n, p in mod.named_parameters(recurse=False)
        if p.dim() >= 2 and p.shape[0] == E and shard_info(p) is None
    ]
    if not names:
        return f"num_experts={E}, but no parameter of shape [{E}, ...]"
    return E, names


def _looks_like_experts(path: str, mod: nn.Module) -> bool:
    leaf = path.rsplit(".", 1)[-1].lower()
    cls = type(mod).__name__.lower()
    if "router" in leaf or "router" in cls or leaf == "gate":
        return False
    return "expert" in leaf or "expert" in cls


def _find(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Expert holders of ``model`` (ModuleLists and stacked modules) and what else was seen."""
    found = _expert_lists(model)
    seen = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) or any(path.startswith(p + ".") for p, _ in found):
            continue
        got = _stacked_params(mod)
        if isinstance(got, tuple) and _looks_like_experts(path, mod):
            found.append((path, mod))
        elif isinstance(got, tuple):
            seen.append(f"{path} ({type(mod).__name__}: stacked [E, ...] but named like a router)")
        elif hasattr(mod, "num_experts") and path:
            seen.append(f"{path} ({type(mod).__name__}: {got})")
    return found, seen


# ----------------------------------------------------------------------------- sharding
def _mesh(group: dist.ProcessGroup | None, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group or dist.group.WORLD, device_type)


def _shard_list(path, mod, local, group_name) -> tuple[str, ...]:
    names = []
    for e, expert in enumerate(mod):
        if e in local:
            continue
        for sub_path, sub in expert.named_modules():
            for leaf, p in list(sub.named_parameters(recurse=False)):
                name = ".".join(filter(None, (path, str(e), sub_path, leaf)))
                info = ShardInfo(name, len(mod), local, group_name, None)
                del sub._parameters[leaf]
                _read_through(sub, leaf, ("stub", _stand_in(p.shape, p, info)))
                names.append(name[len(path) + 1 :])
    return tuple(names)


def _shard_stacked(path, mod, names, local, group, group_name) -> None:
    from torch.distributed.tensor import DTensor, Shard

    for leaf in names:
        p = mod._parameters[leaf]
        mesh = _mesh(group, p.device.type)
        rows = p.detach()[local.start : local.stop].clone()
        shard = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)
        param = nn.Parameter(shard, requires_grad=p.requires_grad)
        info = ShardInfo(f"{path}.{leaf}" if path else leaf, p.shape[0], local, group_name, param)
        mod._parameters[leaf] = param
        _read_through(mod, leaf, ("stub", _stacked_stand_in(p.shape, info)))


def _holder(model: nn.Module, path: str) -> tuple:
    """``experts=[path]``: a module, or a stacked ``[E, ...]`` parameter (its owner and name)."""
    owner_path, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    if leaf in owner._parameters:
        p = owner._parameters[leaf]
        if p is None or p.dim() < 1:
            raise ValueError(f"shard_experts: {path} is not a stacked [E, ...] parameter")
        return owner_path, owner, (p.shape[0], [leaf])
    return path, model.get_submodule(path)


def shard_experts(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    experts: list[str] | None = None,
    stack: bool = False,
) -> list[ShardedExperts]:
    """Keep only this rank's experts in memory, in place (expert memory / W).

    Args:
        model: the single-device model (the same on every rank), on its device.
        group: the expert-parallel group; None means the default group when
            ``torch.distributed`` is initialized, else a single rank (then only ``stack``
            changes anything).
        experts: dotted paths of the expert holders: ``nn.ModuleList`` s of experts, modules
            with stacked ``[E, ...]`` parameters and an int ``num_experts``, or stacked
            parameters themselves (``"moe.w_in"``: E is their first dim); default: every
            ModuleList whose name ends in ``experts`` and every module named like experts
            (``*experts*`` in its name or class name, not a router) that has an int
            ``num_experts`` and parameters of shape ``[num_experts, ...]``.
        stack: ModuleList experts only: also store the local experts' parameters as one
            ``[E_l, ...]`` parameter per name (see the module docstring).

    Returns one :class:`ShardedExperts` per expert holder. Raises ``ValueError`` when it finds
    nothing to shard, or when an expert count is not a multiple of the group size (on every
    rank alike: the model is the same everywhere). Compile the model with the ``"moe"`` backend
    on the same group afterwards; the local experts' gradients are the sums over all ranks'
    tokens, as in the unsharded model run on every rank's tokens.
    """
    group_name, world_size, rank = resolve_group(group)
    if experts is None:
        holders, seen = _find(model)
        if not holders:
            raise ValueError(
                f"shard_experts: found no experts to shard in {type(model).__name__}: looked for "
                f"nn.ModuleList modules whose name ends in 'experts' and for expert modules with "
                f"an int num_experts and stacked [num_experts, ...] parameters; found "
                + ("; ".join(seen) if seen else "no module with num_experts either")
                + ". Pass experts=[...] with their paths."
            )
    else:
        holders = [_holder(model, path) for path in experts]
    out = []
    for path, mod, *named in holders:
        if isinstance(mod, nn.ModuleList):
            E, names = len(mod), None
        elif named:
            E, names = named[0]
        else:
            got = _stacked_params(mod)
            if isinstance(got, str):
                raise ValueError(
                    f"shard_experts: {path} ({type(mod).__name__}) is neither an nn.ModuleList of "
                    f"experts nor a module with stacked expert parameters: {got}"
                )
            E, names = got
        if E % world_size:
            raise ValueError(
                f"shard_experts: {path} has {E} experts, not a multiple of the group size "
                f"{world_size}"
            )
        e_l = E // world_size
        local = range(rank * e_l, (rank + 1) * e_l)
        if names is not None:
            if world_size > 1:
                _shard_stacked(path, mod, names, local, group, group_name)
            out.append(ShardedExperts(path, E, local, "stacked", tuple(names)))
            continue
        dropped = _shard_list(path, mod, local, group_name) if world_size > 1 else ()
        if stack:
            _stack_local(path, mod, local)
        out.append(ShardedExperts(path, E, local, "module_list", dropped))
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
            _read_through(sub, leaf, ("slice", mod, attr, j))
