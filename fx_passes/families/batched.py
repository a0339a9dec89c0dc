"""Family B: batched gather of expert weights per (token, slot), then ``bmm``.

transformers 5 ``experts_implementation="batched_mm"`` writes, with ``ids = topk_idx.reshape(-1)``::

    rows = x.repeat_interleave(K, dim=0)                          # [P, H], pair order
    h = torch.bmm(W1[ids], rows.unsqueeze(-1)).squeeze(-1)   # or bmm(rows[:, None], W1[ids])
    h = h + b1[ids]  (optional, often in place)   ... activation ...
    y = torch.bmm(W2[ids], h.unsqueeze(-1)).squeeze(-1)
    out = (y * w.reshape(-1).unsqueeze(-1)).view(T, K, H).sum(1)

Grok-1's dense form is the same linear: every expert on every row, then a one-hot pick::

    rows = x[:, None].expand(-1, K, -1).reshape(-1, H)           # or x.repeat_interleave(K, 0)
    every = einsum("mk,bkn->bmn", rows, W1)                       # [E, P, I], W1 [E, H, I]
    h = einsum("bm,bmn->mn", one_hot(ids, E).t().to(dt), every)   # rows[m] @ W1[ids[m]]
    out = (w[:, :, None] * y.view(T, K, H)).sum(1)                # weights before or after view

Every ``bmm`` with a gathered stacked weight (and every such pick) becomes one grouped linear
over this rank's local experts (``torch._grouped_mm`` for bfloat16 with 16-byte aligned rows,
per-expert segments otherwise); gathered biases become ``b_local[local expert of each row]``;
the rest of the body is copied as it is. Weights gathered by anything but the block's flattened
top-k ids, or a body op not known to act row by row, leave the block alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
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
    reps = [n for n in gm.graph.nodes if _rows_per_slot(n) is not None]
    return each_candidate(FAMILY, reps, lambda r: _match(r), rejects)


def _rows_per_slot(n: Node) -> tuple[Node, int] | None:
    """``(x, K)`` when ``n`` is every token's row once per slot, in pair order:
    ``x.repeat_interleave(K, dim=0)`` or ``x[:, None].expand(-1, K, -1).reshape(-1, H)``."""
    if (is_method(n, "repeat_interleave") or is_call(n, torch.repeat_interleave)) and (
        isinstance(arg(n, 1, "repeats"), int) and arg(n, 2, "dim") == 0
    ):
        return n.args[0], n.args[1]
    if not (is_method(n, "reshape", "view") and _dims(n) == 2):
        return None
    ex = n.args[0]
    if not (isinstance(ex, Node) and is_method(ex, "expand") and _dims(ex) == 3):
        return None
    col = ex.args[0]
    if not isinstance(col, Node):
        return None
    unsqueezed = is_method(col, "unsqueeze") and arg(col, 1, "dim") == 1
    indexed = col.target is operator.getitem and col.args[1] in (
        (slice(None), None, slice(None)),
        (slice(None), None),
    )
    if not (unsqueezed or indexed):
        return None
    x = col.args[0]
    K = val(ex).shape[1]
    xv = val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not isinstance(K, int):
        return None
    if tuple(val(ex).shape) != (xv.shape[0], K, xv.shape[1]):
        return None
    return x, K


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


def _dims(n: Node) -> int | None:
    v = val(n)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _dense_select(n: Node) -> tuple[Node, Node, Node, bool, list[Node]] | None:
    """Every expert on every row, then a one-hot pick (Grok-1's dense form)::

        every = einsum("mk,bkn->bmn", a, W)          # [E, P, out], W [E, in, out]
        y = einsum("bm,bmn->mn", one_hot(ids, E).t(), every)

    is ``a[m] @ W[ids[m]]``. Returns ``(a, W, ids, True, [every, one-hot nodes])``.
    """
    if not is_call(n, torch.functional.einsum, torch.einsum) or len(n.args) != 3:
        return None
    eq, oh, every = n.args
    if not (isinstance(eq, str) and isinstance(every, Node) and isinstance(oh, Node)):
        return None
    if not is_call(every, torch.functional.einsum, torch.einsum) or len(every.args) != 3:
        return None
    eq2, a, W = every.args
    if not (isinstance(eq2, str) and is_param_like(W) and len(every.users) == 1):
        return None
    (o1, o2, out), (i1, i2, out2) = _einsum_terms(eq), _einsum_terms(eq2)
    # inner: a[m, k] W[b, k, n] -> [b, m, n]; outer: oh[b, m] every[b, m, n] -> [m, n]
    inner = len(i1) == 2 and len(i2) == 3 and i1[1] == i2[1] and out2 == i2[0] + i1[0] + i2[2]
    outer = len(o1) == 2 and o2 == out2 and o1 == out2[:2] and out == out2[1:]
    if not (inner and outer and len(set(i1 + i2)) == 4):
        return None
    chain = [oh]
    m = oh
    while is_cast(m):
        m = m.args[0]
        chain.append(m)
    transposed = is_method(m, "t") or (is_method(m, "transpose", "permute") and len(m.args) == 3)
    if not (transposed or (is_call(m, getattr) and m.args[1] == "T")):
        return None
    hot = m.args[0]
    chain.append(hot)
    if not (is_call(hot, F.one_hot) and arg(hot, 1, "num_classes") == val(W).shape[0]):
        return None
    return a, W, hot.args[0], True, [every, *chain]


def _einsum_terms(eq: str) -> tuple[str, str, str]:
    """``"ab,bc->ac"`` -> ``("ab", "bc", "ac")`` (empty strings when not two operands)."""
    lhs, _, out = eq.replace(" ", "").partition("->")
    ops = lhs.split(",")
    return (ops[0], ops[1], out) if len(ops) == 2 and out else ("", "", "")


def _match(rep: Node) -> MoEMatch | str | None:
    x, K = _rows_per_slot(rep)
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
        and _slots_view(n.args[0], T, K) is not None
    ]
    if len(sums) != 1:
        return None if not sums else "more than one sum over slots after the repeated rows"
    output = sums[0]
    view, post, post_seen = _slots_view(output.args[0], T, K)
    seen: list[Node] = [*walks.input_chain(rep, x), view, *post_seen]
    z = view.args[0]
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
    if post is not None:
        if applied:
            return "routing weights applied twice"
        topk_weights, w_flat = post, post
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
        got = _batched_linear(n) or _dense_select(n)
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


def _slots_view(n: Node, T, K):
    """``(view, w, seen)`` for ``y.view(T, K, H')`` (``w`` None) or ``w[:, :, None] * view``
    with ``w`` the ``[T, K]`` weights; None for anything else."""
    if is_method(n, "view", "reshape") and tuple(val(n).shape[:2]) == (T, K):
        return n, None, []
    if not (is_call(n, operator.mul, torch.mul) or is_method(n, "mul")):
        return None
    for v, c in (n.args[:2], n.args[1::-1]):
        if not (isinstance(v, Node) and isinstance(c, Node)):
            continue
        if not (is_method(v, "view", "reshape") and tuple(val(v).shape[:2]) == (T, K)):
            continue
        m, chain = c, [n]
        while is_cast(m):
            chain.append(m)
            m = m.args[0]
        idx = m.args[1] if m.target is operator.getitem else None
        if idx in ((slice(None), slice(None), None), (Ellipsis, None)) or (
            is_method(m, "unsqueeze") and m.args[1] in (-1, 2)
        ):
            w = m.args[0]
            if tuple(val(w).shape) == (T, K) and val(w).is_floating_point():
                return v, w, [*chain, m]
    return None


def _grouped_linear_emitter(a: Node, W: Node, transposed: bool):
    def emit(graph: fx.Graph, lookup, tpe: Node) -> Node:
        return grouped_linear(graph, lookup(a), lookup(W), tpe, transposed)

    return emit
