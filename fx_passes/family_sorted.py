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

Everything between the sorted rows and the expert output is the expert body (``_stacked.Body``),
copied onto the rows of this rank's local experts with sliced parameters. A sort whose
permutation is used for anything else, a block whose routing weights scale the expert input,
or a body with an op not known to act row by row is left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx import Node

from fx_passes import _stacked as S
from fx_passes._match import (
    MoEMatch,
    Rejected,
    StackedExperts,
    common_prefix_path,
    graph_order,
    is_param_like,
    module_path,
    val,
)

FAMILY = "sorted"


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per sort-based MoE block of ``gm`` (see the module docstring)."""
    matches: list[MoEMatch] = []
    for node in list(gm.graph.nodes):
        if not _is_sort(node):
            continue
        got = _match_sort(node)
        if isinstance(got, str):
            rejects.append(Rejected(FAMILY, module_path(node), got))
        elif got is not None:
            matches.append(got)
    return matches


# ----------------------------------------------------------------------------- small patterns
def _is_sort(n: Node) -> bool:
    return S.is_call(n, torch.sort, torch.argsort) or S.is_method(n, "sort", "argsort")


def _is_int_tensor(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool


def _is_float_tensor(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _is_floordiv_by(n: Node, src: Node, k: int) -> bool:
    if S.is_call(n, operator.floordiv) and n.args[0] is src and n.args[1] == k:
        return True
    if S.is_method(n, "div", "floor_divide") or S.is_call(n, torch.div, torch.floor_divide):
        mode = n.kwargs.get("rounding_mode", n.args[2] if len(n.args) > 2 else None)
        ok_mode = n.target in ("floor_divide", torch.floor_divide) or mode in ("trunc", "floor")
        return n.args[0] is src and n.args[1] == k and ok_mode
    return False


def _is_zeros(n: Node) -> bool:
    """A fresh all-zero (or uninitialised, fully overwritten) buffer made in the block."""
    return S.is_call(n, torch.zeros, torch.zeros_like, torch.empty, torch.empty_like) or (
        S.is_method(n, "new_zeros", "zero_")
    )


def _column(n: Node) -> Node | None:
    """``w.unsqueeze(-1)``, ``w[:, None]``, ``w.reshape(-1, 1)``/``view`` -> ``w``."""
    n = S.strip_casts(n)
    if S.is_method(n, "unsqueeze") and n.args[1] in (-1, 1, val(n.args[0]).dim()):
        return n.args[0]
    if S.is_method(n, "reshape", "view") and tuple(n.args[1:]) in ((-1, 1),):
        return n.args[0]
    if n.target is operator.getitem and n.args[1] in (
        (slice(None), None),
        (slice(None, None, None), None),
        (Ellipsis, None),
    ):
        return n.args[0]
    return None


def _split_mul(n: Node) -> tuple[Node, Node] | None:
    if S.is_call(n, operator.mul, torch.mul) or S.is_method(n, "mul"):
        a, b = n.args[0], n.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return a, b
    return None


def _strip_row_weight(z: Node, w_sorted: Node | None, seen: list[Node]) -> tuple[Node, bool]:
    """``((y.float() * w_sorted[:, None]).to(dt)`` -> ``(y, True)``; records the nodes walked."""
    applied = False
    n = z
    while True:
        if S.is_cast(n):
            seen.append(n)
            n = n.args[0]
            continue
        ab = _split_mul(n)
        if ab is not None and w_sorted is not None and not applied:
            for mine, other in (ab, ab[::-1]):
                col = _column(mine)
                if col is not None and S.strip_casts(col) is w_sorted:
                    seen.extend(_chain(mine, w_sorted))
                    seen.append(n)
                    n, applied = other, True
                    break
            else:
                return n, applied
            continue
        return n, applied


def extend_cast(output: Node, seen: list[Node]) -> Node:
    """The routed sum's only use casting it (back to the model's half dtype) is the output:
    combine then rounds once, like the original."""
    if len(output.users) == 1:
        u = next(iter(output.users))
        if S.is_cast(u) and isinstance(val(u), torch.Tensor) and val(u).shape == val(output).shape:
            seen.append(output)
            return u
    return output


def _chain(top: Node, bottom: Node) -> list[Node]:
    """Single-input nodes from ``top`` down to ``bottom`` (exclusive)."""
    out = []
    while top is not bottom and isinstance(top, Node):
        out.append(top)
        top = top.args[0]
    return out


# ----------------------------------------------------------------------------- the match
class _Walk:
    """State of one attempt at matching a sort node."""

    def __init__(self, sort: Node):
        self.sort = sort
        self.seen: list[Node] = [sort]
        self.num_experts: int | None = None
        self.topk_idx: Node | None = None
        self.sorted_vals: Node | None = None
        self.counts_chain: set[Node] = set()

    def set_experts(self, e: int) -> str | None:
        if self.num_experts is None:
            self.num_experts = e
        elif self.num_experts != e:
            return f"the block counts {e} experts in one place and {self.num_experts} in another"
        return None

    def is_ids(self, n: Node) -> bool:
        """Expert ids of the block: the top-k ids (any view/cast) or the sorted ids."""
        n = S.strip_casts(n)
        if self.sorted_vals is not None and n is self.sorted_vals:
            return True
        return S.unflatten(n) is self.topk_idx

    def leaf_kind(self, n: Node) -> str | None:
        if self.sorted_vals is not None and S.strip_casts(n) is self.sorted_vals:
            return "row_ids"
        e = self.counts_experts(n)
        if e is not None:
            return "counts" if self.set_experts(e) is None else None
        return None

    def counts_experts(self, n: Node) -> int | None:
        """E when ``n`` is the per-expert row counts ``[E]`` of this block's ids, else None."""
        chain = [n]
        if S.is_call(n, torch.histc):
            bins = n.kwargs.get("bins", n.args[1] if len(n.args) > 1 else 100)
            lo = n.kwargs.get("min", n.args[2] if len(n.args) > 2 else 0)
            hi = n.kwargs.get("max", n.args[3] if len(n.args) > 3 else 0)
            if lo == 0 and hi in (bins - 1, bins) and self.is_ids(n.args[0]):
                self.counts_chain.update(chain + _chain(n.args[0], S.unflatten(n.args[0])))
                return bins
            return None
        if S.is_call(n, torch.bincount) or S.is_method(n, "bincount"):
            e = n.kwargs.get("minlength", n.args[2] if len(n.args) > 2 else 0)
            weights = n.kwargs.get("weights", n.args[1] if len(n.args) > 1 else None)
            if e and weights is None and self.is_ids(n.args[0]):
                self.counts_chain.update(chain + _chain(n.args[0], S.unflatten(n.args[0])))
                return e
            return None
        if S.is_method(n, "sum") and S.arg(n, 1, "dim") == 0:
            onehot = n.args[0]
            while S.is_cast(onehot):
                chain.append(onehot)
                onehot = onehot.args[0]
            chain.append(onehot)
            if S.is_call(onehot, F.one_hot) and self.is_ids(onehot.args[0]):
                return S.arg(onehot, 1, "num_classes")
            if (
                S.is_method(onehot, "scatter", "scatter_")
                and onehot.args[1] == 1
                and onehot.args[2] is self.topk_idx
                and onehot.args[3] == 1
                and _is_zeros(onehot.args[0])
            ):
                chain.append(onehot.args[0])
                self.counts_chain.update(chain)
                return val(onehot.args[0]).shape[1]
        return None


