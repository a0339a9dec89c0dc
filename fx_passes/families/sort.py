"""Family D: sort-based permutation.

The block flattens the top-k expert ids (``[T, K] -> [P]``), sorts them (``torch.sort`` /
``argsort``, stable or not), gathers the rows ``x[perm // K]`` (or ``index_select``, or
``gather`` with an expanded index), counts rows per expert (``histc``, ``bincount`` with
``torch._check`` on its length, or a one-hot sum; sometimes ``.tolist()``), runs the experts on
the grouped rows (``torch._grouped_mm``, transformers' ``grouped_mm_fallback`` op, or ``split`` +
one linear per expert + ``cat``), scales by the sorted weights ``w.flatten()[perm]`` and puts
rows back per token, one of:

* inverse permutation: ``inv[perm] = arange(P)``, ``y[inv].view(T, K, H).sum(1)``
  (transformers 5 ``experts_implementation="grouped_mm"``);
* ``zeros(P, H).index_copy_(0, perm, y)``, ``.view(T, K, H)``, weights, ``.sum(1)`` (Aria);
* ``zeros(T, H).index_add(0, perm // K, y * w)`` (GraniteMoE / JetMoE in transformers 4.x);
* ``base.scatter_add(0, (perm // K)[:, None].expand(-1, H), y * w)`` (torchtitan; ``base`` is
  a shared expert's output or zeros).

Everything between the sorted rows and the expert output is the expert body
(``families._body.Body``), copied onto the rows of this rank's local experts with sliced
parameters. The token index ``perm // K`` may be computed once per use. A body of row-wise ops
and per-expert ``split`` branches is taken as it is. Any other body (rows padded per expert to
an alignment and regrouped, a zero row appended, segments cut by tensor row offsets and written
into a fresh buffer, 2-D ``[E * I, H]`` weights viewed per expert, sizes baked from the row count
under static shapes) is taken by what it computes: it must read only the grouped rows, the
counts (and values made from them alone) and the stacked weights, and
``_body.check_local_experts`` must find it equal, on random rows, to its copies run on each
rank's experts alone for every W dividing E; the block's W = 1 check does the rest. A sort
whose permutation is used for anything else, or a block whose routing weights scale the
expert input, is left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.families import _body as gbody
from fx_passes.families import _walks as walks
from fx_passes.families._guard import each_candidate
from fx_passes.graph import (
    arg,
    common_prefix_path,
    descendants,
    graph_order,
    is_call,
    is_method,
    module_path,
    target_name,
    unflatten,
    val,
)
from fx_passes.match import (
    MoEMatch,
    Rejected,
    StackedExperts,
)

FAMILY = "sorted"


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per sort-based MoE block of ``gm`` (see the module docstring)."""
    sorts = [n for n in gm.graph.nodes if walks.is_sort(n)]
    return each_candidate(FAMILY, sorts, lambda s: _match_sort(s), rejects)


# ----------------------------------------------------------------------------- small patterns


# ----------------------------------------------------------------------------- the match


