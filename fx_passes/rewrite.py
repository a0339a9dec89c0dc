"""The rewrite: a matched MoE block -> ``dispatch`` -> this rank's local experts -> ``combine``.

:func:`fuse_moe_routing` is the entry point. For each family module in ``_FAMILY_MODULES`` it asks
``find_patterns(gm, rejects)`` for :class:`~fx_passes._match.MoEMatch` es, checks each one against
its own rewrite on small random inputs at W = 1 (:func:`verify_match`), and only then rewrites
it (:func:`rewrite_match`). The emitted graph, with ``g = group_name, W = world_size``::

    recv_x, tokens_per_expert, *layout = torch.ops.moe_ops.dispatch(x, topk_idx, E, g, W)
    expert_out = <local experts on recv_x>           # grouped_mm, or per-expert segments
    out, _ = torch.ops.moe_ops.combine(expert_out, topk_weights, *layout, g, W)
    routed = base + out                                # when the block accumulated onto a base

With ``capacity=`` (opt-in, see :func:`fuse_moe_routing`) the pair is the sync-free capacity mode
(``t`` the transport, ``moe_ops._api._transport``; ``C`` the capacity, ``W * T * K`` for
``"worst-case"``)::

    recv_x, tokens_per_expert, _, pair_pos, recv_index, num_recv, splits = \
        torch.ops.moe_ops.dispatch_fixed(x, topk_idx, E, C, False, g, W, t)
    expert_out = <local experts on recv_x>           # [C, H']: no host read of the counts
    out, _ = torch.ops.moe_ops.combine_fixed(expert_out, topk_weights, pair_pos, recv_index,
                                             num_recv, splits, C, g, W, t)

Rank ``r`` runs global experts ``r * E_l + j``. New nodes carry ``meta["example_value"]`` (or
``meta["val"]`` in graphs that use it) computed in the graph's fake mode.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import itertools
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch.fx import Node

import moe_ops  # noqa: F401  (registers torch.ops.moe_ops)
from fx_passes._match import (
    ExpertSubgraph,
    ModuleListExperts,
    MoEMatch,
    Rejected,
    ShardInfo,
    StackedExperts,
    ancestors,
    check_removable,
    descendants,
    graph_order,
    is_param_like,
    is_param_slice,
    shard_info,
    val,
)

log = logging.getLogger("fx_passes")

# Each module defines ``find_patterns(gm, rejects) -> list[MoEMatch]``; earlier families win.
_FAMILY_MODULES = (
    "fx_passes.family_ep",
    "fx_passes.family_sorted",
    "fx_passes.family_batched",
    "fx_passes.family_loop",
)


# ----------------------------------------------------------------------------- node creation
def _meta_key(graph: fx.Graph) -> str:
    for n in graph.nodes:
        if n.op == "placeholder":
            return "val" if "val" in n.meta else "example_value"
    return "example_value"


def _fake_mode_of(args: Any):
    """The fake mode of the first fake tensor in ``args`` (the one that made the graph's meta)."""
    from torch._subclasses.fake_tensor import FakeTensor

    modes = []
    fx.node.map_aggregate(
        args, lambda a: modes.append(a.fake_mode) if isinstance(a, FakeTensor) else a
    )
    return modes[0] if modes else None


def _set_val(node: Node) -> None:
    """Compute ``node``'s example value from its inputs' in their fake mode (if they have one)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), val)
    mode = _fake_mode_of((args, kwargs))
    if mode is None:  # e.g. torch.arange: take the mode of the graph's inputs
        mode = _fake_mode_of([val(n) for n in node.graph.nodes if n.op == "placeholder"])
    if mode is None:
        return
    with mode:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    if mode.shape_env is not None:
        from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

        bindings = compute_unbacked_bindings(mode.shape_env, out)
        if bindings:
            node.meta["unbacked_bindings"] = bindings
    node.meta[_meta_key(node.graph)] = out


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` (a method if ``target`` is a str) with its meta value."""
    if isinstance(target, str):
        node = graph.call_method(target, args, kwargs or {})
    else:
        node = graph.call_function(target, args, kwargs or {})
    _set_val(node)
    return node


def grouped_offsets(graph: fx.Graph, tokens_per_expert: Node) -> Node:
    """int32 ``[E_l]`` cumulative row offsets, what ``torch._grouped_mm`` takes as ``offs``."""
    return call(graph, torch.cumsum, (tokens_per_expert, 0), {"dtype": torch.int32})


# ----------------------------------------------------------------------------- the group
def resolve_group(group: dist.ProcessGroup | None) -> tuple[str, int, int]:
    """``(group_name, world_size, rank)``; None means the default group if initialized."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return "", 1, 0
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"fx_passes: group must be a ProcessGroup or None, got {type(group).__name__}"
        )
    if group.size() == 1:
        return "", 1, 0
    return group.group_name, group.size(), group.rank()


# ----------------------------------------------------------------------------- expert bodies
_LINEAR = (torch._C._nn.linear, F.linear)
# Elementwise ops: each output row depends on the same input row only, so they run unchanged on
# rows grouped by expert. Stacked-expert bodies (``_stacked``) add the structural ops they accept.
ROWWISE_FUNCS = {
    torch.where,
    torch.maximum,
    torch.minimum,
    torch.rsqrt,
    torch.pow,
    F.silu,
    F.gelu,
    F.relu,
    F.sigmoid,
    F.tanh,
    F.softplus,
    F.elu,
    F.leaky_relu,
    F.mish,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    torch.exp,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.mul,
    torch.add,
    torch.sub,
    torch.div,
    torch.neg,
    torch.erf,
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    operator.neg,
    operator.pow,
}
ROWWISE_METHODS = {
    "type",
    "rsqrt",
    "to",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "sigmoid",
    "tanh",
    "relu",
    "mul",
    "add",
    "sub",
    "div",
    "clamp",
    "pow",
    "neg",
    "exp",
    "contiguous",
    "square",
}


def _last_dim_split(node: Node) -> bool:
    """``t.chunk(n, dim=-1)`` / ``torch.chunk`` on the last dim, and ``getitem`` of its parts."""
    if node.target in ("chunk", torch.chunk, "split", torch.split):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        ndim = val(node.args[0]).dim()
        return dim in (-1, ndim - 1)
    return False


def _row_reshape(node: Node, body_input: Node) -> bool:
    """``rows.reshape(-1, H)`` / ``view`` giving ``[n, H]`` rows from ``[n, H]`` rows, or from
    the expert's input (``x[None, idx]`` is ``[1, n, H]``; the rewrite feeds ``[R, H]``)."""
    if node.op != "call_method" or node.target not in ("reshape", "view"):
        return False
    a, b = val(node.args[0]), val(node)
    rows_in = a.dim() == 2 or node.args[0] is body_input
    return rows_in and b.dim() == 2 and a.shape[-1] == b.shape[-1]


def _grouped_plan(body: ModuleListExperts, local: Sequence[int]) -> str | None:
    """None when the local experts can run as one grouped computation, else why not."""
    ref = body.experts[local[0]]
    owned = [_expert_params(body.experts[e]) for e in local]
    for e in local[1:]:
        other = body.experts[e]
        if len(other.nodes) != len(ref.nodes):
            return f"expert {e} has {len(other.nodes)} nodes, expert {local[0]} {len(ref.nodes)}"
    for i, n in enumerate(ref.nodes):
        for j, e in enumerate(local):
            m = body.experts[e].nodes[i]
            if (m.op, m.target) != (n.op, n.target):
                return f"expert {e} differs from expert {local[0]} at {m.name}"
            if not _same_shape_args(n, m, ref, body.experts[e], owned[0], owned[j]):
                return f"expert {e}'s {m.name} reads different values than expert {local[0]}'s"
        if n.target in _LINEAR:
            w, b = _linear_args(n)
            if w not in owned[0] or (b is not None and b not in owned[0]):
                return f"{n.name}: linear weights that are not the expert's own parameters"
            if val(w).dim() != 2 or val(n.args[0]).dim() != 2:
                return f"{n.name}: linear on non-2D tensors"
            if val(w).is_cuda and any(int(d) % 8 for d in val(w).shape):
                return f"{n.name}: weight {tuple(val(w).shape)} not a multiple of 8 (TMA alignment)"
            continue
        if any(a in owned[0] for a in n.all_input_nodes):
            return f"{n.name}: an expert parameter used outside a linear layer"
        if n.op == "call_function" and n.target in ROWWISE_FUNCS:
            continue
        if n.op == "call_method" and n.target in ROWWISE_METHODS:
            continue
        if _last_dim_split(n) or _row_reshape(n, ref.input):
            continue
        if (
            n.target is operator.getitem
            and isinstance(n.args[1], int)
            and _last_dim_split(n.args[0])
        ):
            continue
        return f"{n.name}: {getattr(n.target, '__name__', n.target)} is not known to be row-wise"
    return None


def _linear_args(n: Node) -> tuple[Node, Node | None]:
    w = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return w, b


def _expert_params(sub: ExpertSubgraph) -> set[Node]:
    """The expert's own parameters: graph inputs/attributes, or ``P[j]`` slices of a stacked
    parameter (``shard_experts(stack=True)``)."""
    inside = set(sub.nodes) | {sub.input}
    params = set()
    for n in sub.nodes:
        for a in n.all_input_nodes:
            if a not in inside and (is_param_like(a) or is_param_slice(a)):
                params.add(a)
    return params


def _local_stack(graph: fx.Graph, parts: list[Node], env: Callable[[Node], Node]) -> Node:
    """``[E_l, ...]`` from the local experts' parameters: ``P[j0:j0 + E_l]`` (a view) when they
    are consecutive slices of one stacked parameter ``P``, else ``torch.stack`` (a copy)."""
    p = parts[0].args[0] if is_param_slice(parts[0]) else None
    j0 = parts[0].args[1] if p is not None else 0
    consecutive = p is not None and all(
        is_param_slice(q) and q.args[0] is p and q.args[1] == j0 + i for i, q in enumerate(parts)
    )
    if not consecutive:
        return call(graph, torch.stack, ([env(q) for q in parts],))
    if j0 == 0 and val(p).shape[0] == len(parts):
        return env(p)
    return call(graph, operator.getitem, (env(p), slice(j0, j0 + len(parts))))


def _same_shape_args(n: Node, m: Node, sn: ExpertSubgraph, sm: ExpertSubgraph, pn, pm) -> bool:
    pos_n = {x: i for i, x in enumerate([sn.input, *sn.nodes])}
    pos_m = {x: i for i, x in enumerate([sm.input, *sm.nodes])}
    flat_n: list = []
    flat_m: list = []
    fx.node.map_aggregate((n.args, n.kwargs), flat_n.append)
    fx.node.map_aggregate((m.args, m.kwargs), flat_m.append)
    if len(flat_n) != len(flat_m):
        return False
    for a, b in zip(flat_n, flat_m, strict=True):
        if isinstance(a, Node) != isinstance(b, Node):
            return False
        if not isinstance(a, Node):
            if type(a) is not type(b) or (not isinstance(a, (list, tuple, dict)) and a != b):
                return False
            continue
        if a in pos_n or b in pos_m:
            if pos_n.get(a) != pos_m.get(b):
                return False
        elif a in pn or b in pm:
            if not (a in pn and b in pm) or val(a).shape != val(b).shape:
                return False
        elif a is not b:
            return False
    return True


def host_counts(tpe: Node) -> Node:
    """What to read ``tokens_per_expert`` from on the host: the CPU copy that the default
    dispatch's one sync already made (``moe_ops.dispatch`` output 7), while ``_emit_default``
    emits the experts; else ``tpe`` itself (reading it then costs a device -> host sync)."""
    make = tpe.meta.get(_HOST_COUNTS)
    return tpe if make is None else make()


_HOST_COUNTS = "moe_ops_host_counts"


def _emit_segments(
    graph: fx.Graph,
    body: ModuleListExperts,
    local: Sequence[int],
    recv_x: Node,
    tpe: Node,
    env: Callable[[Node], Node],
) -> Node:
    """Each local expert on its segment of ``recv_x`` (sizes read from the host copy)."""
    sizes = call(graph, "tolist", (host_counts(tpe),))
    parts = call(graph, torch.split, (recv_x, sizes))
    outs = []
    for j, e in enumerate(local):
        seg = call(graph, operator.getitem, (parts, j))
        outs.append(_copy_body(graph, body.experts[e], seg, env))
    return outs[0] if len(outs) == 1 else call(graph, torch.cat, (outs,))


def _copy_body(
    graph: fx.Graph, sub: ExpertSubgraph, inp: Node, env: Callable[[Node], Node]
) -> Node:
    local_env: dict[Node, Node] = {sub.input: inp}
    for n in sub.nodes:
        new = graph.node_copy(n, lambda a: local_env[a] if a in local_env else env(a))
        new.meta.pop("unbacked_bindings", None)
        _set_val(new)
        local_env[n] = new
    return local_env[sub.output]


def _emit_grouped(
    graph: fx.Graph,
    body: ModuleListExperts,
    local: Sequence[int],
    recv_x: Node,
    tpe: Node,
    env: Callable[[Node], Node],
    padded: bool = False,
) -> Node:
    """One ``torch._grouped_mm`` per linear layer over the stacked local experts' weights.

    ``padded``: ``recv_x`` is a capacity-mode ``[C, H]`` whose rows past ``tokens_per_expert.sum()``
    are padding. ``torch._grouped_mm`` leaves its output rows past the last offset unwritten
    (uninitialized memory, also in its input gradient); every op here is row-wise and combine never
    reads those rows. Only the bias rows mix rows (their gradient sums over rows), so padding rows
    add no bias and send it no gradient.
    """
    offs = grouped_offsets(graph, tpe)
    row_expert = valid = None
    ref = body.experts[local[0]]
    local_env: dict[Node, Node] = {ref.input: recv_x}
    for i, n in enumerate(ref.nodes):
        if n.target in _LINEAR:
            ws = [_linear_args(body.experts[e].nodes[i])[0] for e in local]
            w_stack = _local_stack(graph, ws, env)
            w_t = call(graph, "transpose", (w_stack, -2, -1))
            out = call(graph, torch._grouped_mm, (local_env[n.args[0]], w_t), {"offs": offs})
            if _linear_args(n)[1] is not None:
                if row_expert is None and padded:
                    row_expert, valid = _padded_row_expert(graph, recv_x, offs, len(local))
                elif row_expert is None:
                    rows = call(graph, "size", (recv_x, 0))
                    ids = call(graph, torch.arange, (len(local),), {"device": val(tpe).device})
                    row_expert = call(
                        graph, torch.repeat_interleave, (ids, tpe), {"output_size": rows}
                    )
                bs = [_linear_args(body.experts[e].nodes[i])[1] for e in local]
                b_stack = _local_stack(graph, bs, env)
                b_rows = call(graph, operator.getitem, (b_stack, row_expert))
                if valid is not None:
                    b_rows = call(graph, torch.where, (valid, b_rows, 0))
                out = call(graph, operator.add, (out, b_rows))
            local_env[n] = out
            continue
        new = graph.node_copy(n, lambda a: local_env[a] if a in local_env else env(a))
        new.meta.pop("unbacked_bindings", None)
        _set_val(new)
        local_env[n] = new
    return local_env[ref.output]


def _padded_row_expert(graph: fx.Graph, recv_x: Node, offs: Node, e_l: int) -> tuple[Node, Node]:
    """Local expert of each of the ``C`` rows (int64 ``[C]``, padding rows clamped to the last
    expert) and ``[C, 1]`` bool, True on real rows; no host read of the counts."""
    rows = call(graph, "size", (recv_x, 0))
    row_C = call(graph, torch.arange, (rows,), {"device": val(recv_x).device, "dtype": torch.int32})
    expert_C = call(graph, torch.searchsorted, (offs, row_C), {"right": True})
    expert_C = call(graph, torch.clamp, (expert_C,), {"max": e_l - 1})
    last = call(graph, operator.getitem, (offs, -1))
    valid_C = call(graph, operator.lt, (row_C, last))
    return expert_C, call(graph, "unsqueeze", (valid_C, 1))


# Ops that read the row counts on the host or assume exactly R rows: a capacity-mode body must
# have none (``split(recv_x, tpe.tolist())`` segments, ``repeat_interleave(..., output_size=R)``).
_SYNC_METHODS = {"tolist", "item", "split", "nonzero", "repeat_interleave"}
_SYNC_FUNCS = {torch.split, torch.functional.split, torch.nonzero, torch.repeat_interleave}


def _capacity_blocker(nodes: Sequence[Node]) -> str | None:
    """Why expert-compute ``nodes`` cannot run on a capacity-mode ``recv_x``, or None."""
    for n in nodes:
        if (n.op == "call_method" and n.target in _SYNC_METHODS) or (
            n.op == "call_function" and n.target in _SYNC_FUNCS
        ):
            name = getattr(n.target, "__name__", n.target)
            return f"the expert compute uses {name} ({n.name}): a host read of the row counts"
    return None


def capacity_rows(graph: fx.Graph, x: Node, idx: Node, capacity: int | str, world_size: int):
    """The capacity ``C`` of a capacity-mode dispatch: ``capacity`` itself when an int, else
    ``W * T * K`` (an int, or a node when ``T`` is symbolic)."""
    if capacity != "worst-case":
        return capacity
    T, K = val(idx).shape
    if isinstance(T, int):
        return world_size * T * K
    return call(graph, operator.mul, (call(graph, "size", (x, 0)), world_size * int(K)))


def check_capacity(capacity: Any, where: str) -> None:
    """Raise unless ``capacity`` is None, ``"worst-case"`` or an int >= 0."""
    if capacity is None or capacity == "worst-case":
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"{where}: capacity must be None, an int or 'worst-case', got {capacity!r}")
    if capacity < 0:
        raise ValueError(f"{where}: capacity must be >= 0 rows, got {capacity}")


