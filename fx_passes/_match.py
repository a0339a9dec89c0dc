"""What a routing-family matcher hands to the rewrite: :class:`MoEMatch` and its expert bodies.

How a family plugs in
---------------------
A family module (``family_loop``, ``family_sorted``, ...) defines::

    def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]

listed in ``rewrite._FAMILY_MODULES``. It looks at the Dynamo-level graph (torch-level calls:
``torch.topk``, ``torch.where``, ``Tensor.index_add_``, ``torch._C._nn.linear``) and, for each MoE
block it is sure about, returns one :class:`MoEMatch`; for each candidate it is not sure about it
appends a :class:`Rejected` with the reason (logged at debug level, shown by ``explain``). It must
not mutate the graph: ``rewrite.fuse_moe_routing`` checks every match against its rewrite on small
random inputs at W = 1 and only then calls ``match.replace_with(gm, group)``.

A match names, in the original graph:

* ``x``: the ``[T, H]`` rows the experts read (the node the per-expert gathers index into).
* ``topk_idx``: ``[T, K]`` (or ``[T]``) integer global expert ids.
* ``topk_weights``: ``[T, K]`` floating weights applied to each slot's expert output, or None when
  the code applies none. The rewrite applies them in ``combine``; the matcher must leave the
  multiplication out of the expert body (weights applied to the expert *input* are not
  expressible: reject such blocks).
* ``output``: the node whose value is the routed sum ``[T, H']``; its uses after ``last_write``
  (or all its uses when ``last_write`` is None) are replaced by the rewrite's result.
  ``base`` is what that sum was accumulated onto (a shared expert's output, say), or None for
  zeros; the rewrite emits ``base + combine(...)`` then.
* ``remove``: every node the rewrite deletes (the in-place ``index_add_``/``setitem`` writes
  included: the rewrite removes nodes deliberately, never with ``eliminate_dead_code``). Each
  user of a removed node must itself be removed, or be a use of ``output`` after ``last_write``.
* ``body``: the expert computation, one of

  - :class:`ModuleListExperts`: one :class:`ExpertSubgraph` per expert (ModuleList experts):
    the rows the expert reads, its output before any routing weight, and the nodes between. When
    all experts have the same structure of linear layers and row-wise ops the rewrite stacks the
    local experts' weights and emits ``torch._grouped_mm`` (bf16), else it runs each local expert
    on its segment of ``torch.split(recv_x, tokens_per_expert.tolist())``.
  - :class:`StackedExperts`: parameters ``[E, ...]`` indexed by expert plus an ``emit`` callback
    that builds the expert computation over rows grouped by local expert; the rewrite hands it the
    parameters sliced to this rank's experts (or as they are when already ``[E/W, ...]``).

Shape letters: T tokens, H hidden (H' expert output), K top-k, E experts, W ranks, E_l = E / W
local experts, R rows received by this rank.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What the stand-in of an expert parameter sharded by ``fx_passes.shard_experts`` carries
    (``stand_in._moe_shard``): the parameter's dotted name, E, this rank's experts, the group it
    was sharded over, and ``param``, the DTensor parameter holding the local rows of a stacked
    ``[E, ...]`` parameter (None for a ModuleList expert that another rank owns). The pass puts
    it in ``placeholder.meta["moe_shard"]``.
    """

    name: str
    num_experts: int
    local_experts: range
    group_name: str
    param: Any = None


def shard_info(value: object) -> ShardInfo | None:
    """The :class:`ShardInfo` of a sharded parameter's stand-in, None for anything else."""
    return getattr(value, "_moe_shard", None) if isinstance(value, torch.Tensor) else None


@dataclasses.dataclass
class Rejected:
    """A candidate block a family looked at and left alone, and why."""

    family: str
    module_path: str
    reason: str


@dataclasses.dataclass
class ExpertSubgraph:
    """One expert of a ModuleList, as it appears in the original graph.

    ``input`` is the ``[n_e, H]`` node of rows routed to this expert (e.g. ``x[token_idx]``),
    ``output`` the ``[n_e, H']`` expert result before any routing weight, ``nodes`` every node on
    a path from ``input`` to ``output`` (``input`` excluded, ``output`` included) in graph order.
    Anything else those nodes read (parameters, constants) is captured as-is.
    """

    expert: int
    input: Node
    output: Node
    nodes: list[Node]