def _match_sort(s: Node) -> MoEMatch | str | None:
    ids_flat = s.args[0] if s.args else s.kwargs.get("input")
    if (
        not isinstance(ids_flat, Node)
        or not walks.is_int_tensor(ids_flat)
        or val(ids_flat).dim() != 1
    ):
        return None
    dim = arg(s, 1, "dim", -1)
    descending = arg(s, 2, "descending", False)
    if dim not in (0, -1) or descending:
        return "the sort is descending or not along the ids"
    w = walks.Walk(s)
    topk_idx = unflatten(ids_flat)
    tv = val(topk_idx)
    if not walks.is_int_tensor(topk_idx) or tv.dim() not in (1, 2):
        return None
    w.topk_idx = topk_idx
    K = 1 if tv.dim() == 1 else tv.shape[1]
    if not isinstance(K, int):
        return "the number of slots per token is symbolic"
    w.seen += walks.input_chain(ids_flat, topk_idx)
    if is_call(s, torch.argsort) or is_method(s, "argsort"):
        perm = s
    else:
        perm = None
        for u in s.users:
            if u.target is operator.getitem and u.args[1] == 1:
                perm = u
            elif u.target is operator.getitem and u.args[1] == 0:
                w.sorted_vals = u
            else:
                return f"the sort result is used by {u.name}"
            w.seen.append(u)
        if perm is None:
            return None

    # Users of the permutation: token index, sorted weights, the way back.
    # the token index perm // K, computed once or again for each use
    toks: list[Node] = [perm] if K == 1 else []
    w_sorted = None
    back: list[Node] = []
    for u in perm.users:
        if K > 1 and walks.is_floordiv_by(u, perm, K):
            toks.append(u)
        elif u.target is operator.getitem and u.args[1] is perm and walks.is_float_tensor(u):
            w_sorted = u
        elif (
            is_method(u, "index_copy_", "index_copy") and u.args[1] == 0 and u.args[2] is perm
        ) or (u.target is operator.setitem and u.args[1] is perm):
            back.append(u)
        elif is_call(u, torch.empty_like, torch.zeros_like) and u.args[0] is perm:
            continue  # the buffer of the inverse permutation, checked with its write
        elif K == 1:
            continue
        else:
            return f"the sort's permutation is also used by {u.name} ({target_name(u)})"
    if not toks:
        return "no token index perm // K follows the sort"
    w.seen += toks
    tok = toks[0]

    # Users of the token index: the dispatch gather and maybe the way back.
    got = walks.gathered_rows(toks, back, w_sorted, K, w)
    if isinstance(got, str):
        return got
    x_sorted, x = got

    # Sorted weights [P] -> topk_weights [T, K], and the way back from y to the tokens.
    got = walks.weights_and_way_back(back, perm, tok, w_sorted, topk_idx, K, w)
    if isinstance(got, str):
        return got
    y, output, base, last_write, topk_weights = got

    # The expert body between the sorted rows and y.
    body_nodes = gbody.body_region(x_sorted, y)
    if not body_nodes:
        return "the expert output does not depend on the sorted rows"
    sentinel = _sentinel_fills(w, x_sorted, body_nodes)
    if isinstance(sentinel, str):
        return sentinel
    fills, sentinel_bounds = sentinel
    # Ops not known to act row by row (padding, regrouping, buffers filled by segment) are
    # allowed when the body checks out on every split of the experts (below).
    relaxed = None
    for n in body_nodes:
        if n not in fills and relaxed is None:
            relaxed = walks.check_body_node(n)
    sup = gbody.collect_support(body_nodes, x_sorted, w.leaf_kind, replaced=fills)
    if isinstance(sup, str) and w_sorted is not None:
        scaled = descendants(w_sorted) & set(body_nodes)
        if scaled:
            first = min(scaled, key=graph_order(s.graph).get)
            return (
                f"the routing weights scale the expert input ({first.name} reads "
                f"{w_sorted.name}): moe_ops applies them to the expert output, which is "
                f"another function unless the experts are linear; scale the experts' output "
                f"instead (torchtitan: score_before_experts=False)"
            )
    if isinstance(sup, str):
        return sup
    support, counts, row_ids, params = sup
    E = w.num_experts
    if E is None:
        return "no per-expert row counts (histc / bincount / one-hot sum) feed the experts"
    for n, bound in sentinel_bounds:
        if bound != E:
            return f"{n.name} compares the sorted ids with {bound}, not the {E} experts"
    views = gbody.expert_views(params, support, E)
    if isinstance(views, str):
        return views
    all_nodes = sorted(set(support) | set(body_nodes), key=graph_order(s.graph).get)
    fresh = {n for n in all_nodes if gbody.is_fresh_rows(n, x_sorted)}
    if relaxed is None and (views or fresh):
        relaxed = "weights viewed per expert or values sized by the number of rows"
    if relaxed is None and any(gbody.beyond_plain_support(n) for n in support):
        relaxed = "values computed from the counts"
    tags = gbody.branch_tags(all_nodes, x_sorted, params, counts, E)
    if isinstance(tags, str):
        return tags
    if relaxed is None and any(not float(t).is_integer() for t in tags.values()):
        relaxed = "row offsets from the counts"
    # a size equal to the number of rows may be a width instead (``rows.new_zeros(H)``, a zero
    # row, when H == P): such values are tried both ways, as a row first
    rowlike = {n for n in fresh if gbody.is_row_like(n)}
    first_why = None
    for sized in [fresh - rowlike] + ([fresh] if rowlike else []):
        body = gbody.Body(x_sorted, y, all_nodes, counts, row_ids, params, tags, E)
        body.rewrite.update({n: _identity_of(n) for n in fills if n in body_nodes})
        body.rewrite.update({n: gbody.fresh_rows_emitter(n, x_sorted) for n in sized})
        body.rewrite.update(views)
        if relaxed is None:
            break
        body.rewrite.update(gbody.expert_sized(support, E))
        # the structure alone does not show that the body runs on any rank's experts alone
        # (``relaxed`` says why not): a check on random rows does
        why = gbody.check_local_experts(body)
        if why is None:
            break
        first_why = first_why or f"{why} ({relaxed})"
    else:
        return first_why

    known = set(w.seen) | set(body.nodes) | w.counts_chain
    remove = walks.removal_set(output, last_write, base, x, topk_idx, topk_weights, known)
    if isinstance(remove, str):
        return remove
    return MoEMatch(
        family=FAMILY,
        module_path=common_prefix_path([module_path(topk_idx), module_path(s), module_path(y)]),
        num_experts=E,
        x=x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        output=output,
        remove=remove,
        body=StackedExperts(params, body.emit),
        base=base,
        last_write=last_write,
    )