def _can_group(body: ModuleListExperts, local: Sequence[int], x_val) -> str | None:
    if x_val.dtype != torch.bfloat16:
        return f"dtype {x_val.dtype} (torch._grouped_mm is used for bfloat16 only)"
    return _grouped_plan(body, local)


def _emit_stacked(
    graph: fx.Graph,
    body: StackedExperts,
    num_experts: int,
    group_name: str,
    rank: int,
    recv_x: Node,
    tpe: Node,
    env: Callable[[Node], Node],
    world_size: int,
) -> Node:
    e_l = num_experts // world_size
    local = []
    for p in body.params:
        rows = val(p).shape[0]
        q = env(p)
        shard = q.meta.get("moe_shard")  # absent in the check's copy: it feeds whole weights
        if shard is not None:
            q = _local_rows(graph, p, shard, e_l, group_name)
        elif rows == num_experts and e_l != num_experts:
            q = call(graph, operator.getitem, (q, slice(rank * e_l, (rank + 1) * e_l)))
        elif rows != e_l:
            raise ValueError(
                f"fx_passes: stacked expert parameter {p.name} must have {num_experts} or {e_l} "
                f"rows (E or E/W), got {rows}"
            )
        local.append(q)
    return body.emit(graph, recv_x, tpe, local)


