"""What the two by-value matchers (``semantic``, and ``ep``'s ``find_by_value``) share: the reach
of a routed value, an expert's subgraph, same-shape tests, the routing-weight candidates and the
start of the set a rewrite removes."""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fx_passes.graph import (
    ancestors,
    is_inplace,
    is_param_like,
    is_param_slice,
    nodes_between,
    val,
)
from fx_passes.match import ExpertSubgraph

# Values made from nothing or from shapes alone (``arange(P)``, ``zeros_like(scores)``): when
# only the block reads them, they go with it.
CREATE = {
    torch.zeros_like,
    torch.empty_like,
    torch.ones_like,
    torch.full_like,
    torch.zeros,
    torch.empty,
    torch.ones,
    torch.full,
    torch.arange,
    "new_zeros",
    "new_empty",
    "new_ones",
    "new_full",
}


def reach(n: Node, order: dict[Node, int], limit: int | None = None) -> set[Node]:
    """What depends on ``n`` up to graph position ``limit``, through in-place writes too: a
    write of ``n`` into ``t`` (``t[mask] = f(n)``) reaches the readers of ``t`` after it."""
    seen: set[Node] = set()
    stack = [n]
    while stack:
        cur = stack.pop()
        nxt = list(cur.users)
        if is_inplace(cur) and cur.args and isinstance(cur.args[0], Node):
            nxt += [u for u in cur.args[0].users if order[u] > order[cur]]
        for u in nxt:
            if limit is not None and order[u] > limit:
                continue
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def same_shape(a, b) -> bool:
    """Shapes known equal without guarding on data-dependent sizes."""
    return len(a) == len(b) and all(guard_or_false(p == q) for p, q in zip(a, b, strict=True))


def expert_subgraph(e: int, nodes: list[Node]) -> ExpertSubgraph | str:
    """Expert ``e`` as one computation from one tensor of ``[n, H]`` rows to ``[n, H']`` rows,
    or why not."""
    inside = set(nodes)
    inputs = {
        a
        for n in nodes
        for a in n.all_input_nodes
        if a not in inside and not (is_param_like(a) or is_param_slice(a))
    }
    tensors = [a for a in inputs if isinstance(val(a), torch.Tensor)]
    if len(tensors) != 1 or len(inputs) != 1:
        return f"reads {len(inputs)} values besides its parameters, expected one tensor of rows"
    (inp,) = tensors
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outs) != 1 or not isinstance(val(outs[0]), torch.Tensor):
        return f"gives {len(outs)} values, expected one tensor"
    body = nodes_between(inp, outs[0])
    if not body or set(body) != inside:
        return "is not one computation from its rows to its output"
    if val(inp).dim() != 2 or val(outs[0]).dim() != 2:
        return "does not map [n, H] rows to [n, H'] rows"
    return ExpertSubgraph(e, inp, outs[0], body)


def weight_candidates(
    ids: Node, experts, output: Node, writes, routed, order, end: int | None = None
) -> list[Node | None]:
    """``[T, K]`` floating values (``[T]`` or ``[T, 1]`` for top-1) the block reads on its way
    to the output and that no expert computes: four (the latest of those independent of the ids
    first: softmax, renormalised top-k values, before ``scores.gather(1, ids)`` or per-expert
    products such as ``w * (ids == e)``), then no weights."""
    shape = tuple(val(ids).shape)
    T = shape[0]
    want = [shape] + ([(T,), (T, 1)] if len(shape) == 1 or guard_or_false(shape[1] == 1) else [])
    expert_nodes = {n for sub in experts for n in sub.nodes}
    after = set().union(*(reach(sub.output, order, end) for sub in experts))
    found = [
        n
        for n in ancestors([output, *writes])
        if n not in expert_nodes
        and n not in after
        and isinstance(val(n), torch.Tensor)
        and val(n).is_floating_point()
        and any(same_shape(val(n).shape, s) for s in want)
    ]
    found.sort(key=lambda n: (n in routed, -order[n]))
    return [*found[:4], None]


def block_and_writes(
    upstream: set[Node], inside: set[Node], writes: list[Node], output: Node, base
) -> set[Node]:
    """The start of what a rewrite removes: the block's values the output (and the in-place
    ``writes``) read (``upstream & inside``), the writes, the output itself unless it
    accumulates into ``base``, and the in-place writes of block values (``inv[order] =
    arange(P)``, ``y[mask] = expert(...)``) with the tensors they write into when those are made
    for the block."""
    cand = (upstream & inside) | set(writes)
    if base is None:
        cand.add(output)
    stack = list(cand | upstream)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in cand or not (is_inplace(u) and u.args and u.args[0] is n):
                continue
            if n in cand or u in inside:
                new = {u} | (ancestors([u]) & inside)
                stack.extend(new - cand)
                cand |= new
    return cand
