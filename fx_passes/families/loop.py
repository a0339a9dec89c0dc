"""Families A and C: static per-expert loops over a ModuleList of experts.

A (transformers 4.x OLMoE and the like)::

    mask = one_hot(topk_idx, E).permute(2, 1, 0)          # or topk_idx == e, or nonzero()
    for e in range(E):
        k, t = torch.where(mask[e])
        y = experts[e](x[t]) * topk_weights[t, k, None]
        out.index_add_(0, t, y.to(x.dtype))

C (boolean-mask loop)::

    for k in range(K):
        for e in range(E):
            m = topk_idx[:, k] == e
            out[m] += experts[e](x[m]) * topk_weights[m, k, None]

Dynamo unrolls the loops, so the graph holds one write per (expert[, slot]) into an accumulator.
The matcher anchors on ``torch.topk``'s indices, finds the writes into one accumulator whose
index depends on them, and walks back from each written value: an optional cast, a
multiplication by a ``[T, K]`` weight tensor indexed by routing values, the expert's output, and
the rows ``x[...]`` it read. What the indices mean is not derived here: the W = 1 check in
``verify.verify_match`` runs the block against its rewrite and catches a misreading.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.families._guard import each_candidate
from fx_passes.graph import (
    ancestors,
    assert_only_users,
    descendants,
    graph_order,
    is_param_like,
    is_param_slice,
    module_stack_paths,
    nodes_between,
    prune_removal,
    topk_indices,
    val,
)
from fx_passes.match import (
    ExpertSubgraph,
    ModuleListExperts,
    MoEMatch,
    Rejected,
)

_ZEROS = {torch.zeros, torch.zeros_like, "new_zeros", "zero_"}
_CASTS = {"to", "type_as", "float", "half", "bfloat16", "type"}


def _is_index_add(n: Node) -> bool:
    """``acc.index_add(0, index, src)`` / ``torch.index_add(acc, 0, index, src)`` (functional)."""
    return (
        (n.op == "call_method" and n.target == "index_add")
        or (n.op == "call_function" and n.target is torch.index_add)
    ) and len(n.args) >= 4


def _writes(idx: Node, reach: set[Node]) -> dict[Node, list[tuple[Node, Node, str]]]:
    """Accumulator -> [(write node, written value, kind)] for writes indexed by routing.

    ``kind`` is ``"A"`` (in-place ``index_add_``), ``"A-chain"`` (``out = out.index_add(...)``
    repeated: the last one is the routed output) or ``"C"`` (``out[mask] = ...``).
    """
    order = graph_order(idx.graph)
    found: dict[Node, list[tuple[Node, Node, str]]] = {}
    for n in sorted(reach, key=order.get):
        if n.op == "call_method" and n.target == "index_add_" and len(n.args) >= 4:
            acc, dim, index, src = n.args[:4]
            if dim == 0 and index in reach and acc not in reach:
                found.setdefault(acc, []).append((n, src, "A"))
        elif _is_index_add(n) and n.args[0] not in reach:
            acc, chain = n.args[0], [n]
            while len(chain[-1].users) == 1:
                (nxt,) = chain[-1].users
                if not (_is_index_add(nxt) and nxt.args[0] is chain[-1]):
                    break
                chain.append(nxt)
            if all(c.args[1] == 0 and c.args[2] in reach for c in chain):
                found[acc] = [(c, c.args[3], "A-chain") for c in chain]
        elif n.op == "call_function" and n.target is operator.setitem:
            acc, key, value = n.args
            if (
                isinstance(key, Node)
                and key in reach
                and acc not in reach
                and isinstance(value, Node)
            ):
                found.setdefault(acc, []).append((n, value, "C"))
    return found


def _strip_casts(n: Node) -> Node:
    while isinstance(n, Node) and n.op == "call_method" and n.target in _CASTS:
        n = n.args[0]
    return n


def _is_routed_getitem(n: Node, reach: set[Node]) -> bool:
    """``base[index]`` with ``base`` outside the routing and ``index`` depending on it."""
    if not (n.op == "call_function" and n.target is operator.getitem):
        return False
    base, key = n.args
    if base in reach or not isinstance(base, Node):
        return False
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, Node) and k in reach for k in keys)


def _is_weight_getitem(n: Node, reach: set[Node]) -> bool:
    """``w[index]`` with ``index`` depending on the routing (``w`` itself may, e.g. a gather)."""
    if not (n.op == "call_function" and n.target is operator.getitem):
        return False
    base, key = n.args
    keys = key if isinstance(key, tuple) else (key,)
    return isinstance(base, Node) and any(isinstance(k, Node) and k in reach for k in keys)


def _is_shape_only(n: Node) -> bool:
    """A view that only adds or reshapes unit dims: ``unsqueeze``/``view``/``reshape``, or
    indexing with constants only (``t[:, None]``)."""
    if n.op == "call_method" and n.target in ("unsqueeze", "view", "reshape"):
        return True
    if n.op == "call_function" and n.target is operator.getitem:
        key = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        return isinstance(n.args[0], Node) and not any(isinstance(k, Node) for k in key)
    return False


def _split_weight(contrib: Node, reach: set[Node]) -> tuple[Node, Node | None, str | None]:
    """``(expert_out, topk_weights)`` from ``expert_out * w[t, k, None]`` (weights may be None)."""
    m = _strip_casts(contrib)
    if (
        m.op == "call_function"
        and m.target in (operator.mul, torch.mul)
        or (m.op == "call_method" and m.target == "mul")
    ):
        a, b = m.args[:2]
        for y, w in ((a, b), (b, a)):
            if not isinstance(w, Node):
                continue
            w0 = w
            while _is_shape_only(w) and not _is_weight_getitem(w, reach):
                w = w.args[0]  # w[t, k].unsqueeze(-1), w[t, k][:, None], .view(-1, 1)
            if _is_weight_getitem(w, reach) and isinstance(y, Node):
                base = w.args[0]
                bv = val(base)
                if isinstance(bv, torch.Tensor) and bv.is_floating_point() and bv.dim() in (1, 2):
                    return y, base, None
                return y, None, f"{w0.name}: routing weights are not a [T, K] tensor"
    return m, None, None


def _indexed_paths(nodes: list[Node]) -> dict[str, int]:
    """``{"path.of.ModuleList": e}`` for every ``<list>.<e>`` module on the nodes' stacks."""
    out: dict[str, int] = {}
    for n in nodes:
        for path in module_stack_paths(n):
            m = re.match(r"^(.*)\.(\d+)$", path)
            if m:
                out.setdefault(m.group(1), int(m.group(2)))
    return out