def _local_rows(graph: fx.Graph, p: Node, shard: ShardInfo, e_l: int, group_name: str) -> Node:
    """``shard.param.to_local()``: the ``[E_l, ...]`` rows of a parameter that
    ``shard_experts`` turned into a DTensor; ``p`` is its stand-in's placeholder."""
    gm = graph.owning_module
    local = shard.local_experts
    if shard.param is None or gm is None or len(local) != e_l or shard.group_name != group_name:
        raise ValueError(
            f"fx_passes: {shard.name} was sharded by shard_experts over group "
            f"{shard.group_name!r} (experts {local.start}..{local.stop - 1} here), but the "
            f"rewrite runs over group {group_name!r} with {e_l} local experts; pass the same "
            f"group to shard_experts and to the backend"
        )
    attr = next(f"moe_local_{i}" for i in itertools.count() if not hasattr(gm, f"moe_local_{i}"))
    gm.register_parameter(attr, shard.param)
    if hasattr(gm, "_param_name_to_source"):  # a Dynamo graph: AOT autograd looks it up here
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source[attr] = ConstantSource(f"moe_local_rows({shard.name})")
    getter = graph.get_attr(attr)
    rows = graph.call_method("to_local", (getter,))
    fake = val(p)
    rows.meta[_meta_key(graph)] = fake.new_empty((e_l, *fake.shape[1:]))
    return rows


