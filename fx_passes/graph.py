"""Graph helpers shared by the matchers, the check and the emission: one copy of each.

Reading a graph: example values (:func:`val`), module paths, traversals (``ancestors``,
``descendants``, ``nodes_between``), node predicates (``is_call``, ``is_method``, ``is_cast``,
...), the op tables (row-wise ops, runtime asserts) and the one top-k finder
(:func:`topk_nodes`). Writing one: :func:`call` inserts a node with its example value.
"""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx import Node

if TYPE_CHECKING:
    from fx_passes.match import MoEMatch


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


ASSERT_TARGETS = {
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


ASSERTISH = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_storage_offset.default,
    torch._check,
    torch._check_is_size,
    operator.ge,
    operator.le,
    operator.gt,
    operator.lt,
    operator.eq,
    operator.ne,
    operator.or_,
    operator.and_,
    operator.getitem,
    torch.sym_sum,
    operator.add,
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
                n.target in ASSERT_TARGETS or n.target is operator.getitem
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


def meta_key(graph: fx.Graph) -> str:
    for n in graph.nodes:
        if n.op == "placeholder":
            return "val" if "val" in n.meta else "example_value"
    return "example_value"


def _fake_mode_of(args: Any):
    """The fake mode of the first fake tensor in ``args`` (the one that made the graph's meta)."""
    from torch._subclasses.fake_tensor import FakeTensor

    modes = []
    fx.node.map_aggregate(
        args, lambda a: modes.append(a.fake_mode) if isinstance(a, FakeTensor) else a
    )
    return modes[0] if modes else None


def set_val(node: Node) -> None:
    """Compute ``node``'s example value from its inputs' in their fake mode (if they have one)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), val)
    mode = _fake_mode_of((args, kwargs))
    if mode is None:  # e.g. torch.arange: take the mode of the graph's inputs
        mode = _fake_mode_of([val(n) for n in node.graph.nodes if n.op == "placeholder"])
    if mode is None:
        return
    # an in-place write returns nothing to bind the sizes it makes (``buf[lo:hi] = v``) to
    quiet = mode.shape_env is not None and node.target is operator.setitem
    fresh = mode.shape_env.ignore_fresh_unbacked_symbols() if quiet else contextlib.nullcontext()
    with mode, fresh:
        if node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    if mode.shape_env is not None:
        from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

        bindings = compute_unbacked_bindings(mode.shape_env, out)
        if bindings:
            node.meta["unbacked_bindings"] = bindings
    node.meta[meta_key(node.graph)] = out


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` (a method if ``target`` is a str) with its meta value."""
    if isinstance(target, str):
        node = graph.call_method(target, args, kwargs or {})
    else:
        node = graph.call_function(target, args, kwargs or {})
    set_val(node)
    return node


LINEAR = (torch._C._nn.linear, F.linear)


# Elementwise ops: each output row depends on the same input row only, so they run unchanged on
# rows grouped by expert. Stacked-expert bodies (``families._body``) add the structural ops they
# accept.
ROWWISE_FUNCS = {
    torch.where,
    torch.maximum,
    torch.minimum,
    torch.rsqrt,
    torch.pow,
    F.silu,
    F.gelu,
    F.relu,
    F.sigmoid,
    F.tanh,
    F.softplus,
    F.elu,
    F.leaky_relu,
    F.mish,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    torch.exp,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.mul,
    torch.add,
    torch.sub,
    torch.div,
    torch.neg,
    torch.erf,
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    operator.neg,
    operator.pow,
}


ROWWISE_METHODS = {
    "type",
    "rsqrt",
    "to",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "sigmoid",
    "tanh",
    "relu",
    "mul",
    "add",
    "sub",
    "div",
    "clamp",
    "pow",
    "neg",
    "exp",
    "contiguous",
    "square",
}


_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "long", "int", "type_as", "type"}


def grouped_mm_fallback_op():
    """transformers' ``grouped_mm_fallback`` custom op, when transformers registered it."""
    ns = getattr(torch.ops, "transformers", None)
    return getattr(ns, "grouped_mm_fallback", None) if ns is not None else None


def target_name(n: Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def is_method(n: Node, *names: str) -> bool:
    return n.op == "call_method" and n.target in names


def is_call(n: Node, *targets) -> bool:
    return n.op == "call_function" and any(n.target is t for t in targets)


def arg(n: Node, i: int, name: str, default=None):
    """Positional argument ``i`` (counting ``self`` for methods) or keyword ``name``."""
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def is_cast(n: Node) -> bool:
    if is_method(n, *_CAST_METHODS):
        return True
    return is_call(n, torch.ops.prims.convert_element_type.default)


def strip_casts(n: Node) -> Node:
    while isinstance(n, Node) and is_cast(n):
        n = n.args[0]
    return n


def is_flatten(n: Node) -> bool:
    """``t.view(-1)``, ``t.reshape(-1)``, ``t.flatten()``, ``torch.flatten(t)`` (1-D result)."""
    v = val(n)
    if not isinstance(v, torch.Tensor) or v.dim() != 1:
        return False
    return bool(
        is_method(n, "view", "reshape", "flatten", "contiguous")
        or is_call(n, torch.flatten, torch.reshape)
    )


def unflatten(n: Node) -> Node:
    """Walk back through flattening views (and casts) to the tensor they flatten."""
    while isinstance(n, Node) and (is_flatten(n) or is_cast(n)):
        n = n.args[0]
    return n


def is_topk(n: Node) -> bool:
    """``torch.topk(...)`` / ``t.topk(...)``."""
    return n.op in ("call_function", "call_method") and n.target in (torch.topk, "topk")


def topk_nodes(graph: fx.Graph) -> list[Node]:
    """Every ``topk`` call of ``graph``: the routers' candidates."""
    return [n for n in graph.nodes if is_topk(n)]


def topk_indices(graph: fx.Graph) -> list[Node]:
    """``topk(...)[1]`` nodes: the top-k ids of every ``topk`` call of ``graph``."""
    return [
        u
        for n in topk_nodes(graph)
        for u in n.users
        if u.target is operator.getitem and u.args[1] == 1
    ]


def router_ids(graph: fx.Graph) -> list[Node]:
    """The expert ids of every router of ``graph``: ``topk(...)[1]`` (``[T, K]``), and for
    top-1 routers ``argmax(scores, -1)`` or ``max(scores, -1)[1]`` (``[T]``)."""
    out = topk_indices(graph)
    for n in graph.nodes:
        if n.op in ("call_function", "call_method") and n.target in (torch.argmax, "argmax"):
            out.append(n)
        elif n.target is operator.getitem and n.args[1] == 1:
            src = n.args[0]
            dim = len(src.args) > 1 or "dim" in src.kwargs if isinstance(src, Node) else False
            if dim and src.target in (torch.max, "max"):
                out.append(n)
    order = graph_order(graph)
    return sorted(out, key=order.get)
