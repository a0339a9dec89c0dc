"""Family B: batched gather of expert weights per (token, slot), then ``bmm``.

transformers 5 ``experts_implementation="batched_mm"`` writes, with ``ids = topk_idx.reshape(-1)``::

    rows = x.repeat_interleave(K, dim=0)                          # [P, H], pair order
    h = torch.bmm(W1[ids], rows.unsqueeze(-1)).squeeze(-1)   # or bmm(rows[:, None], W1[ids])
    h = h + b1[ids]  (optional, often in place)   ... activation ...
    y = torch.bmm(W2[ids], h.unsqueeze(-1)).squeeze(-1)
    out = (y * w.reshape(-1).unsqueeze(-1)).view(T, K, H).sum(1)

Every ``bmm`` with a gathered stacked weight becomes one grouped linear over this rank's local
experts (``torch._grouped_mm`` for bfloat16 with 16-byte aligned rows, per-expert segments
otherwise); gathered biases become ``b_local[local expert of each row]``; the rest of the body is
copied as it is. Weights gathered by anything but the block's flattened top-k ids, or a body op
not known to act row by row, leave the block alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.experts import grouped_linear
from fx_passes.families import _body as gbody
from fx_passes.families import _walks as walks
from fx_passes.families._guard import each_candidate
from fx_passes.graph import (
    arg,
    common_prefix_path,
    graph_order,
    is_call,
    is_cast,
    is_method,
    is_param_like,
    module_path,
    strip_casts,
    unflatten,
    val,
)
from fx_passes.match import (
    MoEMatch,
    Rejected,
    StackedExperts,
)

FAMILY = "batched"


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per batched-gather MoE block of ``gm`` (module docstring)."""
    reps = [
        n
        for n in gm.graph.nodes
        if (is_method(n, "repeat_interleave") or is_call(n, torch.repeat_interleave))
        and isinstance(arg(n, 1, "repeats"), int)
        and arg(n, 2, "dim") == 0
    ]
    return each_candidate(FAMILY, reps, lambda r: _match(r), rejects)


def _gathered_weight(n: Node) -> tuple[Node, Node] | None:
    """``W[ids]`` with W a stacked parameter -> ``(W, ids)``."""
    if n.target is operator.getitem and is_param_like(n.args[0]) and isinstance(n.args[1], Node):
        return n.args[0], n.args[1]
    return None


def _batched_linear(sq: Node) -> tuple[Node, Node, Node, bool, list[Node]] | None:
    """``bmm(W[ids], a.unsqueeze(-1)).squeeze(-1)`` or ``bmm(a.unsqueeze(1), W[ids]).squeeze(1)``.

    Returns ``(a, W, ids, transposed, [unsqueeze, bmm, W[ids]])``.
    """
    if not is_method(sq, "squeeze"):
        return None
    mm = sq.args[0]
    if not (is_call(mm, torch.bmm) or is_method(mm, "bmm")) or len(mm.users) != 1:
        return None
    lhs, rhs = mm.args[0], mm.args[1]
    for wsel, vec, transposed, axis in ((lhs, rhs, False, -1), (rhs, lhs, True, 1)):
        got = _gathered_weight(wsel)
        if got is None or not is_method(vec, "unsqueeze") or len(vec.users) != 1:
            continue
        if vec.args[1] not in (axis, 2 if axis == -1 else 1) or sq.args[1:] not in (
            (axis,),
            (1 if transposed else 2,),
        ):
            continue
        return vec.args[0], got[0], got[1], transposed, [vec, mm, wsel]
    return None