# ----------------------------------------------------------------------------- emission
def emit_routed(
    graph: fx.Graph,
    match: MoEMatch,
    env: Callable[[Node], Node],
    group_name: str,
    world_size: int,
    rank: int,
    info: dict | None = None,
    capacity: int | str | None = None,
) -> Node:
    """Insert dispatch -> local experts -> combine for ``match`` at the insertion point.

    ``env`` maps the original graph's nodes to ``graph``'s (the identity for an in-place
    rewrite). ``capacity`` (None, an int, or ``"worst-case"``) picks the sync-free capacity-mode
    ops; when the experts cannot run on its padded rows without a host read (no grouped form), the
    block keeps the default ops and ``info["capacity_fallback"]`` says why. Returns the node
    holding the routed output, in ``match.output``'s dtype.
    """
    info = {} if info is None else info
    x, idx = env(match.x), env(match.topk_idx)
    w = env(match.topk_weights) if match.topk_weights is not None else None
    if val(idx).dim() == 1:
        idx = call(graph, "unsqueeze", (idx, 1))
        if w is not None and val(w).dim() == 1:
            w = call(graph, "unsqueeze", (w, 1))
    e_l = match.num_experts // world_size
    local = list(range(rank * e_l, (rank + 1) * e_l))
    if capacity is not None:
        why = None
        if not isinstance(match.body, StackedExperts):
            why = _can_group(match.body, local, val(x))
        if why is None:
            before, saved = set(graph.nodes), dict(info)
            out = _emit_capacity(
                graph, match, env, x, idx, w, group_name, world_size, rank, info, capacity
            )
            if isinstance(out, Node):
                return out
            why = out
            for n in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(n)
            info.clear()
            info.update(saved)
        info["capacity_fallback"] = why
    out = _emit_default(graph, match, env, x, idx, w, group_name, world_size, rank, info)
    return out


