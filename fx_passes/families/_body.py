"""Shared pieces of the matchers whose experts run on rows grouped by expert (families B, D, E).

These families have one expert computation ("the body") that reads rows sorted or grouped by
expert, stacked ``[E, ...]`` parameters, the per-expert row counts (or their offsets, or their
``.tolist()`` items), and sometimes the expert id of every row. :class:`Body` collects those
nodes from the original graph and knows how to copy them onto ``recv_x`` (rows of this rank's
local experts) with the parameters sliced to the local experts, the counts replaced by
``tokens_per_expert`` and per-expert loops (``split`` + one branch per expert + ``cat``) cut to
the ``E_l`` local branches.

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
    """Nodes on a path from ``rows`` to ``out`` plus in-place writes into them, graph order."""
    fwd: set[Node] = set()
    stack = [rows]
    while stack:
        n = stack.pop()
        for u in n.users:
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
    keep = fwd & back
    # In-place writes (``out.add_(bias)``) into body values that a later body node reads.
    for n in list(keep):
        for u in n.users:
            inplace = u.op == "call_method" and u.target.endswith("_")
            if inplace and not u.target.endswith("__") and u.args and u.args[0] is n:
                keep.add(u)
    graph = rows.graph
    return [n for n in graph.nodes if n in keep]


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
            ):
                return f"the expert body reads {a.name}, an indexing it does not understand"
            for b in a.all_input_nodes:
                why = visit(b)
                if why is not None:
                    return why
            support.append(a)
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


def branch_tags(
    nodes: list[Node], rows: Node, params: list[Node], counts: list[Node], num_experts: int
) -> dict[Node, int] | str:
    """Per-expert branch of each node in a ``split`` + per-expert loop body.

    ``W[j]`` (a stacked parameter), ``counts[j]`` and ``split(rows, sizes)[j]`` start branch
    ``j``; a node reading branch ``j`` is in branch ``j``; ``cat``/``split``/``sym_sum`` of a
    list with one element per branch ``0..E-1`` in order join the branches again. Returns why
    not when a node mixes branches any other way.
    """
    roots = set(params) | set(counts)
    derived: set[Node] = set(roots)
    tags: dict[Node, int] = {}
    for n in nodes:
        ins = n.all_input_nodes
        if ins and all(a in derived for a in ins) and n.target is not operator.getitem:
            derived.add(n)
        if n.target is operator.getitem and isinstance(n.args[1], int):
            src = n.args[0]
            if src in derived or _is_row_split(src, tags):
                tags[n] = n.args[1]
                continue
        seen: set[int] = set()
        for a in n.args + tuple(n.kwargs.values()):
            if isinstance(a, Node) and a in tags:
                seen.add(tags[a])
            elif isinstance(a, (list, tuple)):
                lt = [tags.get(x) for x in a if isinstance(x, Node)]
                joined = any(t is not None for t in lt)
                if joined and (lt != list(range(num_experts)) or len(lt) != len(a)):
                    return f"{n.name} joins per-expert branches {lt}, not 0..{num_experts - 1}"
        if len(seen) > 1:
            return f"{n.name} mixes per-expert branches {sorted(seen)}"
        if seen:
            tags[n] = seen.pop()
    return tags


def _is_row_split(n: Node, tags: dict[Node, int]) -> bool:
    if not (is_method(n, "split") or is_call(n, torch.split, torch.functional.split)):
        return False
    sizes = arg(n, 1, "split_size_or_sections", n.kwargs.get("split_size"))
    return isinstance(sizes, (list, tuple)) and any(
        isinstance(x, Node) and x in tags for x in sizes
    )