def _match_sort(s: Node) -> MoEMatch | str | None:
    ids_flat = s.args[0] if s.args else s.kwargs.get("input")
    if not isinstance(ids_flat, Node) or not _is_int_tensor(ids_flat) or val(ids_flat).dim() != 1:
        return None
    dim = S.arg(s, 1, "dim", -1)
    descending = S.arg(s, 2, "descending", False)
    if dim not in (0, -1) or descending:
        return "the sort is descending or not along the ids"
    w = _Walk(s)
    topk_idx = S.unflatten(ids_flat)
    tv = val(topk_idx)
    if not _is_int_tensor(topk_idx) or tv.dim() not in (1, 2):
        return None
    w.topk_idx = topk_idx
    K = 1 if tv.dim() == 1 else tv.shape[1]
    if not isinstance(K, int):
        return "the number of slots per token is symbolic"
    w.seen += _chain(ids_flat, topk_idx)
    if S.is_call(s, torch.argsort) or S.is_method(s, "argsort"):
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
    tok: Node | None = perm if K == 1 else None
    w_sorted = None
    back: list[Node] = []
    for u in perm.users:
        if K > 1 and _is_floordiv_by(u, perm, K):
            tok = u
        elif u.target is operator.getitem and u.args[1] is perm and _is_float_tensor(u):
            w_sorted = u
        elif (
            S.is_method(u, "index_copy_", "index_copy") and u.args[1] == 0 and u.args[2] is perm
        ) or (u.target is operator.setitem and u.args[1] is perm):
            back.append(u)
        elif S.is_call(u, torch.empty_like, torch.zeros_like) and u.args[0] is perm:
            continue  # the buffer of the inverse permutation, checked with its write
        elif K == 1:
            continue
        else:
            return f"the sort's permutation is also used by {u.name} ({S.target_name(u)})"
    if tok is None:
        return "no token index perm // K follows the sort"
    w.seen.append(tok)

    # Users of the token index: the dispatch gather and maybe the way back.
    x_sorted = None
    x = None
    for u in list(tok.users):
        if u in back:
            continue
        got = _tok_uses(u, tok, w)
        if got is None:
            if K == 1 and (u is w_sorted or u.target is operator.setitem or u in back):
                continue
            return f"the token index is used by {u.name} ({S.target_name(u)})"
        for kind, node, src in got:
            if kind == "back":
                back.append(node)
            elif x_sorted is not None:
                return "the rows are gathered twice"
            else:
                x_sorted, x = node, src
    if x_sorted is None:
        return "no gather of token rows by the sorted order"
    w.seen.append(x_sorted)

    # Sorted weights [P] -> topk_weights [T, K].
    topk_weights = None
    if w_sorted is not None:
        topk_weights = S.unflatten(w_sorted.args[0])
        w.seen += [w_sorted, *_chain(w_sorted.args[0], topk_weights)]
        if tuple(val(topk_weights).shape) != tuple(tv.shape):
            return "the sorted weights do not come from a [T, K] tensor like the ids"

    if len(back) != 1:
        return f"expected one way back to the tokens, found {len(back)}"
    got = _way_back(back[0], perm, tok, w_sorted, topk_weights, T=tv.shape[0], K=K, walk=w)
    if isinstance(got, str):
        return got
    y, output, base, last_write, topk_weights = got
    if last_write is None:
        output = extend_cast(output, w.seen)

    # The expert body between the sorted rows and y.
    body_nodes = S.body_region(x_sorted, y)
    if not body_nodes:
        return "the expert output does not depend on the sorted rows"
    sentinel = _sentinel_fills(w, x_sorted, body_nodes)
    if isinstance(sentinel, str):
        return sentinel
    fills, sentinel_bounds = sentinel
    for n in body_nodes:
        why = None if n in fills else _check_body_node(n)
        if why is not None:
            return why
    sup = S.collect_support(body_nodes, x_sorted, w.leaf_kind, replaced=fills)
    if isinstance(sup, str):
        return sup
    support, counts, row_ids, params = sup
    E = w.num_experts
    if E is None:
        return "no per-expert row counts (histc / bincount / one-hot sum) feed the experts"
    for n, bound in sentinel_bounds:
        if bound != E:
            return f"{n.name} compares the sorted ids with {bound}, not the {E} experts"
    for p in params:
        if val(p).dim() == 0 or val(p).shape[0] != E:
            return f"{p.name} is not stacked per expert ([{E}, ...]): ModuleList after a sort"
    all_nodes = sorted(set(support) | set(body_nodes), key=graph_order(s.graph).get)
    tags = S.branch_tags(all_nodes, x_sorted, params, counts, E)
    if isinstance(tags, str):
        return tags
    body = S.Body(x_sorted, y, all_nodes, counts, row_ids, params, tags, E)
    body.rewrite.update({n: _identity_of(n) for n in fills if n in body_nodes})

    known = set(w.seen) | set(body.nodes) | w.counts_chain
    remove = removal_set(output, last_write, base, x, topk_idx, topk_weights, known)
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