def _emit_default(graph, match, env, x, idx, w, group_name, world_size, rank, info) -> Node:
    E = match.num_experts
    d = call(graph, torch.ops.moe_ops.dispatch.default, (x, idx, E, group_name, world_size))
    recv_x, tpe, send_pair_idx, pair_pos, recv_perm, send_splits, recv_splits = (
        call(graph, operator.getitem, (d, i)) for i in range(7)
    )
    tpe.meta[_HOST_COUNTS] = functools.cache(lambda: call(graph, operator.getitem, (d, 7)))
    e_l = E // world_size
    local = list(range(rank * e_l, (rank + 1) * e_l))
    if isinstance(match.body, StackedExperts):
        expert_out = _emit_stacked(
            graph, match.body, E, group_name, rank, recv_x, tpe, env, world_size
        )
        info["experts"] = "stacked"
    else:
        why_not = _can_group(match.body, local, val(x))
        if why_not is None:
            expert_out = _emit_grouped(graph, match.body, local, recv_x, tpe, env)
            info["experts"] = "grouped_mm"
        else:
            expert_out = _emit_segments(graph, match.body, local, recv_x, tpe, env)
            info["experts"] = "segments"
            info["why_not_grouped"] = why_not
    c = call(
        graph,
        torch.ops.moe_ops.combine.default,
        (
            expert_out,
            w,
            pair_pos,
            send_pair_idx,
            recv_perm,
            send_splits,
            recv_splits,
            group_name,
            world_size,
        ),
    )
    del tpe.meta[_HOST_COUNTS]  # only for this emission (nodes in meta would outlive it)
    return _finish(graph, match, env, call(graph, operator.getitem, (c, 0)))


def _finish(graph: fx.Graph, match: MoEMatch, env: Callable[[Node], Node], out: Node) -> Node:
    want = val(match.output).dtype
    if val(out).dtype != want:
        out = call(graph, "to", (out, want))
    if match.base is not None:
        out = call(graph, operator.add, (env(match.base), out))
    return out


def _emit_capacity(
    graph, match, env, x, idx, w, group_name, world_size, rank, info, capacity
) -> Node | str:
    """dispatch_fixed -> grouped local experts on ``[C, H]`` -> combine_fixed, or why not (the
    caller erases what was emitted)."""
    from moe_ops._api import _transport

    E = match.num_experts
    C = capacity_rows(graph, x, idx, capacity, world_size)
    transport = _transport(val(x), world_size)
    d = call(
        graph,
        torch.ops.moe_ops.dispatch_fixed.default,
        (x, idx, E, C, False, group_name, world_size, transport),
    )
    recv_x, tpe, _, pair_pos, recv_index, num_recv, splits = (
        call(graph, operator.getitem, (d, i)) for i in range(7)
    )
    before = set(graph.nodes)
    if isinstance(match.body, StackedExperts):
        expert_out = _emit_stacked(
            graph, match.body, E, group_name, rank, recv_x, tpe, env, world_size
        )
        why = _capacity_blocker([n for n in graph.nodes if n not in before])
        if why is not None:
            return why
        info["experts"] = "stacked"
    else:
        e_l = E // world_size
        local = list(range(rank * e_l, (rank + 1) * e_l))
        expert_out = _emit_grouped(graph, match.body, local, recv_x, tpe, env, padded=True)
        info["experts"] = "grouped_mm"
    info["dispatch"] = f"capacity={capacity}"
    c = call(
        graph,
        torch.ops.moe_ops.combine_fixed.default,
        (
            expert_out,
            w,
            pair_pos,
            recv_index,
            num_recv,
            splits,
            C,
            group_name,
            world_size,
            transport,
        ),
    )
    return _finish(graph, match, env, call(graph, operator.getitem, (c, 0)))


