"""The local experts on rows grouped by expert: grouped-mm planning and emission.

A ModuleList block (:class:`~fx_passes.match.ModuleListExperts`) runs as one
``torch._grouped_mm`` per linear layer over the stacked local experts' weights when every local
expert has the same structure of linear layers and row-wise ops and :func:`grouped_mm_blocker`
(the one eligibility rule, shared with the stacked-expert families) has nothing against the
operands; else each local expert runs on its segment of ``recv_x``. Stacked experts
(:class:`~fx_passes.match.StackedExperts`) get their parameters sliced to this rank's experts
and emit themselves.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.graph import (
    LINEAR,
    ROWWISE_FUNCS,
    ROWWISE_METHODS,
    call,
    is_param_like,
    is_param_slice,
    meta_key,
    set_val,
    val,
)
from fx_passes.match import ExpertSubgraph, ModuleListExperts, ShardInfo, StackedExperts


def grouped_offsets(graph: fx.Graph, tokens_per_expert: Node) -> Node:
    """int32 ``[E_l]`` cumulative row offsets, what ``torch._grouped_mm`` takes as ``offs``."""
    return call(graph, torch.cumsum, (tokens_per_expert, 0), {"dtype": torch.int32})


def host_counts(tpe: Node) -> Node:
    """What to read ``tokens_per_expert`` from on the host: the CPU copy that the default
    dispatch's one sync already made (``moe_ops.dispatch`` output 7), while ``_emit_default``
    emits the experts; else ``tpe`` itself (reading it then costs a device -> host sync)."""
    make = tpe.meta.get(HOST_COUNTS)
    return tpe if make is None else make()


HOST_COUNTS = "moe_ops_host_counts"


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


def grouped_mm_blocker(rows: torch.Tensor, mat: torch.Tensor) -> str | None:
    """Why ``torch._grouped_mm`` is not used for ``rows`` times per-expert matrices of ``mat``'s
    shape (one expert's ``[in, out]`` or ``[out, in]``, or the stacked ``[E_l, ...]``), or None.

    The one eligibility rule: bfloat16 operands (the dtype it compiles for on CPU) whose expert
    matrices have 16-byte aligned dims (its stride requirement, on CPU and CUDA alike).
    """
    if rows.dtype != torch.bfloat16 or mat.dtype != torch.bfloat16:
        return f"dtype {rows.dtype} (torch._grouped_mm is used for bfloat16 only)"
    dims = mat.shape[-2:]
    if not all(isinstance(d, int) and d * mat.element_size() % 16 == 0 for d in dims):
        return f"expert matrix {tuple(mat.shape)} not 16-byte aligned"
    return None


def can_group(body: ModuleListExperts, local: Sequence[int], x_val) -> str | None:
    """None when the local experts of ``body`` run as grouped_mm on rows like ``x_val``, else
    why not."""
    if x_val.dtype != torch.bfloat16:
        return f"dtype {x_val.dtype} (torch._grouped_mm is used for bfloat16 only)"
    return _grouped_plan(body, local)


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
        if n.target in LINEAR:
            w, b = linear_args(n)
            if w not in owned[0] or (b is not None and b not in owned[0]):
                return f"{n.name}: linear weights that are not the expert's own parameters"
            if val(w).dim() != 2 or val(n.args[0]).dim() != 2:
                return f"{n.name}: linear on non-2D tensors"
            why = grouped_mm_blocker(val(n.args[0]), val(w))
            if why is not None:
                return f"{n.name}: {why}"
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


def linear_args(n: Node) -> tuple[Node, Node | None]:
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


def emit_segments(
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
        set_val(new)
        local_env[n] = new
    return local_env[sub.output]


def emit_grouped(
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
        if n.target in LINEAR:
            ws = [linear_args(body.experts[e].nodes[i])[0] for e in local]
            w_stack = _local_stack(graph, ws, env)
            w_t = call(graph, "transpose", (w_stack, -2, -1))
            out = call(graph, torch._grouped_mm, (local_env[n.args[0]], w_t), {"offs": offs})
            if linear_args(n)[1] is not None:
                if row_expert is None and padded:
                    row_expert, valid = _padded_row_expert(graph, recv_x, offs, len(local))
                elif row_expert is None:
                    rows = call(graph, "size", (recv_x, 0))
                    ids = call(graph, torch.arange, (len(local),), {"device": val(tpe).device})
                    row_expert = call(
                        graph, torch.repeat_interleave, (ids, tpe), {"output_size": rows}
                    )
                bs = [linear_args(body.experts[e].nodes[i])[1] for e in local]
                b_stack = _local_stack(graph, bs, env)
                b_rows = call(graph, operator.getitem, (b_stack, row_expert))
                if valid is not None:
                    b_rows = call(graph, torch.where, (valid, b_rows, 0))
                out = call(graph, operator.add, (out, b_rows))
            local_env[n] = out
            continue
        new = graph.node_copy(n, lambda a: local_env[a] if a in local_env else env(a))
        new.meta.pop("unbacked_bindings", None)
        set_val(new)
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


def grouped_linear(graph: fx.Graph, a: Node, w: Node, tpe: Node, transposed: bool) -> Node:
    """``a[R, in]`` rows grouped by local expert times ``w[E_l, out, in]`` (``[E_l, in, out]``
    when ``transposed``): ``torch._grouped_mm`` where :func:`grouped_mm_blocker` allows, else
    one ``mm`` per local expert on ``split(a, tpe.tolist())``."""
    mat_b = w if transposed else call(graph, "transpose", (w, -2, -1))
    bv = val(mat_b)
    if grouped_mm_blocker(val(a), bv) is None:
        return call(graph, torch._grouped_mm, (a, mat_b), {"offs": grouped_offsets(graph, tpe)})
    sizes = call(graph, "tolist", (host_counts(tpe),))
    parts = call(graph, torch.split, (a, sizes))
    outs = []
    for j in range(bv.shape[0]):
        part = call(graph, operator.getitem, (parts, j))
        wj = call(graph, operator.getitem, (mat_b, j))
        outs.append(call(graph, torch.mm, (part, wj)))
    return outs[0] if len(outs) == 1 else call(graph, torch.cat, (outs,))


def emit_stacked(
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
        # [E * m, ...]: m rows per expert (a 2-D weight the body views per expert)
        m = rows // num_experts if isinstance(rows, int) and rows % num_experts == 0 else 1
        if shard is not None:
            q = _local_rows(graph, p, shard, e_l, group_name)
        elif rows == num_experts * m and e_l != num_experts:
            q = call(graph, operator.getitem, (q, slice(rank * e_l * m, (rank + 1) * e_l * m)))
        elif rows != e_l * m:
            raise ValueError(
                f"fx_passes: stacked expert parameter {p.name} must have {num_experts} or {e_l} "
                f"rows (E or E/W), or a multiple of E rows, got {rows}"
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
    rows.meta[meta_key(graph)] = fake.new_empty((e_l, *fake.shape[1:]))
    return rows