def _sentinel_fills(w: _Walk, x_sorted: Node, body_nodes: list[Node]):
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
        if S.is_method(u, "clamp_"):
            if u.users:
                return f"{u.name} clamps the sorted ids and its result is used"
            bounds.append((u, bound))
            w.seen.append(u)
            continue
        masks = [u] + [m for m in u.users if _column(m) is u]
        for m in masks:
            for f in m.users:
                if f in masks:
                    continue
                if not (
                    (
                        S.is_method(f, "masked_fill", "masked_fill_")
                        or S.is_call(f, torch.masked_fill)
                    )
                    and S.arg(f, 1, "mask") is m
                    and not isinstance(S.arg(f, 2, "value"), Node)
                ):
                    return f"the sentinel mask {m.name} is used by {f.name} ({S.target_name(f)})"
                if f not in inside:
                    rows_write = S.is_method(f, "masked_fill_") and f.args[0] is x_sorted
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
    if S.is_call(u, operator.ge, torch.ge) or S.is_method(u, "ge"):
        return c
    if S.is_call(u, operator.gt, torch.gt) or S.is_method(u, "gt"):
        return None if c is None else c + 1
    if S.is_method(u, "clamp_") and c is None and u.kwargs.get("min") is None:
        top = u.kwargs.get("max")
        return top + 1 if isinstance(top, int) and not isinstance(top, bool) else None
    return None


