"""Walks shared by the families whose experts run on rows sorted by expert (sort, batched, ep).

From the sort of the flattened top-k ids: the sorted ids and rows (:class:`Walk`), the way back
from the expert output to the tokens (:func:`way_back`: inverse permutation, ``index_copy_``,
``index_add``, ``scatter_add``, with the routing weights split off), and the set of nodes a
rewrite removes (:func:`removal_set`).

Shape letters: T tokens, H hidden, K top-k, E experts, P = T * K pairs.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from fx_passes.families._body import add_hangers, check_row_op
from fx_passes.graph import (
    ASSERTISH,
    arg,
    graph_order,
    is_call,
    is_cast,
    is_flatten,
    is_method,
    is_param_like,
    strip_casts,
    target_name,
    unflatten,
    val,
)


def is_sort(n: Node) -> bool:
    return is_call(n, torch.sort, torch.argsort) or is_method(n, "sort", "argsort")


def is_int_tensor(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dtype != torch.bool


def is_float_tensor(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def is_floordiv_by(n: Node, src: Node, k: int) -> bool:
    if is_call(n, operator.floordiv) and n.args[0] is src and n.args[1] == k:
        return True
    if is_method(n, "div", "floor_divide") or is_call(n, torch.div, torch.floor_divide):
        mode = n.kwargs.get("rounding_mode", n.args[2] if len(n.args) > 2 else None)
        ok_mode = n.target in ("floor_divide", torch.floor_divide) or mode in ("trunc", "floor")
        return n.args[0] is src and n.args[1] == k and ok_mode
    return False


def _is_zeros(n: Node) -> bool:
    """A fresh all-zero (or uninitialised, fully overwritten) buffer made in the block."""
    return is_call(n, torch.zeros, torch.zeros_like, torch.empty, torch.empty_like) or (
        is_method(n, "new_zeros", "zero_")
    )


def column(n: Node) -> Node | None:
    """``w.unsqueeze(-1)``, ``w[:, None]``, ``w.reshape(-1, 1)``/``view`` -> ``w``."""
    n = strip_casts(n)
    if is_method(n, "unsqueeze") and n.args[1] in (-1, 1, val(n.args[0]).dim()):
        return n.args[0]
    if is_method(n, "reshape", "view") and tuple(n.args[1:]) in ((-1, 1),):
        return n.args[0]
    if n.target is operator.getitem and n.args[1] in (
        (slice(None), None),
        (slice(None, None, None), None),
        (Ellipsis, None),
    ):
        return n.args[0]
    return None


def _split_mul(n: Node) -> tuple[Node, Node] | None:
    if is_call(n, operator.mul, torch.mul) or is_method(n, "mul"):
        a, b = n.args[0], n.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return a, b
    return None


def strip_row_weight(z: Node, w_sorted: Node | None, seen: list[Node]) -> tuple[Node, bool]:
    """``((y.float() * w_sorted[:, None]).to(dt)`` -> ``(y, True)``; records the nodes walked."""
    applied = False
    n = z
    while True:
        if is_cast(n):
            seen.append(n)
            n = n.args[0]
            continue
        ab = _split_mul(n)
        if ab is not None and w_sorted is not None and not applied:
            for mine, other in (ab, ab[::-1]):
                col = column(mine)
                if col is not None and strip_casts(col) is w_sorted:
                    seen.extend(input_chain(mine, w_sorted))
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
        if is_cast(u) and isinstance(val(u), torch.Tensor) and val(u).shape == val(output).shape:
            seen.append(output)
            return u
    return output


def input_chain(top: Node, bottom: Node) -> list[Node]:
    """Single-input nodes from ``top`` down to ``bottom`` (exclusive)."""
    out = []
    while top is not bottom and isinstance(top, Node):
        out.append(top)
        top = top.args[0]
    return out


class Walk:
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
        n = strip_casts(n)
        if self.sorted_vals is not None and n is self.sorted_vals:
            return True
        return unflatten(n) is self.topk_idx

    def leaf_kind(self, n: Node) -> str | None:
        if self.sorted_vals is not None and strip_casts(n) is self.sorted_vals:
            return "row_ids"
        e = self.counts_experts(n)
        if e is not None:
            return "counts" if self.set_experts(e) is None else None
        return None

    def counts_experts(self, n: Node) -> int | None:
        """E when ``n`` is the per-expert row counts ``[E]`` of this block's ids, else None."""
        chain = [n]
        if is_call(n, torch.histc):
            bins = n.kwargs.get("bins", n.args[1] if len(n.args) > 1 else 100)
            lo = n.kwargs.get("min", n.args[2] if len(n.args) > 2 else 0)
            hi = n.kwargs.get("max", n.args[3] if len(n.args) > 3 else 0)
            if lo == 0 and hi in (bins - 1, bins) and self.is_ids(n.args[0]):
                self.counts_chain.update(chain + input_chain(n.args[0], unflatten(n.args[0])))
                return bins
            return None
        if is_call(n, torch.bincount) or is_method(n, "bincount"):
            e = n.kwargs.get("minlength", n.args[2] if len(n.args) > 2 else 0)
            weights = n.kwargs.get("weights", n.args[1] if len(n.args) > 1 else None)
            if e and weights is None and self.is_ids(n.args[0]):
                self.counts_chain.update(chain + input_chain(n.args[0], unflatten(n.args[0])))
                return e
            return None
        if is_method(n, "sum") and arg(n, 1, "dim") == 0:
            onehot = n.args[0]
            while is_cast(onehot):
                chain.append(onehot)
                onehot = onehot.args[0]
            chain.append(onehot)
            if is_call(onehot, F.one_hot) and self.is_ids(onehot.args[0]):
                self.counts_chain.update(chain + input_chain(onehot.args[0], self.topk_idx))
                return arg(onehot, 1, "num_classes")
            if (
                is_method(onehot, "scatter", "scatter_")
                and onehot.args[1] == 1
                and onehot.args[2] is self.topk_idx
                and onehot.args[3] == 1
                and _is_zeros(onehot.args[0])
            ):
                chain.append(onehot.args[0])
                self.counts_chain.update(chain)
                return val(onehot.args[0]).shape[1]
        return None


def tok_uses(u: Node, tok: Node, w: Walk) -> list[tuple[str, Node, Node | None]] | None:
    """What a user of the token index does: ``x[tok]`` / ``index_select`` /
    ``gather(x, 0, tok[:, None].expand(-1, H))`` gather rows; ``index_add`` / ``scatter_add`` by
    the token index are a way back. None when it is neither."""
    if u.target is operator.getitem and u.args[1] is tok:
        return [("gather", u, u.args[0])]
    if (
        (is_method(u, "index_select") or is_call(u, torch.index_select))
        and u.args[1] == 0
        and (u.args[2] is tok)
    ):
        return [("gather", u, u.args[0])]
    if is_method(u, "index_add", "index_add_") or is_call(u, torch.index_add):
        if u.args[1] == 0 and u.args[2] is tok:
            return [("back", u, None)]
        return None
    if not (is_method(u, "reshape", "view", "unsqueeze") and tuple(val(u).shape[1:]) == (1,)):
        return None
    found = []
    for e in u.users:
        if not is_method(e, "expand"):
            return None
        w.seen += [u, e]
        for v in e.users:
            if (is_call(v, torch.gather) or is_method(v, "gather")) and (
                arg(v, 1, "dim") == 0 and arg(v, 2, "index") is e
            ):
                found.append(("gather", v, v.args[0]))
            elif (
                is_method(v, "scatter_add", "scatter_add_") or is_call(v, torch.scatter_add)
            ) and (arg(v, 1, "dim") == 0 and arg(v, 2, "index") is e):
                found.append(("back", v, None))
            else:
                return None
    return found or None


def gathered_rows(
    toks: list[Node], back: list[Node], w_sorted: Node | None, K: int, walk: Walk
) -> tuple[Node, Node] | str:
    """From the users of the token index (``perm // K``, one node or several equal ones): the one
    gather of token rows in the sorted order and what it gathers from, ``(rows, x)``; the
    way-back writes the index also feeds are added to ``back``. A reason when the index has
    another use or the rows are gathered twice."""
    rows = x = None
    for t, u in [(i, u) for i in toks for u in list(i.users)]:
        if u in back:
            continue
        got = tok_uses(u, t, walk)
        if got is None:
            if K == 1 and (u is w_sorted or u.target is operator.setitem):
                continue
            return f"the token index is used by {u.name} ({target_name(u)})"
        for kind, node, src in got:
            if kind == "back":
                back.append(node)
            elif rows is not None:
                return "the rows are gathered twice"
            else:
                rows, x = node, src
    if rows is None:
        return "no gather of token rows by the sorted order"
    walk.seen.append(rows)
    return rows, x


def way_back(node, perm, tok, w_sorted, topk_weights, *, T, K, walk: Walk):
    """Match the way back to the tokens. Returns ``(y, output, base, last_write, topk_weights)``."""
    seen = walk.seen
    if is_method(node, "index_add", "index_add_") or is_call(node, torch.index_add):
        dest, z = node.args[0], node.args[3]
        inplace = node.target == "index_add_"
        return _accumulate(node, dest, z, inplace, w_sorted, topk_weights, seen)
    if is_method(node, "scatter_add", "scatter_add_") or is_call(node, torch.scatter_add):
        dest, z = node.args[0], arg(node, 3, "src")
        inplace = node.target == "scatter_add_"
        return _accumulate(node, dest, z, inplace, w_sorted, topk_weights, seen)
    if node.target is operator.setitem:  # inv[perm] = arange(P)
        inv, src = node.args[0], node.args[2]
        if not (
            is_call(src, torch.arange) and is_call(inv, torch.empty_like, torch.empty, torch.zeros)
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
            or is_method(r, "index_select")
            and r.args[1] == 0
            and r.args[2] is inv
        ):
            z, unperm = r.args[0], r
        else:
            return f"the inverse permutation is used by {r.name}"
        seen.append(unperm)
        readers = list(unperm.users)
    elif is_method(node, "index_copy_", "index_copy"):
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
    if not (is_method(v, "view", "reshape") and tuple(val(v).shape[:2]) == (T, K)):
        return "the unpermuted rows are not viewed as [T, K, H]"
    seen.append(v)
    n = v
    post = None
    while len(n.users) == 1:
        u = next(iter(n.users))
        if is_cast(u):
            seen.append(u)
            n = u
            continue
        ab = _split_mul(u)
        if ab is not None and post is None:
            other = ab[1] if ab[0] is n else ab[0]
            col = column(other)
            if col is None:
                return f"{u.name} scales the unpermuted rows by something other than the weights"
            post = strip_casts(col)
            seen += [u, *input_chain(other, post)]
            n = u
            continue
        break
    u = next(iter(n.users)) if len(n.users) == 1 else None
    if u is None or not (is_method(u, "sum") and arg(u, 1, "dim") in (1, -2)):
        return "the unpermuted rows are not summed over the slots"
    seen.append(u)
    y, applied = strip_row_weight(z, w_sorted, seen)
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
    y, applied = strip_row_weight(z, w_sorted, seen)
    if not applied:
        topk_weights = None
    base = None if _is_zeros(dest) else dest
    if base is None:
        seen.append(dest)
    if inplace and node.users and base is None and set(dest.users) == {node}:
        return y, node, None, None, topk_weights  # zeros(...).index_add_(...) used as it is
    if inplace:
        return y, dest, base, node, topk_weights
    return y, node, base, None, topk_weights


def check_body_node(n: Node) -> str | None:
    why = check_row_op(n)
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
    if is_method(n, "chunk", "split") or is_call(
        n, torch.chunk, torch.split, torch.functional.split, torch.cat
    ):
        dim = arg(n, 2, "dim", 0) if n.target is not torch.cat else arg(n, 1, "dim", 0)
        nd = val(n.args[0][0] if n.target is torch.cat else n.args[0]).dim()
        if dim in (-1, nd - 1):
            return None
        sizes = n.args[0] if n.target is torch.cat else arg(n, 1, "split_size_or_sections")
        if dim == 0 and isinstance(sizes, (list, tuple)):
            return None  # per-expert split/cat; branch_tags checks the lists
        return f"{n.name}: {target_name(n)} along rows"
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
    add_hangers(remove, keep_out=output)
    known = known | _add_dead_ends(remove)
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
            n not in known and not _is_zeros(n) and not hanger(n) and not is_call(n, torch.arange)
        ) and not _anchor_view(n, stop):
            return f"{n.name} ({target_name(n)}) lies inside the block but is not understood"
    return sorted(remove, key=order.get)