def rewrite_match(
    gm: fx.GraphModule,
    match: MoEMatch,
    group: dist.ProcessGroup | None,
    capacity: int | str | None = None,
) -> None:
    """Replace ``match`` in ``gm`` (in place) by dispatch -> local experts -> combine
    (capacity-mode ops when ``capacity`` is not None, see :func:`emit_routed`)."""
    why = check_removable(match)
    if why is not None:
        raise ValueError(f"fx_passes: cannot rewrite {match.module_path or 'block'}: {why}")
    group_name, world_size, rank = resolve_group(group)
    if match.num_experts % world_size:
        raise ValueError(
            f"fx_passes: {match.module_path or 'block'} has {match.num_experts} experts, not a "
            f"multiple of the group size {world_size}"
        )
    graph = gm.graph
    order = graph_order(graph)
    tail = max([*match.remove, *([match.last_write] if match.last_write else [])], key=order.get)
    removed = set(match.remove)
    with graph.inserting_before(tail.next):
        first_new = tail.next
        out = emit_routed(
            graph, match, lambda n: n, group_name, world_size, rank, match.rewritten, capacity
        )
    if "capacity_fallback" in match.rewritten:
        log.warning(
            "fx_passes: MoE block %s keeps the default (synced) dispatch, not capacity=%r: %s",
            match.module_path or "<top>",
            capacity,
            match.rewritten["capacity_fallback"],
        )
    new_nodes = set()
    n = tail.next
    while n is not first_new:
        new_nodes.add(n)
        n = n.next
    last = order[match.last_write] if match.last_write is not None else -1
    for u in list(match.output.users):
        if u in new_nodes or u in removed:
            continue
        if u in order and order[u] <= last:
            continue
        u.replace_input_with(match.output, out)
    # the experts' slices P[j] of stacked parameters go too once nothing reads them
    slices = {a for n in removed for a in n.all_input_nodes if is_param_slice(a)} - removed
    for n in sorted(removed, key=order.get, reverse=True):
        if n.users:
            raise AssertionError(f"fx_passes: {n.name} still has users {list(n.users)}")
        graph.erase_node(n)
    for n in slices:
        if not n.users:
            graph.erase_node(n)
    match.rewritten.update(world_size=world_size, rank=rank)
    graph.lint()
    gm.recompile()


# ----------------------------------------------------------------------------- verification
def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-2, 3e-2
    if dtype == torch.float32:
        return 1e-4, 1e-4
    return 1e-9, 1e-9


def _region_nodes(match: MoEMatch) -> list[Node]:
    """What the check runs of the original block: the removed nodes, plus the routing values
    they read that stay in the graph for other users (a one-hot mask that also feeds an
    auxiliary loss, say), so that those follow the random ``topk_idx`` too."""
    removed = set(match.remove)
    boundary = ancestors([a for a in (match.x, match.topk_weights, match.base) if a is not None])
    routed = descendants(match.topk_idx)
    keep = ancestors(match.remove, within=(routed | removed) - boundary)
    region = removed | keep
    # experts' slices P[j] of a stacked parameter run with the block: the check feeds P
    region |= {a for n in region for a in n.all_input_nodes if is_param_slice(a)}
    return [n for n in match.output.graph.nodes if n in region]


def _region_inputs(match: MoEMatch, region: list[Node]) -> list[Node]:
    inside = set(region)
    ext: list[Node] = []

    def add(a: Node) -> None:
        if a not in inside and a not in ext:
            ext.append(a)

    for n in region:
        for a in n.all_input_nodes:
            add(a)
    for a in (match.x, match.topk_idx, match.topk_weights, match.base, match.output):
        if a is not None:
            add(a)
    if isinstance(match.body, StackedExperts):
        for p in match.body.params:
            add(p)
    return ext


def _random_inputs(
    match: MoEMatch, ext: list[Node], tokens: int, real: dict[Node, Any]
) -> list[Any] | str:
    T = val(match.x).shape[0]
    E = match.num_experts
    out: list[Any] = []
    for a in ext:
        v = val(a)
        if a in real and not isinstance(real[a], torch.SymInt):
            out.append(real[a])
            continue
        if isinstance(v, torch.SymInt):
            out.append(tokens if v == T else int(v.node.hint if v.node.hint is not None else v))
            continue
        if not isinstance(v, torch.Tensor):
            return f"cannot verify: {a.name} has no example value"
        dev = v.device
        if a is match.x or a is match.output or a is match.base:
            shape = (tokens, *[int(s) for s in v.shape[1:]])
            out.append(torch.randn(shape, dtype=v.dtype, device=dev))
        elif a is match.topk_idx:
            K = 1 if v.dim() == 1 else int(v.shape[1])
            ids = torch.rand(tokens, E, device=dev).argsort(-1)[:, :K].to(v.dtype)
            out.append(ids.reshape(tokens) if v.dim() == 1 else ids)
        elif a is match.topk_weights:
            shape = (tokens, *[int(s) for s in v.shape[1:]])
            out.append(torch.rand(shape, device=dev).to(v.dtype) + 0.1)
        else:
            if v.dim() and (v.shape[0] == T or isinstance(v.shape[0], torch.SymInt)):
                return f"cannot verify: the block reads {a.name}, a per-token value"
            if any(isinstance(s, torch.SymInt) for s in v.shape):
                return f"cannot verify: {a.name} has a symbolic shape"
            if v.dtype.is_floating_point:
                out.append(torch.randn(tuple(v.shape), dtype=v.dtype, device=dev) * 0.5)
            else:
                out.append(torch.zeros(tuple(v.shape), dtype=v.dtype, device=dev))
    return out


