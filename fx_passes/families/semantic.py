"""Routing recognised by what it computes, whatever ops lie between (ModuleList experts).

The other families know one spelling each. This one looks for the pieces of the math:

* the router's top-k ids (``topk(...)[1]``, ``argmax`` for top-1: ``graph.router_ids``);
* the experts: a ``ModuleList`` (or ``ModuleDict``) whose entries ``P.0 .. P.{E-1}`` each run
  as one subgraph reading one tensor of rows and giving one tensor (``nn_module_stack``);
* ``x``: the ``[T, H]`` rows every expert's input derives from without depending on the ids;
* the output: the first ``[T, H']`` value that depends on every expert's output, or an
  accumulator that in-place writes (``index_add_``, ``out[idx] += ...``, ``index_put_``,
  ``scatter_add_``) fill with them;

and then forms hypotheses ``output = base + sum_k w[t, k] * expert_{ids[t, k]}(x[t])`` for each
``[T, K]`` floating value ``w`` of the block (the top-k values, renormalised or softmaxed
weights, ...; four at most) and for no weights at all. The numerical check
(``verify.verify_match``: random routing, random weights, a skewed routing too) decides; the
first confirmed hypothesis is the match. A block that drops tokens past a per-expert capacity
(a ``cumsum`` of routing positions compared with a capacity: GShard, Switch, fairseq, Tutel,
DeepSpeed) is rejected with the reason: ``moe_ops``' capacity mode caps the rows per rank,
filled expert by expert, which is not the order those blocks drop in.

Shape letters: T tokens, H hidden (H' expert output), K top-k, E experts.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.families._body import add_hangers
from fx_passes.families._guard import each_candidate
from fx_passes.families._routed import (
    CREATE,
    block_and_writes,
    expert_subgraph,
    reach,
    same_shape,
    weight_candidates,
)
from fx_passes.graph import (
    ancestors,
    assert_only_users,
    descendants,
    graph_order,
    is_call,
    is_inplace,
    is_method,
    module_path,
    module_stack_paths,
    prune_removal,
    router_ids,
    val,
)
from fx_passes.match import ExpertSubgraph, ModuleListExperts, MoEMatch, Rejected
from fx_passes.verify import verify_match

FAMILY = "semantic"

_ENTRY = re.compile(r"^(.*?)\.?([A-Za-z_]*?)(\d+)$")
_ZEROS = {torch.zeros, torch.zeros_like, "new_zeros", "zero_"}
# In-place writes of expert outputs into an accumulator (its first argument).
_WRITE_METHODS = {"index_add_", "index_put_", "scatter_add_", "index_copy_", "add_"}
_WRITE_FUNCS = {operator.setitem, torch.Tensor.index_put_}
_COMPARE = {
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    torch.lt,
    torch.le,
    torch.gt,
    torch.ge,
}
_COMPARE_METHODS = {"lt", "le", "gt", "ge"}


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per block whose routing the check confirms (module docstring)."""
    graph = gm.graph
    done = _dispatched_ids(graph)
    ids_nodes = [i for i in router_ids(graph) if i not in done]
    if not ids_nodes:
        return []
    lists = _expert_lists(graph)
    order = graph_order(graph)
    # A block ends before the next router starts (Dynamo keeps program order): bounding the
    # walks there keeps the family linear in the depth of the model.
    routers = router_ids(graph)
    limit = {
        a: (order[b] - 1 if b is not None else None)
        for a, b in zip(routers, [*routers[1:], None], strict=True)
    }
    return each_candidate(
        FAMILY, ids_nodes, lambda i: _match(gm, i, lists, order, limit[i]), rejects
    )