def _add_dead_ends(remove: set[Node]) -> set[Node]:
    """Add to ``remove`` the unused tensors computed only for the block (``bins =
    counts.cumsum(0)`` that nothing reads), which would otherwise keep its values alive."""
    added: set[Node] = set()
    stack = list(remove)
    while stack:
        n = stack.pop()
        for u in n.users:
            dead = not u.users and isinstance(val(u), torch.Tensor) and u.op == "call_function"
            pure = dead and not getattr(u.target, "__name__", "_").endswith("_")
            if pure and u not in remove and set(u.all_input_nodes) <= remove:
                remove.add(u)
                added.add(u)
                stack.append(u)
    return added


def _anchor_view(n: Node, stop: set[Node]) -> bool:
    while isinstance(n, Node) and n not in stop:
        if not (is_flatten(n) or is_cast(n)):
            return False
        n = n.args[0]
    return True


def hanger(n: Node) -> bool:
    return not isinstance(val(n), torch.Tensor) and (
        n.target in ASSERTISH or is_method(n, "size", "item", "dim")
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


def weights_and_way_back(back: list[Node], perm, tok, w_sorted, topk_ids: Node, K, walk: Walk):
    """The routing weights (``w_sorted``'s ``[T, K]`` source, or None) and the one way back from
    the expert output to the tokens (:func:`way_back`), as ``(returned, output, base,
    last_write, topk_weights)``; or why not."""
    ids = val(topk_ids)
    topk_weights = None
    if w_sorted is not None:
        topk_weights = unflatten(w_sorted.args[0])
        walk.seen += [w_sorted, *input_chain(w_sorted.args[0], topk_weights)]
        if tuple(val(topk_weights).shape) != tuple(ids.shape):
            return "the sorted weights do not come from a [T, K] tensor like the ids"
    if len(back) != 1:
        return f"expected one way back to the tokens, found {len(back)}"
    got = way_back(back[0], perm, tok, w_sorted, topk_weights, T=ids.shape[0], K=K, walk=walk)
    if isinstance(got, str):
        return got
    returned, output, base, last_write, topk_weights = got
    if last_write is None:
        output = extend_cast(output, walk.seen)
    return returned, output, base, last_write, topk_weights