def _region_modules(
    gm: fx.GraphModule,
    match: MoEMatch,
    region: list[Node],
    ext: list[Node],
    capacity: int | str | None = None,
):
    g_old, g_new = fx.Graph(), fx.Graph()
    env_old = {a: g_old.placeholder(f"in{i}") for i, a in enumerate(ext)}
    env_new = {a: g_new.placeholder(f"in{i}") for i, a in enumerate(ext)}
    for a in ext:  # the check feeds whole random weights, sharded experts' too
        env_new[a].meta.update({k: v for k, v in a.meta.items() if k != "moe_shard"})
    for n in region:
        env_old[n] = g_old.node_copy(n, lambda a: env_old[a])
        if is_param_slice(n):
            env_new[n] = g_new.node_copy(n, lambda a: env_new[a])
    g_old.output(env_old[match.output])
    out = emit_routed(g_new, match, lambda a: env_new[a], "", 1, 0, None, capacity)
    g_new.output(out)
    return fx.GraphModule(gm, g_old), fx.GraphModule(gm, g_new)


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def verify_match(
    gm: fx.GraphModule,
    match: MoEMatch,
    example_inputs: Sequence[Any] | None = None,
    capacity: int | str | None = None,
) -> str | None:
    """Run the matched region and its W = 1 rewrite on small random inputs.

    With ``capacity`` not None the rewrite checked is the capacity-mode one, with ``"worst-case"``
    capacity (an int capacity could overflow on the random routing). Parameters keep their real
    values when ``example_inputs`` holds real tensors for the graph's placeholders. Returns None
    when both agree, else why not (the graph is left untouched). Floating-point parameters and
    buffers always get random values: the check never reads the values of experts.
    """
    region = _region_nodes(match)
    ext = _region_inputs(match, region)
    real: dict[Node, Any] = {}
    if example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensor

        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for p, v in zip(phs, example_inputs, strict=False):
            routing = p is match.x or p is match.topk_idx or p is match.topk_weights
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) and p in ext:
                real.update({} if routing else {p: v})
    for a in ext:
        if a.op == "get_attr":
            with contextlib.suppress(AttributeError):
                real[a] = fx.graph_module._get_attr(gm, a.target)
    # Floating-point weights get values of the check's own: a rank's copy of experts it does not
    # own may be absent (a stand-in), NaN or garbage, and the rewrite must agree for any weights.
    real = {a: v for a, v in real.items() if not _is_float_tensor(v)}
    try:
        check_cap = None if capacity is None else "worst-case"
        old_mod, new_mod = _region_modules(gm, match, region, ext, check_cap)
    except Exception as e:  # noqa: BLE001 - any failure to build means "not sure"
        return f"could not build the rewrite: {type(e).__name__}: {e}"
    T = val(match.x).shape[0]
    T_hint = int(T.node.hint) if isinstance(T, torch.SymInt) and T.node.hint is not None else T
    sizes = [5] + ([int(T_hint)] if isinstance(T_hint, int) and T_hint != 5 else [])
    last_err = "no token count to try"
    for tokens in sizes:
        inputs = _random_inputs(match, ext, tokens, real)
        if isinstance(inputs, str):
            return inputs
        # GraphModule prints a failing call's traceback to stderr; a failure here is an answer.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            try:
                ref = old_mod(*[i.clone() if isinstance(i, torch.Tensor) else i for i in inputs])
            except Exception as e:  # noqa: BLE001 - the original may hard-code T
                last_err = f"the original block fails on {tokens} random tokens: {e}"
                continue
            try:
                got = new_mod(*inputs)
            except Exception as e:  # noqa: BLE001
                return f"the rewrite fails on {tokens} random tokens: {type(e).__name__}: {e}"
        if got.shape != ref.shape and tokens != sizes[-1]:
            continue  # the block hard-codes T (static shapes): try the real token count
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return (
                f"the rewrite gives {tuple(got.shape)} {got.dtype}, the block "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
        rtol, atol = _tolerance(ref.dtype)
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        if not err <= atol * max(scale, 1.0) + rtol * scale:
            return f"the rewrite differs from the block on random inputs (max abs diff {err:.3g})"
        return None
    return last_err


# ----------------------------------------------------------------------------- entry point
def _family_modules() -> list[Any]:
    mods = []
    for name in _FAMILY_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return mods


def _subgraphs(gm: fx.GraphModule, example_inputs: Sequence[Any] | None):
    """Graphs of higher-order ops (``torch.utils.checkpoint`` regions, ``wrap``) called from
    ``gm``, each with the real values of its inputs where ``gm``'s inputs give them."""
    real = {}
    if example_inputs is not None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        real = dict(zip(phs, example_inputs, strict=False))
    seen = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], Node):
            continue
        attr = n.args[0]
        if attr.op != "get_attr" or attr.target in seen:
            continue
        sub = getattr(gm, attr.target, None)
        if isinstance(sub, fx.GraphModule):
            seen.add(attr.target)
            yield sub, [real.get(a) for a in n.args[1:]]