def _expert_ids(bodies: list[list[Node]]) -> tuple[str, list[int]] | None:
    """The ModuleList the bodies come from (the deepest one where they all have distinct
    indices) and each body's index in it; None when the module stacks do not say."""
    per_body = [_indexed_paths(b) for b in bodies]
    common = set(per_body[0]).intersection(*per_body[1:])
    for path in sorted(common, key=len, reverse=True):
        ids = [p[path] for p in per_body]
        if len(set(ids)) == len(ids):
            return path, ids
    return None


def _match_block(
    idx: Node,
    acc: Node,
    writes: list[tuple[Node, Node, str]],
    reach: set[Node],
    rejects: list[Rejected],
) -> MoEMatch | None:
    family = "C" if writes[0][2] == "C" else "A"
    bodies: list[tuple[Node, Node, list[Node]]] = []
    weights: set[Node] = set()
    xs: set[Node] = set()
    for write, value, _fam in writes:
        contrib = value
        if family == "C":
            if not (value.op == "call_function" and value.target in (operator.iadd, operator.add)):
                return _reject(rejects, family, "", f"{write.name} does not add to {acc.name}")
            prev, contrib = value.args
            if not (_is_routed_getitem(prev, reach) and prev.args[0] is acc):
                return _reject(
                    rejects, family, "", f"{write.name} does not add to {acc.name}[mask]"
                )
        y, w, why = _split_weight(contrib, reach)
        if why:
            return _reject(rejects, family, "", why)
        if w is not None:
            weights.add(w)
        rows = [n for n in ancestors([y], within=reach) if _is_routed_getitem(n, reach)]
        idx_shape = tuple(val(idx).shape)
        scaled = [r for r in rows if tuple(val(r.args[0]).shape) == idx_shape]
        if len(rows) > 1 and scaled:
            return _reject(
                rejects,
                family,
                "",
                f"{scaled[0].name}: routing weights applied to the expert input cannot be moved "
                "to combine",
            )
        if len(rows) != 1:
            return _reject(
                rejects,
                family,
                "",
                f"{write.name}: the expert reads {len(rows)} routed gathers, expected one x[idx]",
            )
        inp = rows[0]
        body = nodes_between(inp, y) if y is not inp else []
        if not body:
            return _reject(rejects, family, "", f"{write.name}: no expert computation found")
        inside = set(body) | {inp}
        for n in body:
            for a in n.all_input_nodes:
                if a not in inside and a in reach:
                    return _reject(
                        rejects,
                        family,
                        "",
                        f"{n.name}: the expert reads routing values ({a.name}); weights applied "
                        "to the expert input cannot be moved to combine",
                    )
        xs.add(inp.args[0])
        bodies.append((inp, y, body))
    if len(xs) != 1 or len(weights) > 1:
        return _reject(rejects, family, "", "the experts read different inputs or weights")
    (x,) = xs
    if not isinstance(val(x), torch.Tensor) or val(x).dim() != 2:
        return _reject(rejects, family, "", f"{x.name} is not a [T, H] tensor")

    # The same expert may run once per slot (family C): bodies with the same parameters are one
    # expert; its id comes from the ModuleList index on the module stack, else loop order.
    groups: dict[frozenset, list[tuple[Node, Node, list[Node]]]] = {}
    for b in bodies:
        groups.setdefault(frozenset(_params_of(b[2], b[0])), []).append(b)
    firsts = [g[0] for g in groups.values()]
    if len(firsts) == 1 and len(bodies) > 1:
        return _reject(rejects, family, "", "every write runs the same module: not per-expert")
    found = _expert_ids([b[2] for b in firsts])
    path = ""
    if found is not None:
        list_path, ids = found
        path = list_path.rsplit(".", 1)[0] if "." in list_path else ""
        by_id = dict(zip(ids, firsts, strict=True))
        if sorted(by_id) != list(range(len(by_id))):
            return _reject(rejects, family, path, "the loop does not cover experts 0..E-1")
    else:
        by_id = dict(enumerate(firsts))
    if len({len(g) for g in groups.values()}) != 1:
        return _reject(rejects, family, path, "experts run an unequal number of times")
    num_experts = len(by_id)
    experts = [ExpertSubgraph(e, *by_id[e]) for e in range(num_experts)]

    candidates = (ancestors([w for w, _, _ in writes]) & (reach | {acc})) | {
        w for w, _, _ in writes
    }
    for n in list(candidates):
        candidates.update(assert_only_users(n))
    candidates -= {idx, x, *weights}
    base = None
    if _is_zeros(acc):
        candidates.add(acc)
    else:
        candidates.discard(acc)
        base = acc
    if writes[0][2] == "A-chain":
        output, last_write = writes[-1][0], None
    else:
        output = acc
        last_write = max((w for w, _, _ in writes), key=graph_order(acc.graph).get)
    remove, why = prune_removal(candidates, output, last_write)
    if why:
        return _reject(rejects, family, path, why)
    for sub in experts:
        if any(n not in remove for n in sub.nodes):
            return _reject(rejects, family, path, f"expert {sub.expert}'s output is used elsewhere")
    return MoEMatch(
        family=family,
        module_path=path,
        num_experts=num_experts,
        x=x,
        topk_idx=idx,
        topk_weights=next(iter(weights), None),
        output=output,
        remove=remove,
        body=ModuleListExperts(experts),
        base=base,
        last_write=last_write,
    )


def _params_of(body: list[Node], inp: Node) -> set[Node]:
    inside = set(body) | {inp}
    return {
        a
        for n in body
        for a in n.all_input_nodes
        if a not in inside and (is_param_like(a) or is_param_slice(a))
    }


def _is_zeros(n: Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _ZEROS


def _reject(rejects: list[Rejected], family: str, path: str, reason: str) -> None:
    rejects.append(Rejected(family, path, reason))
    return None


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """Family A and C blocks of ``gm`` (the graph is not modified)."""
    blocks = []
    for idx in topk_indices(gm.graph):
        reach = descendants(idx) | {idx}
        blocks += [(idx, acc, writes, reach) for acc, writes in _writes(idx, reach).items()]
    return each_candidate(
        "loop", blocks, lambda b: _match_block(*b, rejects), rejects, where=lambda b: b[1]
    )