def _identity_of(n: Node):
    """A ``Body.rewrite`` entry copying ``n`` as its first argument."""
    return lambda graph, lookup, tpe: lookup(n.args[0])


def _tok_uses(u: Node, tok: Node, w: _Walk) -> list[tuple[str, Node, Node | None]] | None:
    """What a user of the token index does: ``x[tok]`` / ``index_select`` /
    ``gather(x, 0, tok[:, None].expand(-1, H))`` gather rows; ``index_add`` / ``scatter_add`` by
    the token index are a way back. None when it is neither."""
    if u.target is operator.getitem and u.args[1] is tok:
        return [("gather", u, u.args[0])]
    if (
        (S.is_method(u, "index_select") or S.is_call(u, torch.index_select))
        and u.args[1] == 0
        and (u.args[2] is tok)
    ):
        return [("gather", u, u.args[0])]
    if S.is_method(u, "index_add", "index_add_") or S.is_call(u, torch.index_add):
        if u.args[1] == 0 and u.args[2] is tok:
            return [("back", u, None)]
        return None
    if not (S.is_method(u, "reshape", "view", "unsqueeze") and tuple(val(u).shape[1:]) == (1,)):
        return None
    found = []
    for e in u.users:
        if not S.is_method(e, "expand"):
            return None
        w.seen += [u, e]
        for v in e.users:
            if (S.is_call(v, torch.gather) or S.is_method(v, "gather")) and (
                S.arg(v, 1, "dim") == 0 and S.arg(v, 2, "index") is e
            ):
                found.append(("gather", v, v.args[0]))
            elif (
                S.is_method(v, "scatter_add", "scatter_add_") or S.is_call(v, torch.scatter_add)
            ) and (S.arg(v, 1, "dim") == 0 and S.arg(v, 2, "index") is e):
                found.append(("back", v, None))
            else:
                return None
    return found or None