def _sentinel_fills(w: walks.Walk, x_sorted: Node, body_nodes: list[Node]):
    """transformers' expert-parallel sentinel handling (5.17: always on; 5.24: when sharded)::

        mask = (ids_sorted >= E).unsqueeze(-1); ids_sorted.clamp_(max=E - 1)
        rows.masked_fill_(mask, 0.0); ...; y = y.masked_fill(mask, 0.0)

    ``mask`` is True only on rows whose id is not an expert of the block. The rewrite's rows all
    have ids in ``[0, E)`` (``moe_ops.dispatch`` takes no other ids), so on them each fill and the
    clamp are the identity. Returns ``(fills, bounds)``: the ``masked_fill`` nodes (the rewrite
    copies them as their input) and each ``(node, E')`` whose ``E'`` must be the block's E
    (checked once E is known); the mask, compare and clamp nodes go to ``w.seen``. Or why not.
    """
    ids = w.sorted_vals
    fills: set[Node] = set()
    bounds: list[tuple[Node, int]] = []
    if ids is None:
        return fills, bounds
    inside = set(body_nodes)
    for u in list(ids.users):
        bound = _sentinel_bound(u, ids)
        if bound is None:
            continue
        if is_method(u, "clamp_"):
            if u.users:
                return f"{u.name} clamps the sorted ids and its result is used"
            bounds.append((u, bound))
            w.seen.append(u)
            continue
        masks = [u] + [m for m in u.users if walks.column(m) is u]
        for m in masks:
            for f in m.users:
                if f in masks:
                    continue
                if not (
                    (is_method(f, "masked_fill", "masked_fill_") or is_call(f, torch.masked_fill))
                    and arg(f, 1, "mask") is m
                    and not isinstance(arg(f, 2, "value"), Node)
                ):
                    return f"the sentinel mask {m.name} is used by {f.name} ({target_name(f)})"
                if f not in inside:
                    rows_write = is_method(f, "masked_fill_") and f.args[0] is x_sorted
                    if not rows_write or f.users:
                        return f"{f.name} fills a tensor that is not the expert rows"
                    w.seen.append(f)
                fills.add(f)
        bounds.append((u, bound))
        w.seen += masks
    return fills, bounds


def _sentinel_bound(u: Node, ids: Node) -> int | None:
    """E' for ``ids >= E'``, ``ids > E' - 1`` or ``ids.clamp_(max=E' - 1)``, else None."""
    if not u.args or u.args[0] is not ids:
        return None
    c = u.args[1] if len(u.args) > 1 else None
    if isinstance(c, bool) or not isinstance(c, (int, type(None))):
        return None
    if is_call(u, operator.ge, torch.ge) or is_method(u, "ge"):
        return c
    if is_call(u, operator.gt, torch.gt) or is_method(u, "gt"):
        return None if c is None else c + 1
    if is_method(u, "clamp_") and c is None and u.kwargs.get("min") is None:
        top = u.kwargs.get("max")
        return top + 1 if isinstance(top, int) and not isinstance(top, bool) else None
    return None


def _identity_of(n: Node):
    """A ``Body.rewrite`` entry copying ``n`` as its first argument."""
    return lambda graph, lookup, tpe: lookup(n.args[0])