def fuse_moe_routing(
    gm: fx.GraphModule,
    *,
    group: dist.ProcessGroup | None = None,
    example_inputs: Sequence[Any] | None = None,
    verify: bool = True,
    capacity: int | str | None = None,
) -> list[MoEMatch]:
    """Rewrite every MoE block of ``gm`` (a Dynamo-level graph) into dispatch/combine, in place.

    Args:
        gm: the graph, as a torch.compile backend receives it (or any graph of torch-level calls).
        group: a ``ProcessGroup`` for expert parallelism; None means the default group when
            ``torch.distributed`` is initialized, else a single rank.
        example_inputs: the graph's inputs; real tensors let the W = 1 check use real weights.
        verify: check each match against its rewrite on random inputs (random weights too)
            before committing it.
        capacity: opt-in sync-free dispatch. None (default): ``moe_ops.dispatch``/``combine``,
            whose one device -> host sync reads the row counts. ``"worst-case"`` or an int ``C``:
            ``moe_ops.dispatch_fixed``/``combine_fixed`` (the ``capacity=`` mode of
            :func:`moe_ops.dispatch`, ``overflow="error"``): ``recv_x`` is ``[C, H]`` with zero
            padding rows past ``tokens_per_expert.sum()``, and no host read at all.
            ``"worst-case"`` is ``W * T * K`` rows: nothing can overflow, results are the default
            mode's. An int ``C`` fixes the rows (a static shape); more pairs than ``C`` for this
            rank raise (CPU) or fire a device-side assertion (CUDA). The local experts must run as
            ``torch._grouped_mm`` (bfloat16 ModuleList experts of linear layers and row-wise ops,
            or stacked experts with no ``tolist``/``split`` by counts); otherwise the block keeps
            the default ops, logged at warning level and kept in
            ``match.rewritten["capacity_fallback"]``.

    Returns the rewritten blocks (family, number of experts, module path); why other candidates
    were left alone is logged at debug level and kept in ``gm.meta["moe_rejected"]``.
    """
    check_capacity(capacity, "fx_passes.fuse_moe_routing")
    sharded = _mark_sharded(gm, example_inputs)
    rejects: list[Rejected] = []
    done: list[MoEMatch] = []
    for mod in _family_modules():
        try:
            found = mod.find_patterns(gm, rejects)
        except Exception as e:  # noqa: BLE001 - a matcher's failure must not break the compile
            family = mod.__name__.rsplit(".", 1)[-1].removeprefix("family_")
            log.warning("fx_passes: the %s matcher failed; its blocks stay as they are", family)
            rejects.append(Rejected(family, "", f"the matcher failed: {type(e).__name__}: {e}"))
            continue
        for match in found:
            where = match.module_path or "<top>"
            why = check_removable(match)
            if why is None and verify and match.verify_at_w1:
                why = verify_match(gm, match, example_inputs, capacity)
            if why is not None:
                rejects.append(Rejected(match.family, match.module_path, why))
                continue
            if capacity is None:
                match.replace_with(gm, group)
            else:
                match.replace_with(gm, group, capacity=capacity)
            log.info(
                "fx_passes: rewrote MoE block %s (family %s, %d experts, %s)",
                where,
                match.family,
                match.num_experts,
                match.rewritten.get("experts"),
            )
            done.append(match)
    for r in rejects:
        log.debug(
            "fx_passes: left %s (family %s) alone: %s", r.module_path or "<top>", r.family, r.reason
        )
    for sub, sub_inputs in _subgraphs(gm, example_inputs):
        done += fuse_moe_routing(
            sub, group=group, example_inputs=sub_inputs, verify=verify, capacity=capacity
        )
        rejects += sub.meta.get("moe_rejected", [])
    gm.meta["moe_rejected"] = rejects
    _check_no_stand_in_read(sharded, rejects)
    return done


def _mark_sharded(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> list[Node]:
    """Set ``meta["moe_shard"]`` on the placeholders that hold stand-ins of sharded experts."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reals = list(example_inputs) if example_inputs is not None else []
    out = []
    for i, p in enumerate(phs):
        grapharg = p.meta.get("grapharg")
        v = reals[i] if i < len(reals) else getattr(grapharg, "example", None)
        info = shard_info(v)
        if info is not None:
            p.meta["moe_shard"] = info
            out.append(p)
    return out


def _check_no_stand_in_read(sharded: list[Node], rejects: list[Rejected]) -> None:
    """A sharded expert's stand-in read by code the pass left alone would compute on zeros."""
    for p in sharded:
        if p.users:
            info = p.meta["moe_shard"]
            why = "; ".join(f"{r.module_path or '<top>'}: {r.reason}" for r in rejects)
            raise ValueError(
                f"fx_passes: {info.name} is sharded by shard_experts (experts "
                f"{info.local_experts.start}..{info.local_experts.stop - 1} of "
                f"{info.num_experts} on this rank), but the graph still reads it after the "
                f"pass: the MoE block that uses it was not rewritten"
                + (f" ({why})" if why else "")
                + ". Without the rewrite this rank has no values for other ranks' experts."
            )