def _way_back(node, perm, tok, w_sorted, topk_weights, *, T, K, walk: _Walk):
    """Match the way back to the tokens. Returns ``(y, output, base, last_write, topk_weights)``."""
    seen = walk.seen
    if S.is_method(node, "index_add", "index_add_") or S.is_call(node, torch.index_add):
        dest, z = node.args[0], node.args[3]
        inplace = node.target == "index_add_"
        return _accumulate(node, dest, z, inplace, w_sorted, topk_weights, seen)
    if S.is_method(node, "scatter_add", "scatter_add_") or S.is_call(node, torch.scatter_add):
        dest, z = node.args[0], S.arg(node, 3, "src")
        inplace = node.target == "scatter_add_"
        return _accumulate(node, dest, z, inplace, w_sorted, topk_weights, seen)
    if node.target is operator.setitem:  # inv[perm] = arange(P)
        inv, src = node.args[0], node.args[2]
        if not (
            S.is_call(src, torch.arange)
            and S.is_call(inv, torch.empty_like, torch.empty, torch.zeros)
        ):
            return "the write into the permutation is not an inverse permutation"
        seen += [node, inv, src]
        readers = [u for u in inv.users if u is not node]
        if len(readers) != 1:
            return "the inverse permutation is used more than once"
        r = readers[0]
        if (
            r.target is operator.getitem
            and r.args[1] is inv
            or S.is_method(r, "index_select")
            and r.args[1] == 0
            and r.args[2] is inv
        ):
            z, unperm = r.args[0], r
        else:
            return f"the inverse permutation is used by {r.name}"
        seen.append(unperm)
        readers = list(unperm.users)
    elif S.is_method(node, "index_copy_", "index_copy"):
        dest, z = node.args[0], node.args[3]
        if not _is_zeros(dest):
            return "index_copy into a tensor that is not a fresh buffer"
        seen += [node, dest]
        if node.target == "index_copy":
            readers = list(node.users)
        else:
            readers = [u for u in dest.users if u is not node]
            order = graph_order(node.graph)
            if any(order[u] < order[node] for u in readers):
                return "the unpermuted buffer is read before it is written"
    else:
        return "unknown way back"
    return _unpermuted(readers, z, w_sorted, topk_weights, T, K, seen)


def _unpermuted(readers, z, w_sorted, topk_weights, T, K, seen):
    """``readers`` read the [P, H] unpermuted rows: ``.view(T, K, H) [* w[..., None]] .sum(1)``."""
    if len(readers) != 1:
        return "the unpermuted rows are used more than once"
    v = readers[0]
    if not (S.is_method(v, "view", "reshape") and tuple(val(v).shape[:2]) == (T, K)):
        return "the unpermuted rows are not viewed as [T, K, H]"
    seen.append(v)
    n = v
    post = None
    while len(n.users) == 1:
        u = next(iter(n.users))
        if S.is_cast(u):
            seen.append(u)
            n = u
            continue
        ab = _split_mul(u)
        if ab is not None and post is None:
            other = ab[1] if ab[0] is n else ab[0]
            col = _column(other)
            if col is None:
                return f"{u.name} scales the unpermuted rows by something other than the weights"
            post = S.strip_casts(col)
            seen += [u, *_chain(other, post)]
            n = u
            continue
        break
    u = next(iter(n.users)) if len(n.users) == 1 else None
    if u is None or not (S.is_method(u, "sum") and S.arg(u, 1, "dim") in (1, -2)):
        return "the unpermuted rows are not summed over the slots"
    seen.append(u)
    y, applied = _strip_row_weight(z, w_sorted, seen)
    if applied and post is not None:
        return "routing weights applied twice"
    if post is not None:
        if tuple(val(post).shape) != (T, K):
            return "the unpermuted rows are scaled by something that is not [T, K]"
        topk_weights = post
    elif not applied:
        topk_weights = None
    return y, u, None, None, topk_weights


def _accumulate(node, dest, z, inplace, w_sorted, topk_weights, seen):
    """``dest.index_add(0, tok, y * w)`` / ``scatter_add``: the output is the sum onto ``dest``."""
    seen.append(node)
    y, applied = _strip_row_weight(z, w_sorted, seen)
    if not applied:
        topk_weights = None
    base = None if _is_zeros(dest) else dest
    if base is None:
        seen.append(dest)
    if inplace:
        return y, dest, base, node, topk_weights
    return y, node, base, None, topk_weights