def _dispatched_ids(graph: fx.Graph) -> set[Node]:
    """Router ids that an earlier rewrite already feeds to ``moe_ops`` (and their views)."""
    done: set[Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "moe_ops":
            a = n.args[1] if len(n.args) > 1 else None
            for _ in range(4):
                if not isinstance(a, Node):
                    break
                done.add(a)
                a = a.args[0] if a.args else None
    return done


def _entry(path: str) -> tuple[str, str, int] | None:
    """``(list path, block path, index)`` when ``path`` names entry ``index`` of a ModuleList
    (``experts.3``) or of a ModuleDict keyed like ``expert_3``; else None."""
    head, _, last = path.rpartition(".")
    m = re.fullmatch(r"([A-Za-z_]*?)(\d+)", last)
    if m is None or not head or (m.group(1) and "expert" not in m.group(1).lower()):
        return None
    key = f"{head}.{m.group(1)}" if m.group(1) else head
    return key, _parent(head), int(m.group(2))


def _expert_lists(graph: fx.Graph) -> dict[str, tuple[str, dict[int, list[Node]]]]:
    """``{P: (block path, {e: nodes run by module P.e})}`` for every module list ``P`` with
    entries ``0 .. n-1``, n >= 2, in the graph's module stacks."""
    lists: dict[str, tuple[str, dict[int, list[Node]]]] = {}
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        for path in module_stack_paths(n):
            got = _entry(path)
            if got is not None:
                key, block, e = got
                lists.setdefault(key, (block, {}))[1].setdefault(e, []).append(n)
    return {
        p: (block, d)
        for p, (block, d) in lists.items()
        if len(d) >= 2 and sorted(d) == list(range(len(d)))
    }


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _match(gm: fx.GraphModule, ids: Node, lists, order, limit) -> MoEMatch | str | None:
    got = _match_within(gm, ids, lists, order, limit)
    if limit is not None and not isinstance(got, MoEMatch):
        # routers interleaved (or two in one block): the block may end after the next router
        wider = _match_within(gm, ids, lists, order, None)
        got = wider if isinstance(wider, MoEMatch) or got is None else got
    return got


def _match_within(gm, ids: Node, lists, order, limit) -> MoEMatch | str | None:
    routed = reach(ids, order, limit)
    why = _capacity_drop(ids, routed)
    if why is not None:
        return why
    here = module_path(ids)
    found_list = None
    for path in sorted(lists, key=len, reverse=True):
        block, entries = lists[path]
        nodes = [n for group in entries.values() for n in group]
        if any(n in routed for n in nodes) and here.startswith(block):
            found_list = path, block, entries
            break
    if found_list is None:
        return None
    path, block, entries = found_list
    E = len(entries)
    experts = []
    for e in range(E):
        sub = expert_subgraph(e, entries[e])
        if isinstance(sub, str):
            return f"expert {e} ({path}.{e}): {sub}"
        experts.append(sub)
    if any(sub.input not in routed for sub in experts):
        return "an expert's input does not depend on the router's ids"
    x = _token_rows(ids, experts, routed, order)
    if x is None:
        return "no [T, H] rows that every expert's input is gathered from"
    found = _output(ids, experts, routed, order, limit)
    if isinstance(found, str):
        return found
    output, last_write, writes, base = found
    if any(_is_collective(n) for n in ancestors([output, *writes]) & (routed | {output})):
        return None  # hand-written expert parallelism: the check cannot run it in one process
    why_not = None
    end = order[last_write if last_write is not None else output]
    # in-place writes the block does on its way (later blocks' writes are not its own)
    inplace = [u for u in routed if is_inplace(u) and order[u] <= end]
    candidates = weight_candidates(ids, experts, output, [*writes, *inplace], routed, order, end)
    for w in candidates:
        remove = _removal(ids, x, w, experts, output, last_write, writes, base, routed, end, order)
        if isinstance(remove, str):
            why_not = why_not or remove
            continue
        match = MoEMatch(
            family=FAMILY,
            module_path=block,
            num_experts=E,
            x=x,
            topk_idx=ids,
            topk_weights=w,
            output=output,
            remove=remove,
            body=ModuleListExperts(experts),
            base=base,
            last_write=last_write,
        )
        got = verify_match(gm, match)
        if got is None:
            return match
        weights = "no weights" if w is None else f"weights {w.name}"
        why_not = why_not or f"with {weights}: {got}"
    return (
        f"the block is not sum_k w[t, k] * expert_ids[t, k](x[t]) for its router's ids "
        f"({ids.name}) under any weights tried (first: {why_not})"
    )


def _is_collective(n: Node) -> bool:
    """A ``torch.distributed`` collective (functional, or an autograd function around one)."""
    if n.op != "call_function":
        return False
    ns = getattr(n.target, "namespace", None) or getattr(n.target, "__module__", "") or ""
    name = getattr(n.target, "__name__", "")
    return "c10d" in ns or "distributed" in ns or name == "autograd_function_apply"


def _capacity_drop(ids: Node, routed: set[Node]) -> str | None:
    """Why the block drops tokens past a per-expert capacity (a ``cumsum`` of routing values
    compared with a bound), or None."""
    order = graph_order(ids.graph)
    for n in sorted(routed, key=order.get):
        if not (is_call(n, torch.cumsum) or is_method(n, "cumsum")) or val(n).dim() < 2:
            continue
        for u in descendants(n):
            compare = is_call(u, *_COMPARE) or is_method(u, *_COMPARE_METHODS)
            if compare and isinstance(val(u), torch.Tensor):
                return (
                    f"tokens past an expert's capacity are dropped ({n.name}: positions by "
                    f"cumsum, compared at {u.name}): a per-expert capacity in token order. "
                    f"moe_ops' capacity mode (overflow='drop') caps the rows a rank receives, "
                    f"filled expert by expert, so it would drop other tokens"
                )
    return None


def _token_rows(ids: Node, experts: list[ExpertSubgraph], routed, order) -> Node | None:
    """The latest ``[T, H]`` floating value every expert input derives from, not routed."""
    T = val(ids).shape[0]
    H = val(experts[0].input).shape[-1]
    common = ancestors([experts[0].input])
    for sub in experts[1:]:
        common &= ancestors([sub.input])
    routed = routed | {ids}
    found = [
        n
        for n in common or ()
        if n not in routed
        and isinstance(val(n), torch.Tensor)
        and val(n).is_floating_point()
        and same_shape(val(n).shape, (T, H))
    ]
    return max(found, key=order.get) if found else None


def _output(ids: Node, experts: list[ExpertSubgraph], routed: set[Node], order, limit):
    """``(output, last_write, writes, base)``: the routed sum, or why none was found."""
    outs = [sub.output for sub in experts]
    T = val(ids).shape[0]
    H_out = val(outs[0]).shape[-1]
    reaches = [reach(o, order, limit) for o in outs]
    # in-place writes of expert outputs into one accumulator
    writes: dict[Node, list[Node]] = {}
    for n in set().union(*reaches):
        if is_method(n, *_WRITE_METHODS) or is_call(n, *_WRITE_FUNCS):
            acc = n.args[0]
            if isinstance(acc, Node) and acc not in routed:
                writes.setdefault(acc, []).append(n)
    for acc, ws in writes.items():
        written = set().union(*(ancestors([w]) for w in ws))
        if all(o in written for o in outs) and _is_rows(acc, T, H_out):
            ws.sort(key=order.get)
            base = None if _is_zeros(acc) else acc
            return acc, ws[-1], ws, base
    joins = set.intersection(*reaches)
    for n in sorted(joins, key=order.get):
        if _is_rows(n, T, H_out):
            return n, None, [], None
    return "no [T, H'] value that every expert's output reaches"


def _is_rows(n: Node, T, H) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point() and same_shape(v.shape, (T, H))


def _is_zeros(n: Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _ZEROS


def _removal(ids, x, w, experts, output, last_write, writes, base, routed, end, order):
    """What the rewrite deletes: everything routed, weighted or run by the experts on the way
    to the output (in-place writes included), minus what something else still reads."""
    upstream = ancestors([output, *writes])
    expert_nodes = {n for sub in experts for n in sub.nodes}
    weighted = reach(w, order, end) if w is not None else set()
    inside = {n for n in routed | expert_nodes | weighted if order[n] <= end}
    candidates = block_and_writes(upstream, inside, writes, output, base)
    # values made for the block from nothing or only from shapes (``arange(P)``,
    # ``zeros_like(scores)``) that only the block reads
    changed = True
    while changed:
        changed = False
        for n in {a for c in candidates for a in c.all_input_nodes} - candidates:
            made_here = n.op in ("call_function", "call_method") and not is_inplace(n)
            inputs_in = set(n.all_input_nodes) <= candidates or n.target in CREATE
            if made_here and set(n.users) <= candidates and inputs_in:
                candidates.add(n)
                changed = True
    for n in list(candidates):
        candidates.update(assert_only_users(n))
    add_hangers(candidates)
    candidates -= {ids, x, w, base} | ancestors([x])
    remove, why = prune_removal(candidates, output, last_write)
    if why:
        return why
    kept = set(remove)
    for sub in experts:
        if any(n not in kept for n in sub.nodes):
            return f"expert {sub.expert}'s output is used outside the block"
    return remove