def _match(rep: Node) -> MoEMatch | str | None:
    x = rep.args[0]
    K = rep.args[1]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2:
        return None
    T = xv.shape[0]
    # Find the per-slot sum: view(T, K, H').sum(1) of (y * w_flat[:, None]).
    fwd: set[Node] = set()
    stack = [rep]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in fwd:
                fwd.add(u)
                stack.append(u)
    sums = [
        n
        for n in fwd
        if is_method(n, "sum")
        and arg(n, 1, "dim") in (1, -2)
        and is_method(n.args[0], "view", "reshape")
        and tuple(val(n.args[0]).shape[:2]) == (T, K)
    ]
    if len(sums) != 1:
        return None if not sums else "more than one sum over slots after the repeated rows"
    output = sums[0]
    seen: list[Node] = [rep, output.args[0]]
    z = output.args[0].args[0]
    # weights: y * w_flat.unsqueeze(-1), w_flat = topk_weights.reshape(-1)
    w_flat = None
    n = z
    while is_cast(n):
        n = n.args[0]
    if is_call(n, operator.mul, torch.mul) or is_method(n, "mul"):
        for a in n.args[:2]:
            col = walks.column(a) if isinstance(a, Node) else None
            if col is not None and unflatten(col) is not col:
                w_flat = strip_casts(col)
    y, applied = walks.strip_row_weight(z, w_flat, seen)
    topk_weights = unflatten(w_flat) if applied else None
    if topk_weights is not None:
        seen += [w_flat] if w_flat is not topk_weights else []
        if val(topk_weights).dim() != 2 or tuple(val(topk_weights).shape) != (T, K):
            return "the slot weights are not a [T, K] tensor"

    output = walks.extend_cast(output, seen)
    body_nodes = gbody.body_region(rep, y)
    if not body_nodes:
        return None
    linears = {}
    skip: set[Node] = set()
    topk_idx = ids = None
    E = None
    for n in body_nodes:
        got = _batched_linear(n)
        if got is None:
            continue
        a, W, wids, transposed, parts = got
        if ids is None:
            ids, topk_idx = wids, unflatten(wids)
        if wids is not ids:
            return f"{n.name}: weights gathered by different ids"
        E = E if E is not None else val(W).shape[0]
        if val(W).dim() != 3 or val(W).shape[0] != E:
            return f"{W.name} is not a stacked [E, ., .] weight"
        linears[n] = (a, W, transposed)
        skip.update(parts)
    if not linears:
        return None
    tv = val(topk_idx)
    if not isinstance(tv, torch.Tensor) or tuple(tv.shape) != (T, K) or tv.dtype.is_floating_point:
        return "the weights are not gathered by the flattened [T, K] expert ids"
    body_nodes = [n for n in body_nodes if n not in skip]
    for n in body_nodes:
        if n in linears:
            continue
        why = gbody.check_row_op(n)
        if why is not None:
            return why
        if n.target is operator.getitem and isinstance(val(n.args[0]), torch.Tensor):
            idx = n.args[1]
            if not (isinstance(idx, tuple) and idx and idx[0] is Ellipsis):
                return f"{n.name}: indexing {idx!r} may mix rows"

    def leaf_kind(a: Node) -> str | None:
        return "row_ids" if strip_casts(a) is ids else None

    sup = gbody.collect_support(body_nodes, rep, leaf_kind, replaced=linears)
    if isinstance(sup, str):
        return sup
    support, _, row_ids, params = sup
    params = list(dict.fromkeys(params + [W for (_, W, _) in linears.values()]))
    for p in params:
        if val(p).dim() == 0 or val(p).shape[0] != E:
            return f"{p.name} is not stacked per expert ([{E}, ...])"
    order = graph_order(rep.graph)
    nodes = sorted(set(support) | set(body_nodes), key=order.get)
    rewrite = {
        sq: _grouped_linear_emitter(a, W, transposed) for sq, (a, W, transposed) in linears.items()
    }
    body = gbody.Body(rep, y, nodes, [], row_ids, params, {}, E, rewrite)

    known = set(seen) | set(nodes) | skip | {ids, *walks.input_chain(ids, topk_idx)}
    if topk_weights is not None:
        known |= {w_flat, *walks.input_chain(w_flat, topk_weights)}
    remove = walks.removal_set(output, None, None, x, topk_idx, topk_weights, known)
    if isinstance(remove, str):
        return remove
    return MoEMatch(
        family=FAMILY,
        module_path=common_prefix_path([module_path(topk_idx), module_path(rep), module_path(y)]),
        num_experts=E,
        x=x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        output=output,
        remove=remove,
        body=StackedExperts(params, body.emit),
    )


def _grouped_linear_emitter(a: Node, W: Node, transposed: bool):
    def emit(graph: fx.Graph, lookup, tpe: Node) -> Node:
        return grouped_linear(graph, lookup(a), lookup(W), tpe, transposed)

    return emit
