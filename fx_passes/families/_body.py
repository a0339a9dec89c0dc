"""Shared pieces of the matchers whose experts run on rows grouped by expert (families B, D, E).

These families have one expert computation ("the body") that reads rows sorted or grouped by
expert, stacked ``[E, ...]`` parameters, the per-expert row counts (or their offsets, or their
``.tolist()`` items), and sometimes the expert id of every row. :class:`Body` collects those
nodes from the original graph and knows how to copy them onto ``recv_x`` (rows of this rank's
local experts) with the parameters sliced to the local experts, the counts replaced by
``tokens_per_expert`` and per-expert loops (``split`` + one branch per expert + ``cat``, or
segments ``rows[offs[e]:offs[e + 1]]`` of row offsets made from the counts) cut to the ``E_l``
local branches. Values baked from the block's sizes under static shapes are made from
``recv_x``'s rows (``zeros(P, H)``, ``arange(P)``, ``full((P + c,), -1)``) and ``E_l``
(``arange(E)``, ``counts.view(1, E)``, ``w.view(E, I, H)`` of a 2-D ``[E * I, H]`` weight).
:func:`check_local_experts` checks, on random rows, that a body copied so computes on each
rank's experts what it computes on all of them (the families run it on bodies the structure
alone does not vouch for).

Shape letters: T tokens, H hidden, K top-k, E experts, E_l local experts, P = T * K pairs,
R rows received by this rank.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx import Node

from fx_passes.experts import host_counts
from fx_passes.graph import (
    ASSERTISH,
    ROWWISE_FUNCS,
    ROWWISE_METHODS,
    arg,
    call,
    grouped_mm_fallback_op,
    is_call,
    is_cast,
    is_method,
    is_param_like,
    target_name,
    val,
)

# Ops that map each row to a row (or select per-expert parameters): safe to run on any subset
# of rows. Anything else in an expert body makes the matcher leave the block alone.
_ROW_FUNCS = ROWWISE_FUNCS | {
    torch._C._nn.linear,
    F.linear,
    torch.matmul,
    torch.mm,
    torch._grouped_mm,
    F.glu,
    F.layer_norm,
    F.dropout,
    torch.chunk,
    torch.split,
    torch.functional.split,
    torch.cat,
    operator.getitem,
    torch.sym_sum,
    operator.matmul,
}


_ROW_METHODS = ROWWISE_METHODS | {"chunk", "split", "add_", "mul_", "clamp_", "mean", "sum"}


def add_hangers(remove: set[Node], keep_out: Node | None = None) -> None:
    """Add to ``remove`` the nodes that only check removed values (Dynamo's runtime asserts,
    ``sym_size``, ``size()[i]``) and in-place writes into removed tensors with no users."""
    changed = True
    while changed:
        changed = False
        for n in list(remove):
            for u in n.users:
                if u in remove or u is keep_out:
                    continue
                if _dead_end(u, remove):
                    remove.add(u)
                    changed = True


def _dead_end(u: Node, remove: set[Node], depth: int = 0) -> bool:
    if depth > 8 or u.op != "call_function" and not is_method(u, "size", "item", "dim"):
        return False
    if u.op == "call_function" and u.target not in ASSERTISH:
        return False
    if isinstance(val(u), torch.Tensor):
        return False
    for w in u.users:
        if w not in remove and not _dead_end(w, remove, depth + 1):
            return False
    for w in list(u.users):
        remove.add(w)
    return True


@dataclasses.dataclass
class Body:
    """The expert computation of a sorted/grouped block, ready to copy onto ``recv_x``.

    ``rows``: the node of rows grouped by expert (``[P, H]``) the body reads.
    ``out``: the body's result (``[P, H']``) before any routing weight.
    ``nodes``: every node to copy, in graph order (body and its support: parameter views,
    offsets, ``tolist`` items); ``counts``: nodes whose value is the per-expert row counts
    (replaced by ``tokens_per_expert`` cast to their dtype); ``row_ids``: nodes whose value is the
    expert id of every row (replaced by the local expert ids); ``params``: stacked ``[E, ...]``
    parameters; ``branch``: per-expert branch of a node (``split`` + loop bodies), if any.
    """

    rows: Node
    out: Node
    nodes: list[Node]
    counts: list[Node]
    row_ids: list[Node]
    params: list[Node]
    branch: dict[Node, int]
    num_experts: int
    rewrite: dict[Node, Callable] = dataclasses.field(default_factory=dict)

    def emit(self, graph: fx.Graph, recv_x: Node, tpe: Node, local_params: list[Node]) -> Node:
        """Copy the body onto ``recv_x`` (rows grouped by local expert, ``tpe`` rows each)."""
        e_l = val(tpe).shape[0]
        env: dict[Node, Node] = {self.rows: recv_x}
        env.update(zip(self.params, local_params, strict=True))
        for c in self.counts:
            env[c] = call(graph, "to", (tpe, val(c).dtype))
        if self.row_ids:
            rows = call(graph, "size", (recv_x, 0))
            # repeat_interleave(repeats) == repeat_interleave(arange(E_l), repeats)
            local_ids = call(graph, torch.repeat_interleave, (tpe,), {"output_size": rows})
            for r in self.row_ids:
                env[r] = call(graph, "to", (local_ids, val(r).dtype))

        def lookup(a):
            if isinstance(a, Node):
                return env[a]
            if isinstance(a, (list, tuple)) and any(
                isinstance(x, Node) and x in self.branch for x in a
            ):
                kept = [x for x in a if not (isinstance(x, Node) and self.branch.get(x, -1) >= e_l)]
                return type(a)(lookup(x) for x in kept)
            if isinstance(a, (list, tuple)):
                return type(a)(lookup(x) for x in a)
            if isinstance(a, dict):
                return {k: lookup(x) for k, x in a.items()}
            if isinstance(a, slice):
                return slice(lookup(a.start), lookup(a.stop), lookup(a.step))
            return a

        host: dict[Node, Node] = {}

        def on_host(a) -> Node | None:
            """The CPU copy of a counts node or of ``counts[j]`` (dispatch read the counts
            already: no second sync); None for anything else."""
            if not isinstance(a, Node):
                return None
            if a in self.counts:
                if a not in host:
                    host[a] = call(graph, "to", (host_counts(tpe), val(a).dtype))
                return host[a]
            if a.target is operator.getitem and isinstance(a.args[1], int):
                c = on_host(a.args[0])
                return None if c is None else call(graph, operator.getitem, (c, a.args[1]))
            return None

        for n in self.nodes:
            if n in env or self.branch.get(n, -1) >= e_l:
                continue
            if n.op == "call_method" and n.target in ("item", "tolist") and not n.kwargs:
                h = on_host(n.args[0])
                if h is not None:  # a host read of the counts
                    env[n] = call(graph, n.target, (h,))
                    continue
            if n in self.rewrite:
                env[n] = self.rewrite[n](graph, lookup, tpe)
                continue
            env[n] = call(graph, n.target, lookup(n.args), lookup(n.kwargs))
        return env[self.out]


def body_region(rows: Node, out: Node) -> list[Node] | None:
    """Nodes on a path from ``rows`` to ``out`` plus in-place writes into them, graph order.

    A path may go through a fresh buffer that the body fills in place (``out = zeros(P, H')``,
    ``out[lo:hi] = rows[lo:hi] @ W[e]``): the buffer and its writes are part of the body.
    """
    graph = rows.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    fwd: set[Node] = set()
    stack = [rows]
    while stack:
        n = stack.pop()
        nxt = list(n.users)
        buf = _written_buffer(n)
        if buf is not None and n is not rows:
            nxt += [buf] + [u for u in buf.users if order[u] > order[n]]
        for u in nxt:
            if u not in fwd:
                fwd.add(u)
                stack.append(u)
    if out is not rows and out not in fwd:
        return None
    back: set[Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in back or n is rows:
            continue
        back.add(n)
        stack.extend(a for a in n.all_input_nodes if a in fwd)
        stack.extend(u for u in n.users if u in fwd and _written_buffer(u) is n)
    keep = fwd & back
    # In-place writes (``out.add_(bias)``) into body values that a later body node reads.
    for n in list(keep):
        for u in n.users:
            inplace = u.op == "call_method" and u.target.endswith("_")
            if inplace and not u.target.endswith("__") and u.args and u.args[0] is n:
                keep.add(u)
    return [n for n in graph.nodes if n in keep]


_FRESH = {torch.zeros, torch.empty, torch.full, torch.ones, torch.zeros_like, torch.empty_like}
_FRESH_METHODS = {"new_zeros", "new_empty", "new_full", "new_ones"}


def _written_buffer(n: Node) -> Node | None:
    """The fresh buffer (``zeros``, ``new_empty``, ...) that ``n`` writes rows into in place
    (``buf[lo:hi] = v``, ``buf.index_copy_(...)``), else None."""
    if n.target is operator.setitem or (
        n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__")
    ):
        buf = n.args[0] if n.args else None
        if isinstance(buf, Node) and (is_call(buf, *_FRESH) or is_method(buf, *_FRESH_METHODS)):
            return buf
    return None


_SIZED = (torch.zeros, torch.empty, torch.full, torch.ones, torch.arange)


def _first_size(n: Node) -> tuple[tuple, int | None]:
    """``(size, first)``: the size argument of a creation op (its first dim ``first``)."""
    if is_call(n, torch.repeat_interleave):
        return (), n.kwargs.get("output_size")
    if not (is_call(n, *_SIZED) or is_method(n, *_FRESH_METHODS)):
        return (), None
    if is_call(n, torch.arange) and len(n.args) != 1:
        return (), None
    size = n.args[1:] if n.op == "call_method" else n.args
    if size and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    first = size[0] if size else None
    ok = isinstance(first, int) and not isinstance(first, bool)
    return size, first if ok else None


def _size_arith(n: Node, P: int) -> int | None:
    """The position of an int ``>= P`` in ``c - s`` / ``s + c`` on a size ``s`` (a SymInt)."""
    v = val(n)
    scalar = isinstance(v, torch.SymInt) or (
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()
    )
    if not is_call(n, operator.sub, operator.add) or not scalar:
        return None
    for i, a in enumerate(n.args[:2]):
        if isinstance(a, int) and not isinstance(a, bool) and a >= P:
            return i
    return None


def first_size(n: Node) -> int | None:
    """The first size of a creation op (see :func:`is_fresh_rows`), or None."""
    return _first_size(n)[1]


def is_row_like(n: Node) -> bool:
    """``t.new_zeros(H)`` (and the like) of ``t``'s width: one row, not a row count."""
    v, src = val(n), val(n.args[0]) if n.args else None
    return (
        is_method(n, *_FRESH_METHODS)
        and isinstance(v, torch.Tensor)
        and v.dim() == 1
        and isinstance(src, torch.Tensor)
        and src.dim() >= 1
        and first_size(n) == src.shape[-1]
    )


def is_fresh_rows(n: Node, rows: Node) -> bool:
    """A value made in the body (a buffer, ``arange``, ``repeat_interleave(..., output_size=)``,
    a size ``P + c - s``) whose first size is the number of grouped rows ``P`` plus a constant,
    baked in under static shapes: the rewrite makes it from ``recv_x``'s row count."""
    P = val(rows).shape[0]
    if not isinstance(P, int) or P <= 0:
        return False
    first = _first_size(n)[1]
    return (first is not None and first >= P) or _size_arith(n, P) is not None


def fresh_rows_emitter(n: Node, rows: Node) -> Callable:
    """A ``Body.rewrite`` entry making ``n`` (see :func:`is_fresh_rows`) with ``recv_x``'s rows."""
    P = val(rows).shape[0]
    size, first = _first_size(n)
    at = _size_arith(n, P)
    if at is not None:
        first = n.args[at]

    def emit(graph: fx.Graph, lookup, tpe: Node) -> Node:
        r = call(graph, "size", (lookup(rows), 0))
        if first != P:
            r = call(graph, operator.add, (r, first - P))
        args, kwargs = lookup(n.args), lookup(n.kwargs)
        if at is not None:
            return call(graph, n.target, tuple(r if i == at else a for i, a in enumerate(args)))
        if is_call(n, torch.repeat_interleave):
            return call(graph, n.target, args, {**kwargs, "output_size": r})
        if is_call(n, torch.arange):
            return call(graph, n.target, (r,), kwargs)
        new_size = (r, *lookup(tuple(size[1:])))
        if n.op == "call_method":  # t.new_zeros((P, H)) or t.new_zeros(P, H)
            nested = len(n.args) > 1 and isinstance(n.args[1], (tuple, list))
            rest = tuple(args[2:]) if nested else ()
            return call(graph, n.target, (args[0], new_size, *rest), kwargs)
        nested = isinstance(n.args[0], (tuple, list))  # torch.full((P,), v) or torch.zeros(P, H)
        rest = tuple(args[1:]) if nested else ()
        return call(graph, n.target, (new_size, *rest), kwargs)

    return emit


def check_row_op(n: Node) -> str | None:
    """None when ``n`` is known to act row by row (or to select parameters), else why not."""
    if n.op == "call_method":
        if n.target not in _ROW_METHODS:
            return f"{n.name}: method {n.target} is not known to act row by row"
        if n.target in ("sum", "mean"):
            dim = arg(n, 1, "dim")
            if dim not in (-1, val(n.args[0]).dim() - 1):
                return f"{n.name}: {n.target} over dim {dim}, not the last dim"
        return None
    if n.op != "call_function":
        return f"{n.name}: {n.op} in the expert body"
    fallback = grouped_mm_fallback_op()
    if n.target in _ROW_FUNCS or (
        fallback is not None and n.target in (fallback, fallback.default)
    ):
        return None
    return f"{n.name}: {target_name(n)} is not known to act row by row"


_SUPPORT_METHODS = {"transpose", "t", "contiguous", "select", "item", "cumsum", "size"}


def collect_support(
    body: list[Node],
    rows: Node,
    leaf_kind: Callable[[Node], str | None],
    replaced: Iterable[Node] = (),
) -> tuple[list[Node], list[Node], list[Node], list[Node]] | str:
    """Classify what the body reads from outside itself.

    ``leaf_kind(node)`` names routing values the rewrite replaces: ``"counts"`` (per-expert row
    counts ``[E]``) or ``"row_ids"`` (expert id of every grouped row). Returns ``(support,
    counts, row_ids, params)``: ``support`` are views/casts/selections of parameters and values
    derived from the counts (offsets, ``tolist`` items, their sums), copied with the body; or
    why the body reads something else. ``replaced`` are body nodes the caller emits itself
    (their inputs are not walked).
    """
    replaced = set(replaced)
    inside = set(body) | {rows} | replaced
    support: list[Node] = []
    counts: list[Node] = []
    row_ids: list[Node] = []
    params: list[Node] = []
    seen: set[Node] = set()

    def visit(a: Node) -> str | None:
        if a in inside or a in seen:
            return None
        seen.add(a)
        kind = leaf_kind(a)
        if kind == "counts":
            counts.append(a)
            return None
        if kind == "row_ids":
            row_ids.append(a)
            return None
        if is_param_like(a):
            if isinstance(val(a), torch.Tensor):
                params.append(a)
                return None
            return f"the expert body reads {a.name}, which is not a tensor parameter"
        if (
            is_cast(a)
            or is_method(a, *_SUPPORT_METHODS)
            or is_call(a, torch.transpose, torch.cumsum, torch.sym_sum, operator.add)
            or (a.target is operator.getitem and isinstance(a.args[1], (int, Node)))
        ):
            # bias[row_ids]: a per-row selection of a stacked parameter
            if (
                a.target is operator.getitem
                and isinstance(a.args[1], Node)
                and (leaf_kind(a.args[1]) != "row_ids" or not is_param_like(a.args[0]))
                and not _counts_like(a)
            ):
                return f"the expert body reads {a.name}, an indexing it does not understand"
            for b in a.all_input_nodes:
                why = visit(b)
                if why is not None:
                    return why
            support.append(a)
            return None
        if _counts_like(a) or (is_method(a, "view", "reshape") and is_param_like(a.args[0])):
            # values computed from the counts alone (row offsets, padded sizes, an index filled
            # in place), and stacked parameters viewed per expert (``w.view(E, I, H)``; the
            # caller checks the view)
            writes = [u for u in a.users if u not in inside and _written_buffer(u) is a]
            for b in a.all_input_nodes + [c for u in writes for c in u.all_input_nodes]:
                why = visit(b)
                if why is not None:
                    return why
            support.append(a)
            support.extend(u for u in writes if u not in seen and not seen.add(u))
            return None
        return f"the expert body reads {a.name} ({target_name(a)}), which it does not understand"

    for n in body:
        if n in replaced:
            continue
        for a in n.all_input_nodes:
            why = visit(a)
            if why is not None:
                return why
    order = {n: i for i, n in enumerate(rows.graph.nodes)}
    support.sort(key=order.get)
    return support, counts, row_ids, params


def beyond_plain_support(a: Node) -> bool:
    """A support node only the counts-like rule of :func:`collect_support` accepts."""
    return not (
        is_cast(a)
        or is_method(a, *_SUPPORT_METHODS)
        or is_call(a, torch.transpose, torch.cumsum, torch.sym_sum, operator.add)
        or a.target is operator.getitem
    )


def expert_views(params: list[Node], support: list[Node], num_experts: int) -> dict | str:
    """``Body.rewrite`` entries for stacked parameters stored 2-D and viewed per expert
    (``w[E * I, H].view(E, I, H)``): on this rank's ``[E_l * I, H]`` rows the view takes ``E_l``.
    Or why a parameter is not stacked per expert."""
    views: dict[Node, Callable] = {}
    for p in params:
        pv = val(p)
        rows = pv.shape[0] if pv.dim() else None
        if rows == num_experts:
            continue
        uses = [n for n in support if p in n.all_input_nodes]
        ok = isinstance(rows, int) and rows % num_experts == 0 and uses
        for n in uses:
            shape = n.args[1:]
            if shape and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            ok = ok and (
                is_method(n, "view", "reshape")
                and n.args[0] is p
                and len(shape) >= 2
                and shape[0] == num_experts
                and val(n).shape[0] == num_experts
            )
            if ok:
                views[n] = _local_view(n, tuple(shape))
        if not ok:
            return f"{p.name} is not stacked per expert ([{num_experts}, ...] or viewed so)"
    return views


def expert_sized(nodes: list[Node], num_experts: int) -> dict[Node, Callable]:
    """``Body.rewrite`` entries for integer bookkeeping sized by the number of experts under
    static shapes (``arange(E)``, ``counts.view(1, E)``, ``zeros(E + 1)``): on a rank they take
    ``E_l``. The caller's check on split experts confirms them."""
    out: dict[Node, Callable] = {}
    for n in nodes:
        if not _counts_like(n) or not isinstance(val(n), torch.Tensor):
            continue
        if is_method(n, "view", "reshape") and isinstance(val(n.args[0]), torch.Tensor):
            shape = n.args[1:]
            if shape and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if shape.count(num_experts) == 1:
                at = 1 + shape.index(num_experts)
                out[n] = _with_local_experts(n, (n.args[0], *shape), at, num_experts)
        elif is_call(n, torch.arange, torch.zeros, torch.ones, torch.empty) and (
            len(n.args) == 1 and n.args[0] in (num_experts, num_experts + 1)
        ):
            out[n] = _with_local_experts(n, n.args, 0, num_experts)
    return out


def _with_local_experts(n: Node, args: tuple, at: int, num_experts: int) -> Callable:
    """Emit ``n`` with ``args[at]`` (``E`` or ``E + 1``) taken for this rank's ``E_l``."""

    def emit(graph: fx.Graph, lookup, tpe: Node) -> Node:
        new = list(lookup(args))
        new[at] = args[at] - num_experts + val(tpe).shape[0]
        return call(graph, n.target, tuple(new), lookup(n.kwargs))

    return emit


def _local_view(n: Node, shape: tuple) -> Callable:
    def emit(graph: fx.Graph, lookup, tpe: Node) -> Node:
        e_l = val(tpe).shape[0]
        return call(graph, n.target, (lookup(n.args[0]), e_l, *shape[1:]))

    return emit


def check_local_experts(body: Body) -> str | None:
    """None when ``body`` on rows grouped by expert equals, for every split of the experts into
    W equal groups (W dividing E), the bodies of each group run on that group's rows with that
    group's parameter rows; else why not. Random rows, counts and parameters (``rows`` rows),
    every group's rows in their own run: this is what each rank of an expert-parallel rewrite
    runs, and the W = 1 check of the block does not run it."""
    E = body.num_experts
    gen = torch.Generator().manual_seed(0)
    rv = val(body.rows)
    # more rows than the block had (a rank may receive more), and not a multiple of E
    P = rv.shape[0]
    rows = (P if isinstance(P, int) else 8) + 5
    H = rv.shape[-1]
    if not isinstance(H, int):
        return "cannot check the experts: the rows' width is symbolic"
    counts = torch.bincount(torch.randint(0, E, (rows,), generator=gen), minlength=E)
    x = torch.randn(rows, H, generator=gen).to(rv.dtype)
    params = []
    for p in body.params:
        pv = val(p)
        if any(not isinstance(d, int) for d in pv.shape):
            return f"cannot check the experts: {p.name} has a symbolic shape"
        t = torch.randn(tuple(pv.shape), generator=gen) * 0.5
        params.append(t.to(pv.dtype) if pv.dtype.is_floating_point else t.to(pv.dtype) * 0)

    def run(e_l: int, x_part, counts_part, params_part):
        g = fx.Graph()
        r = g.placeholder("rows")
        tpe = g.placeholder("tokens_per_expert")
        tpe.meta["val"] = torch.zeros(e_l, dtype=torch.int64)
        ps = [g.placeholder(f"p{i}") for i in range(len(params_part))]
        g.output(body.emit(g, r, tpe, ps))
        with torch.no_grad():
            return fx.GraphModule(torch.nn.Module(), g)(x_part, counts_part, *params_part)

    try:
        whole = run(E, x, counts, params)
    except Exception as e:  # noqa: BLE001 - a body that cannot run on other rows is an answer
        return (
            f"the expert computation does not run on {rows} rows grouped by expert "
            f"({type(e).__name__}: {e}); it may hard-code the number of rows (static shapes)"
        )
    offs = [0, *torch.cumsum(counts, 0).tolist()]
    for W in (w for w in range(2, E + 1) if E % w == 0):
        e_l = E // W
        parts = []
        for r in range(W):
            lo, hi = r * e_l, (r + 1) * e_l
            mine = []
            for t in params:
                m = t.shape[0] // E
                mine.append(t[lo * m : hi * m])
            try:
                parts.append(run(e_l, x[offs[lo] : offs[hi]], counts[lo:hi], mine))
            except Exception as e:  # noqa: BLE001
                return (
                    f"the expert computation fails on {e_l} of the {E} experts "
                    f"({type(e).__name__}: {e}): it cannot run on one rank's experts"
                )
        got = torch.cat(parts)
        if got.shape != whole.shape or not torch.allclose(got, whole, rtol=1e-4, atol=1e-4):
            return (
                f"the expert computation on the experts split over {W} ranks differs from the "
                f"whole: it reads more than each expert's own rows and weights"
            )
    return None


def _counts_like(n: Node) -> bool:
    """An integer value (tensor, list or scalar) made by a call: row offsets and the like."""
    if n.op not in ("call_function", "call_method"):
        return False
    v = val(n)
    if isinstance(v, torch.Tensor):
        return not v.dtype.is_floating_point and not v.dtype.is_complex
    if isinstance(v, (list, tuple)):
        return all(isinstance(x, (int, torch.SymInt)) for x in v)
    return isinstance(v, (int, torch.SymInt, bool, torch.SymBool))


def branch_tags(
    nodes: list[Node], rows: Node, params: list[Node], counts: list[Node], num_experts: int
) -> dict[Node, float] | str:
    """Per-expert branch of each node in a ``split`` + per-expert loop body.

    ``W[j]`` (a stacked parameter), ``counts[j]`` and ``split(rows, sizes)[j]`` start branch
    ``j``; a node reading branch ``j`` is in branch ``j``; ``cat``/``split``/``sym_sum`` of a
    list with one element per branch ``0..E-1`` in order join the branches again. Row offsets
    made from the counts (``offs = cat([0, counts.cumsum(0)])``, or the inclusive cumsum) give
    boundaries: ``offs[j]`` is boundary ``j`` (tagged ``j - 0.5``, kept while ``j <= E_l``), and a
    node reading boundaries ``j`` and ``j + 1`` (``rows[offs[j]:offs[j + 1]]``) is in branch ``j``.
    Returns why not when a node mixes branches any other way.
    """
    roots = set(params) | set(counts)
    derived: set[Node] = set(roots)
    cumulative: set[Node] = set()
    tags: dict[Node, float] = {}
    for n in nodes:
        ins = n.all_input_nodes
        v = val(n)
        small_const = not ins and isinstance(v, torch.Tensor) and not v.is_floating_point()
        if (ins and all(a in derived for a in ins) or small_const) and (
            n.target is not operator.getitem
        ):
            derived.add(n)
            offsets = is_call(n, torch.cumsum) or is_method(n, "cumsum")
            offsets = offsets or any(a in cumulative for a in ins)
            if offsets and not any(a in params for a in ins):
                cumulative.add(n)
        if n.target is operator.getitem and isinstance(n.args[1], int):
            src = n.args[0]
            if src in cumulative:
                length = _length(src)
                j = n.args[1] + (length == num_experts)
                if length in (num_experts, num_experts + 1) and j >= 0:
                    tags[n] = j - 0.5
                    continue
                return f"{n.name} indexes row offsets of {length} entries for {num_experts} experts"
            if src in derived or _is_row_split(src, tags):
                tags[n] = n.args[1]
                continue
        seen: set[float] = set()
        for a in n.args + tuple(n.kwargs.values()):
            if isinstance(a, slice):
                a = (a.start, a.stop, a.step)
            if isinstance(a, Node) and a in tags:
                seen.add(tags[a])
            elif isinstance(a, (list, tuple)):
                lt = [tags.get(x) for x in a if isinstance(x, Node)]
                joined = any(t is not None for t in lt)
                if joined and any(isinstance(x, slice) for x in a):
                    return f"{n.name} indexes with several per-expert slices"
                if joined and all(isinstance(x, Node) for x in a):
                    if lt != list(range(num_experts)) or len(lt) != len(a):
                        return f"{n.name} joins per-expert branches {lt}, not 0..{num_experts - 1}"
                elif joined:
                    seen.update(t for t in lt if t is not None)
        tag = _one_branch(seen)
        if isinstance(tag, str):
            return f"{n.name} {tag}"
        if tag is not None:
            tags[n] = tag
    return tags


def _one_branch(seen: set[float]) -> float | str | None:
    """The branch of a node reading tags ``seen`` (see :func:`branch_tags`), or why none."""
    if not seen:
        return None
    whole = {t for t in seen if float(t).is_integer()}
    halves = seen - whole
    if len(whole) > 1:
        return f"mixes per-expert branches {sorted(whole)}"
    if whole:
        (b,) = whole
        if not halves <= {b - 0.5, b + 0.5}:
            return f"mixes branch {b} with row offsets {sorted(halves)}"
        return b
    if len(halves) == 1:
        return halves.pop()
    lo, hi = min(halves), max(halves)
    if len(halves) == 2 and hi - lo == 1:
        return int(lo + 0.5)
    return f"reads row offsets {sorted(halves)} of more than one expert"


def _length(n: Node) -> int | None:
    v = val(n)
    if isinstance(v, torch.Tensor) and v.dim() == 1 and isinstance(v.shape[0], int):
        return v.shape[0]
    if isinstance(v, (list, tuple)):
        return len(v)
    return None


def _is_row_split(n: Node, tags: dict[Node, int]) -> bool:
    if not (is_method(n, "split") or is_call(n, torch.split, torch.functional.split)):
        return False
    sizes = arg(n, 1, "split_size_or_sections", n.kwargs.get("split_size"))
    return isinstance(sizes, (list, tuple)) and any(
        isinstance(x, Node) and x in tags for x in sizes
    )