def _check_body_node(n: Node) -> str | None:
    why = S.check_row_op(n)
    if why is not None:
        return why
    v = val(n.args[0]) if n.args and isinstance(n.args[0], Node) else None
    if n.target is operator.getitem and isinstance(v, torch.Tensor):
        idx = n.args[1]
        if isinstance(idx, tuple) and idx and idx[0] is Ellipsis:
            return None
        if isinstance(idx, slice) and idx.start is None and idx.step is None:
            return None  # rows[: sum(counts)]
        return f"{n.name}: indexing {idx!r} may mix rows"
    if S.is_method(n, "chunk", "split") or S.is_call(
        n, torch.chunk, torch.split, torch.functional.split, torch.cat
    ):
        dim = S.arg(n, 2, "dim", 0) if n.target is not torch.cat else S.arg(n, 1, "dim", 0)
        nd = val(n.args[0][0] if n.target is torch.cat else n.args[0]).dim()
        if dim in (-1, nd - 1):
            return None
        sizes = n.args[0] if n.target is torch.cat else S.arg(n, 1, "split_size_or_sections")
        if dim == 0 and isinstance(sizes, (list, tuple)):
            return None  # per-expert split/cat; branch_tags checks the lists
        return f"{n.name}: {S.target_name(n)} along rows"
    return None


def removal_set(output, last_write, base, x, topk_idx, topk_weights, known: set[Node]):
    """Every node the rewrite deletes, or why the block cannot be cut out.

    It is everything the output (and the block's in-place writes) reads back to the anchors
    (``x``, ids, weights, ``base``, parameters); each of those nodes must be one the matcher
    recognised (``known``), a fresh buffer, or a runtime shape check. Flattening views of the
    anchors that something outside still reads stay.
    """
    graph = output.graph
    stop = {x, topk_idx, topk_weights, base} - {None}
    known = known | {output}
    if last_write is not None:
        known.add(last_write)
    roots = [output] + ([last_write] if last_write is not None else [])
    roots += [
        n
        for n in known
        if n.target is operator.setitem
        or (n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"))
    ]
    remove: set[Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in remove or n in stop or is_param_like(n):
            continue
        remove.add(n)
        stack.extend(n.all_input_nodes)
    S.add_hangers(remove, keep_out=output)
    # Views of the anchors that something outside still reads stay in the graph.
    order = graph_order(graph)
    last = order[last_write] if last_write is not None else -1
    changed = True
    while changed:
        changed = False
        for n in list(remove):
            outside = [
                u for u in n.users if u not in remove and not (n is output and order[u] > last)
            ]
            if outside:
                if _depends_on(n, {topk_idx}) and not _anchor_view(n, stop):
                    return f"{n.name} is used outside the block by {outside[0].name}"
                _keep(n, remove)
                changed = True
    for n in remove:
        if (
            n not in known
            and not _is_zeros(n)
            and not _hanger(n)
            and not S.is_call(n, torch.arange)
        ) and not _anchor_view(n, stop):
            return f"{n.name} ({S.target_name(n)}) lies inside the block but is not understood"
    return sorted(remove, key=order.get)


def _anchor_view(n: Node, stop: set[Node]) -> bool:
    while isinstance(n, Node) and n not in stop:
        if not (S.is_flatten(n) or S.is_cast(n)):
            return False
        n = n.args[0]
    return True


def _hanger(n: Node) -> bool:
    return not isinstance(val(n), torch.Tensor) and (
        n.target in S._ASSERTISH or S.is_method(n, "size", "item", "dim")
    )


def _keep(n: Node, remove: set[Node]) -> None:
    stack = [n]
    while stack:
        m = stack.pop()
        if m in remove:
            remove.discard(m)
            stack.extend(m.all_input_nodes)


def _depends_on(n: Node, srcs: set[Node]) -> bool:
    seen: set[Node] = set()
    stack = [n]
    while stack:
        m = stack.pop()
        if m in srcs:
            return True
        if m in seen:
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False
