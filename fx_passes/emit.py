"""The rewrite: a matched MoE block -> ``dispatch`` -> this rank's local experts -> ``combine``.

:func:`rewrite_match` replaces a checked :class:`~fx_passes.match.MoEMatch` in its graph;
:func:`emit_routed` inserts the replacement (the check in ``verify`` runs it too). The emitted
graph, with ``g = group_name, W = world_size``::

    d = torch.ops.moe_ops.dispatch(x, topk_idx, E, g, W, sum_per_rank, low_memory)
    recv_x, tokens_per_expert = d[0], d[1]           # moe_ops._ops.DispatchOutputs
    expert_out = <local experts on recv_x>           # grouped_mm, or per-expert segments
    out, _ = torch.ops.moe_ops.combine(expert_out, topk_weights, *layout, g, W, False, keep)
                                                     # layout: moe_ops._ops.Layout's fields of d;
                                                     # keep: topk_weights requires grad
    routed = base + out                                # when the block accumulated onto a base

With ``capacity=`` (opt-in, see ``fuse.fuse_moe_routing``) the pair is the sync-free capacity mode
(``t`` the transport, ``moe_ops._api._transport``; ``C`` the capacity, ``W * T * K`` for
``"worst-case"``)::

    d = torch.ops.moe_ops.dispatch_fixed(x, topk_idx, E, C, False, g, W, t, sum_per_rank)
    recv_x, tokens_per_expert = d[0], d[1]           # moe_ops._capacity_ops.DispatchOutputs
    expert_out = <local experts on recv_x>           # [C, H']: no host read of the counts
    out, _ = torch.ops.moe_ops.combine_fixed(expert_out, topk_weights, *layout, C, g, W, t)
                                                     # layout: moe_ops._capacity_ops.Layout's

Rank ``r`` runs global experts ``r * E_l + j``. New nodes carry ``meta["example_value"]`` (or
``meta["val"]`` in graphs that use it) computed in the graph's fake mode.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx import Node

import moe_ops  # noqa: F401  (registers torch.ops.moe_ops)
from fx_passes.experts import (
    HOST_COUNTS,
    can_group,
    emit_grouped,
    emit_segments,
    emit_stacked,
)
from fx_passes.graph import call, check_removable, graph_order, is_param_slice, val
from fx_passes.group import resolve_group
from fx_passes.match import MoEMatch, StackedExperts
from moe_ops._capacity_ops import DispatchOutputs as CapacityOutputs
from moe_ops._capacity_ops import Layout as CapacityLayout
from moe_ops._ops import DispatchOutputs, Layout

log = logging.getLogger("fx_passes")


# Ops that read the row counts on the host or assume exactly R rows: a capacity-mode body must
# have none (``split(recv_x, tpe.tolist())`` segments, ``repeat_interleave(..., output_size=R)``).
_SYNC_METHODS = {"tolist", "item", "split", "nonzero", "repeat_interleave"}


_SYNC_FUNCS = {torch.split, torch.functional.split, torch.nonzero, torch.repeat_interleave}


def _capacity_blocker(nodes: Sequence[Node]) -> str | None:
    """Why expert-compute ``nodes`` cannot run on a capacity-mode ``recv_x``, or None."""
    for n in nodes:
        if (n.op == "call_method" and n.target in _SYNC_METHODS) or (
            n.op == "call_function" and n.target in _SYNC_FUNCS
        ):
            name = getattr(n.target, "__name__", n.target)
            return f"the expert compute uses {name} ({n.name}): a host read of the row counts"
    return None


def capacity_rows(graph: fx.Graph, x: Node, idx: Node, capacity: int | str, world_size: int):
    """The capacity ``C`` of a capacity-mode dispatch: ``capacity`` itself when an int, else
    ``W * T * K`` (an int, or a node when ``T`` is symbolic)."""
    if capacity != "worst-case":
        return capacity
    T, K = val(idx).shape
    if isinstance(T, int):
        return world_size * T * K
    return call(graph, operator.mul, (call(graph, "size", (x, 0)), world_size * int(K)))


def check_capacity(
    capacity: Any, where: str, transport: str | None = None, low_memory: bool = False
) -> None:
    """Raise unless ``capacity`` is None, ``"worst-case"`` or an int >= 0, ``transport`` None
    or (with a capacity) one of the capacity mode's transports, and ``low_memory`` (a
    default-mode option) False with a capacity."""
    if low_memory and capacity is not None:
        raise ValueError(
            f"{where}: low_memory is a default-mode option (the capacity mode's buffers have "
            f"fixed sizes); pass capacity=None"
        )
    if transport is not None:
        from moe_ops._capacity_ops import TRANSPORTS

        if capacity is None:
            raise ValueError(f"{where}: transport is a capacity-mode option; pass capacity too")
        if transport not in TRANSPORTS:
            raise ValueError(
                f"{where}: transport must be None or one of {TRANSPORTS}, got {transport!r}"
            )
    if capacity is None or capacity == "worst-case":
        return
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"{where}: capacity must be None, an int or 'worst-case', got {capacity!r}")
    if capacity < 0:
        raise ValueError(f"{where}: capacity must be >= 0 rows, got {capacity}")


def emit_routed(
    graph: fx.Graph,
    match: MoEMatch,
    env: Callable[[Node], Node],
    group_name: str,
    world_size: int,
    rank: int,
    info: dict | None = None,
    capacity: int | str | None = None,
    sum_per_rank: bool = False,
    transport: str | None = None,
    low_memory: bool = False,
) -> Node:
    """Insert dispatch -> local experts -> combine for ``match`` at the insertion point.

    ``env`` maps the original graph's nodes to ``graph``'s (the identity for an in-place
    rewrite). ``capacity`` (None, an int, or ``"worst-case"``) picks the sync-free capacity-mode
    ops; when the experts cannot run on its padded rows without a host read (no grouped form), the
    block keeps the default ops and ``info["capacity_fallback"]`` says why. ``sum_per_rank``
    is :func:`moe_ops.dispatch`'s option of that name (both ops), ``transport`` its capacity-mode
    transport (None: the library's choice), ``low_memory`` its default-mode option. Returns the
    node
    holding the routed output, in ``match.output``'s dtype.
    """
    info = {} if info is None else info
    x, idx = env(match.x), env(match.topk_idx)
    w = env(match.topk_weights) if match.topk_weights is not None else None
    if val(idx).dim() == 1:
        idx = call(graph, "unsqueeze", (idx, 1))
        if w is not None and val(w).dim() == 1:
            w = call(graph, "unsqueeze", (w, 1))
    e_l = match.num_experts // world_size
    local = list(range(rank * e_l, (rank + 1) * e_l))
    args = (graph, match, env, x, idx, w, group_name, world_size, rank, info)
    if capacity is not None:
        why = None
        if not isinstance(match.body, StackedExperts):
            why = can_group(match.body, local, val(x))
        if why is None:
            before, saved = set(graph.nodes), dict(info)
            out = _emit_capacity(*args, capacity, sum_per_rank, transport)
            if isinstance(out, Node):
                return out
            why = out
            for n in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(n)
            info.clear()
            info.update(saved)
        info["capacity_fallback"] = why
    return _emit_default(*args, sum_per_rank, low_memory)


def _emit_default(
    graph, match, env, x, idx, w, group_name, world_size, rank, info, sum_per_rank, low_memory
) -> Node:
    E = match.num_experts
    d = call(
        graph,
        torch.ops.moe_ops.dispatch.default,
        (x, idx, E, group_name, world_size, sum_per_rank, low_memory),
    )
    fields = DispatchOutputs._fields

    def output(name: str) -> Node:
        return call(graph, operator.getitem, (d, fields.index(name)))

    recv_x, tpe = output("recv_x"), output("tokens_per_expert")
    layout = [output(name) for name in Layout._fields]
    tpe.meta[HOST_COUNTS] = functools.cache(lambda: output("tokens_per_expert_host"))
    e_l = E // world_size
    local = list(range(rank * e_l, (rank + 1) * e_l))
    if isinstance(match.body, StackedExperts):
        expert_out = emit_stacked(
            graph, match.body, E, group_name, rank, recv_x, tpe, env, world_size
        )
        info["experts"] = "stacked"
    else:
        why_not = can_group(match.body, local, val(x))
        if why_not is None:
            expert_out = emit_grouped(graph, match.body, local, recv_x, tpe, env)
            info["experts"] = "grouped_mm"
        else:
            expert_out = emit_segments(graph, match.body, local, recv_x, tpe, env)
            info["experts"] = "segments"
            info["why_not_grouped"] = why_not
    # the rows that come back are kept for the backward only when the weights need a gradient
    keep_rows = w is not None and val(w).requires_grad
    c = call(
        graph,
        torch.ops.moe_ops.combine.default,
        (expert_out, w, *layout, group_name, world_size, False, keep_rows),
    )
    del tpe.meta[HOST_COUNTS]  # only for this emission (nodes in meta would outlive it)
    return _finish(graph, match, env, call(graph, operator.getitem, (c, 0)))


def _finish(graph: fx.Graph, match: MoEMatch, env: Callable[[Node], Node], out: Node) -> Node:
    want = val(match.output).dtype
    if val(out).dtype != want:
        out = call(graph, "to", (out, want))
    if match.base is not None:
        out = call(graph, operator.add, (env(match.base), out))
    return out


def _emit_capacity(
    graph,
    match,
    env,
    x,
    idx,
    w,
    group_name,
    world_size,
    rank,
    info,
    capacity,
    sum_per_rank,
    transport,
) -> Node | str:
    """dispatch_fixed -> grouped local experts on ``[C, H]`` -> combine_fixed, or why not (the
    caller erases what was emitted)."""
    from moe_ops._api import _transport

    E = match.num_experts
    C = capacity_rows(graph, x, idx, capacity, world_size)
    transport = _transport(val(x), world_size, transport, group_name)
    d = call(
        graph,
        torch.ops.moe_ops.dispatch_fixed.default,
        (x, idx, E, C, False, group_name, world_size, transport, sum_per_rank),
    )
    fields = CapacityOutputs._fields

    def output(name: str) -> Node:
        return call(graph, operator.getitem, (d, fields.index(name)))

    recv_x, tpe = output("recv_x"), output("tokens_per_expert")
    layout = [output(name) for name in CapacityLayout._fields]
    before = set(graph.nodes)
    if isinstance(match.body, StackedExperts):
        expert_out = emit_stacked(
            graph, match.body, E, group_name, rank, recv_x, tpe, env, world_size
        )
        why = _capacity_blocker([n for n in graph.nodes if n not in before])
        if why is not None:
            return why
        info["experts"] = "stacked"
    else:
        e_l = E // world_size
        local = list(range(rank * e_l, (rank + 1) * e_l))
        expert_out = emit_grouped(graph, match.body, local, recv_x, tpe, env, padded=True)
        info["experts"] = "grouped_mm"
    info["dispatch"] = f"capacity={capacity}"
    c = call(
        graph,
        torch.ops.moe_ops.combine_fixed.default,
        (expert_out, w, *layout, C, group_name, world_size, transport),
    )
    return _finish(graph, match, env, call(graph, operator.getitem, (c, 0)))


def rewrite_match(
    gm: fx.GraphModule,
    match: MoEMatch,
    group: dist.ProcessGroup | None,
    capacity: int | str | None = None,
    sum_per_rank: bool = False,
    transport: str | None = None,
    low_memory: bool = False,
) -> None:
    """Replace ``match`` in ``gm`` (in place) by dispatch -> local experts -> combine
    (capacity-mode ops when ``capacity`` is not None; ``sum_per_rank``, ``transport``,
    ``low_memory``: see :func:`emit_routed`)."""
    why = check_removable(match)
    if why is not None:
        raise ValueError(f"fx_passes: cannot rewrite {match.module_path or 'block'}: {why}")
    group_name, world_size, rank = resolve_group(group)
    if match.num_experts % world_size:
        raise ValueError(
            f"fx_passes: {match.module_path or 'block'} has {match.num_experts} experts, not a "
            f"multiple of the group size {world_size}"
        )
    graph = gm.graph
    order = graph_order(graph)
    tail = max([*match.remove, *([match.last_write] if match.last_write else [])], key=order.get)
    removed = set(match.remove)
    first_new = tail.next
    try:
        with graph.inserting_before(first_new):
            out = emit_routed(
                graph,
                match,
                lambda n: n,
                group_name,
                world_size,
                rank,
                match.rewritten,
                capacity,
                sum_per_rank,
                transport,
                low_memory,
            )
    except BaseException:
        _erase_between(tail, first_new)  # nothing reads the new nodes yet: the graph is as it was
        raise
    if "capacity_fallback" in match.rewritten:
        log.warning(
            "fx_passes: MoE block %s keeps the default (synced) dispatch, not capacity=%r: %s",
            match.module_path or "<top>",
            capacity,
            match.rewritten["capacity_fallback"],
        )
    new_nodes = set()
    n = tail.next
    while n is not first_new:
        new_nodes.add(n)
        n = n.next
    last = order[match.last_write] if match.last_write is not None else -1
    for u in list(match.output.users):
        if u in new_nodes or u in removed:
            continue
        if u in order and order[u] <= last:
            continue
        u.replace_input_with(match.output, out)
    # the experts' slices P[j] of stacked parameters go too once nothing reads them
    slices = {a for n in removed for a in n.all_input_nodes if is_param_slice(a)} - removed
    for n in sorted(removed, key=order.get, reverse=True):
        if n.users:
            raise AssertionError(f"fx_passes: {n.name} still has users {list(n.users)}")
        graph.erase_node(n)
    for n in slices:
        if not n.users:
            graph.erase_node(n)
    match.rewritten.update(world_size=world_size, rank=rank)
    graph.lint()
    gm.recompile()


def _erase_between(first: Node, stop: Node) -> None:
    """Erase the nodes after ``first`` and before ``stop``, last first."""
    new = []
    n = first.next
    while n is not stop:
        new.append(n)
        n = n.next
    for n in reversed(new):
        n.graph.erase_node(n)