@dataclasses.dataclass
class ModuleListExperts:
    """Per-expert subgraphs; ``experts[e]`` is global expert ``e``."""

    experts: list[ExpertSubgraph]


EmitFn = Callable[[fx.Graph, Node, Node, list[Node]], Node]


@dataclasses.dataclass
class StackedExperts:
    """Experts as stacked parameters ``[E, ...]`` (or ``[E/W, ...]`` when already sharded).

    ``emit(graph, recv_x_RH, tokens_per_expert_El, local_params) -> expert_out_RH'`` inserts (at
    the graph's current insertion point) the expert computation over ``recv_x`` whose rows are
    grouped by local expert (``tokens_per_expert`` int64 ``[E_l]``; ``rewrite.grouped_offsets``
    turns it into int32 cumulative offsets), with ``local_params[i]`` the ``[E_l, ...]`` slice of
    ``params[i]``. It must set ``meta["val"]``/``meta["example_value"]`` on what it creates
    (``rewrite.call`` does). To read the counts on the host (split sizes), read
    ``rewrite.host_counts(tokens_per_expert)``: the CPU copy dispatch's one sync already made, so
    the block does not sync again.
    """

    params: list[Node]
    emit: EmitFn


@dataclasses.dataclass
class MoEMatch:
    """One MoE block a family is sure about (see the module docstring for each field)."""

    family: str
    module_path: str
    num_experts: int
    x: Node
    topk_idx: Node
    topk_weights: Node | None
    output: Node
    remove: list[Node]
    body: ModuleListExperts | StackedExperts
    base: Node | None = None
    last_write: Node | None = None
    rewritten: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Whether the rewrite checks the block against its W = 1 rewrite on random inputs first. A
    # block holding the user's own collectives (family E) cannot run alone, so it relies on its
    # exact structural match instead.
    verify_at_w1: typing.ClassVar[bool] = True

    def replace_with(self, gm: fx.GraphModule, group=None, *, capacity=None) -> None:
        """Rewrite this block of ``gm`` into dispatch -> local experts -> combine (the
        capacity-mode ops when ``capacity`` is not None, see ``fuse_moe_routing``)."""
        from fx_passes.rewrite import rewrite_match

        rewrite_match(gm, self, group, capacity)

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "module": self.module_path,
            "num_experts": self.num_experts,
            "body": "ModuleList" if isinstance(self.body, ModuleListExperts) else "stacked",
            **self.rewritten,
        }


# ----------------------------------------------------------------------------- graph helpers
def val(node: Any) -> Any:
    """The example value of a node (fake tensor / SymInt), or ``node`` itself if not a Node."""
    if not isinstance(node, Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


_PATH_PREFIX = re.compile(r"^(L\['[^']*'\]|self)\.?")


def module_path(node: Node) -> str:
    """Dotted path of the innermost module that ran ``node`` (``""`` for the top module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _PATH_PREFIX.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def module_stack_paths(node: Node) -> list[str]:
    """Dotted paths of every module on ``node``'s module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, _cls in stack.values():
        path = _PATH_PREFIX.sub("", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path)
        out.append(path.lstrip("."))
    return out


def common_prefix_path(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p is not None]
    if not parts:
        return ""
    prefix = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def is_param_like(node: Any) -> bool:
    """A graph input or attribute (a parameter or buffer once lifted by Dynamo)."""
    return isinstance(node, Node) and node.op in ("placeholder", "get_attr")


def is_param_slice(node: Any) -> bool:
    """``P[j]``: one expert's slice of a stacked parameter (``shard_experts(stack=True)``)."""
    return (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target is operator.getitem
        and is_param_like(node.args[0])
        and isinstance(node.args[1], int)
    )


_ASSERT_TARGETS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch._check,
    torch._check_is_size,
    operator.ge,
    operator.le,
    operator.gt,
    operator.lt,
    operator.eq,
    operator.ne,
    operator.and_,
    operator.or_,
    operator.not_,
}


def assert_only_users(node: Node) -> list[Node]:
    """Nodes hanging off ``node`` that only feed runtime shape assertions.

    Dynamo inserts ``getitem`` -> ``sym_size`` -> ``ge``/``le`` -> ``_assert_scalar`` chains after
    data-dependent ops (``nonzero``, ``where``, boolean indexing); they go with the block.
    """
    found: list[Node] = []
    memo: dict[Node, bool] = {}

    def only_asserts(n: Node) -> bool:
        if n not in memo:
            memo[n] = False
            ok = n.op == "call_function" and (
                n.target in _ASSERT_TARGETS or n.target is operator.getitem
            )
            memo[n] = ok and all(only_asserts(u) for u in n.users)
        return memo[n]

    for u in node.users:
        if only_asserts(u):
            stack = [u]
            while stack:
                n = stack.pop()
                if n not in found:
                    found.append(n)
                    stack.extend(n.users)
    return found


def nodes_between(src: Node, dst: Node) -> list[Node]:
    """Nodes on some path from ``src`` to ``dst`` (``src`` excluded, ``dst`` included), in
    graph order; ``[]`` if ``dst`` does not depend on ``src``."""
    forward: set[Node] = set()
    stack = [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in forward:
                forward.add(u)
                stack.append(u)
    if dst not in forward:
        return []
    backward: set[Node] = set()
    stack = [dst]
    while stack:
        n = stack.pop()
        if n in backward:
            continue
        backward.add(n)
        stack.extend(i for i in n.all_input_nodes if i in forward)
    keep = forward & backward
    return [n for n in src.graph.nodes if n in keep]


def descendants(node: Node) -> set[Node]:
    """Every node that depends on ``node`` (``node`` excluded)."""
    seen: set[Node] = set()
    stack = [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def ancestors(nodes: Iterable[Node], within: set[Node] | None = None) -> set[Node]:
    """``nodes`` and everything they depend on (restricted to ``within`` when given)."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen or (within is not None and n not in within):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv}


def is_inplace(node: Node) -> bool:
    """A write to one of its inputs (``x.add_()``, ``out[m] = v``, ``a += b``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def prune_removal(
    candidates: set[Node], output: Node, last_write: Node | None
) -> tuple[list[Node], str | None]:
    """Drop from ``candidates`` what something outside them still needs.

    A candidate whose value is used outside (other than ``output`` after ``last_write``) is kept
    together with what it depends on, unless it writes in place (then the block cannot be
    rewritten: the reason is returned). Returns the nodes to remove in graph order.
    """
    order = graph_order(output.graph)
    last = order[last_write] if last_write is not None else -1
    remove = set(candidates)
    changed = True
    while changed:
        changed = False
        for n in list(remove):
            outside = [
                u for u in n.users if u not in remove and not (n is output and order[u] > last)
            ]
            if outside:
                keep = ancestors([n], within=remove)
                bad = [k for k in keep if is_inplace(k)]
                if bad:
                    return [], f"{bad[0].name} writes in place and {outside[0].name} reads it"
                remove -= keep
                changed = True
    return sorted(remove, key=order.get), None


def graph_order(graph: fx.Graph) -> dict[Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def check_removable(match: MoEMatch) -> str | None:
    """Why ``match.remove`` cannot be deleted as it stands (a value used outside it), or None."""
    remove = set(match.remove)
    for name in ("x", "topk_idx", "topk_weights", "base"):
        if getattr(match, name) in remove:
            return f"the block's {name} ({getattr(match, name).name}) is in the removed nodes"
    order = graph_order(match.output.graph)
    last = order[match.last_write] if match.last_write is not None else -1
    if match.output not in remove:
        for u in match.output.users:
            if u not in remove and order[u] <= last:
                return f"{u.name} reads {match.output.name} while the block still writes it"
    for n in remove:
        for u in n.users:
            if u in remove:
                continue
            if n is match.output and order[u] > last:
                continue
            return f"{n.name} is used by {u.name} outside the matched block"
    return None
