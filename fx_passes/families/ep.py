"""Family E: hand-written expert parallelism (all-to-all EP written in the model).

Each rank holds its ``E_l = E / W`` local experts (global ids ``r * E_l + j``) and moves tokens
itself. The block, as Dynamo captures it (``dist.all_to_all_single`` becomes
``_c10d_functional.all_to_all_single`` + ``wait_tensor`` + ``copy_`` into the preallocated
buffer; ``_functional_collectives.all_to_all_single[_autograd]`` the same op and waits, which
torch 2.11 wraps in an ``autograd_function_apply`` for the autograd variant)::

    order = argsort(topk_idx.flatten()); rows = x[order // K]        # as in family D
    counts = bincount / histc / one-hot sum of the ids               # [E]
    recv_counts = all_to_all_single(counts)                          # equal splits E_l
    send = counts.view(W, E_l).sum(1).tolist()
    recv = recv_counts.view(W, E_l).sum(1).tolist()
    recv_x = all_to_all_single(rows, out=recv, in=send)
    regroup = argsort(repeat_interleave(arange(E_l).repeat(W), recv_counts))
    y_g = <experts>(recv_x[regroup], recv_counts.view(W, E_l).sum(0))
    y[regroup] = y_g                                                 # or index_copy_
    back = all_to_all_single(y, out=send, in=recv)
    <unpermute back to the tokens with the routing weights>          # as in family D

It is rewritten into ``moe_ops.dispatch -> experts on rows grouped by local expert ->
moe_ops.combine`` over the group the user's collectives name (not the backend's ``group``): one
count exchange, one payload exchange each way, and one host sync, instead of the user's
collectives and ``tolist`` calls. Experts are stacked ``[E_l, ...]`` parameters (a ``split``
loop, ``torch._grouped_mm``) or a ``ModuleList`` of ``E_l`` experts on ``split`` segments.

Two ways in. ``find_patterns`` (first in ``families.FAMILIES``) matches the spelling above
piece by piece, stacked experts included. ``find_by_value`` (last in ``FAMILIES``, so it only sees
blocks no other family rewrote) recognises hand-written EP by what it computes, whatever the
spelling of each piece: the router's top-k ids (``topk``/``argmax``), a ``ModuleList`` of this
rank's experts (of all E when the block holds no collective: EP code at W = 1), the ``[T, H]``
rows they read, the routed sum they reach, and a weight hypothesis; the exchanges in between may
be plain ``dist`` collectives, functional collectives, or autograd.Functions around either;
counts may go by ``all_to_all_single`` or ``all_gather``; the receiver may regroup by a count
matrix, by shipped ids or by chunk order. ``_ep_world.verify_in_world`` then runs the block in a
simulated world of W mirrored ranks against the W = 1 rewrite of its local experts, and decides.

Being sure (``find_patterns``): every piece above is matched exactly (the same group in the
three exchanges, the way back with the forward split sizes swapped, the counts of the block's
own ids, the regroup keyed by local expert), and anything else left alone, with the reason. The
W = 1 random check of ``verify.verify_match`` does not apply here: the region holds the user's
collectives over a W-rank group and bakes W, the rank and the local parameters into the graph,
so it cannot run by itself in one process (at compile time it would issue real collectives, and
a rank that decided differently would hang its peers). Its matches have ``verify_at_w1`` False;
the structural match is the check (``find_by_value``'s matches were checked in the simulated
world already).

Shape letters: T tokens, H hidden, K top-k, E experts, W ranks, E_l = E / W, P = T * K pairs,
R rows received by this rank.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fx_passes.families import _body as gbody
from fx_passes.families import _walks as walks
from fx_passes.families._ep_world import (
    group_names,
    holds_collective,
    is_constant,
    verify_in_world,
)
from fx_passes.families._guard import each_candidate
from fx_passes.families._routed import (
    CREATE,
    block_and_writes,
    expert_subgraph,
    reach,
    weight_candidates,
)
from fx_passes.graph import (
    ancestors,
    arg,
    assert_only_users,
    common_prefix_path,
    descendants,
    graph_order,
    is_call,
    is_inplace,
    is_method,
    is_param_like,
    module_path,
    module_stack_paths,
    nodes_between,
    prune_removal,
    router_ids,
    strip_casts,
    target_name,
    unflatten,
    val,
)
from fx_passes.group import group_by_name
from fx_passes.match import (
    ExpertSubgraph,
    ModuleListExperts,
    MoEMatch,
    Rejected,
    StackedExperts,
)

FAMILY = "ep"


def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per hand-written EP block of ``gm`` (see the module docstring)."""
    if not any(_is_a2a(n) for n in gm.graph.nodes):
        return []
    sorts = [n for n in gm.graph.nodes if walks.is_sort(n)]
    return each_candidate(FAMILY, sorts, lambda s: _match_ep(s), rejects)


# ----------------------------------------------------------------------------- collectives
def _ops(name: str) -> tuple:
    out = []
    for ns in ("_c10d_functional", "_c10d_functional_autograd"):
        packet = getattr(getattr(torch.ops, ns, None), name, None)
        if packet is not None:
            out += [packet, packet.default]
    return tuple(out)


_A2A = _ops("all_to_all_single")
_WAIT = _ops("wait_tensor")


def _is_a2a(n: Node) -> bool:
    return n.op == "call_function" and n.target in _A2A


def _is_wait(n: Node) -> bool:
    return n.op == "call_function" and n.target in _WAIT


_BUFFERS = (torch.empty, torch.empty_like, torch.zeros, torch.zeros_like)


def _is_buffer(n: Node) -> bool:
    return is_call(n, *_BUFFERS) or is_method(n, "new_empty", "new_zeros")


@dataclasses.dataclass
class _Exchange:
    """One ``all_to_all_single``: what it sends, its split sizes (lists of nodes or ints, or
    None), its group, the node the code reads the received rows from, and its own nodes."""

    src: Node
    out_splits: list | None
    in_splits: list | None
    group_name: str
    received: Node
    nodes: list[Node]


def _exchange(a2a: Node) -> _Exchange | str:
    """Follow an ``all_to_all_single`` through its waits (and a ``copy_`` into a buffer)."""
    src, out_splits, in_splits, group_name = (arg(a2a, i, k) for i, k in enumerate(_A2A_ARGS))
    nodes = [a2a]
    n = a2a
    while len(n.users) == 1:
        u = next(iter(n.users))
        if _is_wait(u):
            n = u
            nodes.append(n)
            continue
        wrapped = _wait_in_autograd_function(u, n)
        if wrapped is None:
            break
        n = wrapped
        nodes += [u, n]
    if n is a2a:
        return f"{a2a.name}: the all_to_all's result is not waited for"
    users = list(n.users)
    if len(users) == 1 and is_method(users[0], "copy_") and users[0].args[1] is n:
        copy, buf = users[0], users[0].args[0]
        order = graph_order(a2a.graph)
        if not _is_buffer(buf):
            return f"{a2a.name}: received into {buf.name}, which is not a fresh buffer"
        if copy.users or any(order[u] < order[copy] for u in buf.users if u is not copy):
            return f"{a2a.name}: its buffer {buf.name} is read before it is filled"
        nodes += [copy, buf]
        n = buf
    if not isinstance(group_name, str):
        return f"{a2a.name}: the group is not a constant name"
    return _Exchange(src, out_splits, in_splits, group_name, n, nodes)


_A2A_ARGS = ("input", "output_split_sizes", "input_split_sizes", "group_name")


def _wait_in_autograd_function(apply: Node, arg: Node) -> Node | None:
    """torch 2.11 captures the wait of ``all_to_all_single_autograd``'s result as
    ``autograd_function_apply(fwd_body, bwd_body, *sizes, t)`` whose forward only waits for
    ``t``: the ``getitem(apply, 0)`` that reads its result, else None."""
    hop = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    if hop is None or apply.op != "call_function" or apply.target is not hop:
        return None
    body = apply.args[0]
    if not (isinstance(body, Node) and body.op == "get_attr" and arg in apply.args[2:]):
        return None
    try:
        fwd = fx.graph_module._get_attr(apply.graph.owning_module, body.target)
    except AttributeError:
        return None
    phs = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    ph = phs[list(apply.args[2:]).index(arg)] if len(phs) == len(apply.args) - 2 else None
    work = [
        n
        for n in fwd.graph.nodes
        if n.op == "call_function" and n.target is not torch._C._set_grad_enabled
    ]
    if ph is None or len(work) != 1 or not _is_wait(work[0]) or work[0].args[0] is not ph:
        return None
    out = next(n for n in fwd.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, tuple) and out and tuple(out[0]) == (work[0],)):
        return None
    readers = list(apply.users)
    if len(readers) != 1 or readers[0].target is not operator.getitem or readers[0].args[1] != 0:
        return None
    return readers[0]


def _exchange_into(received: Node) -> _Exchange | None:
    """The exchange whose received rows ``received`` is, or None."""
    n = received
    if _is_buffer(n):
        copies = [u for u in n.users if is_method(u, "copy_") and u.args[0] is n]
        if len(copies) != 1 or not isinstance(copies[0].args[1], Node):
            return None
        n = copies[0].args[1]
    while _is_wait(n) or (n.target is operator.getitem and n.args[1] == 0):
        n = n.args[0]
        if n.op == "call_function" and n.target is getattr(
            torch.ops.higher_order, "autograd_function_apply", None
        ):
            n = n.args[-1]
    if not _is_a2a(n):
        return None
    ex = _exchange(n)
    return ex if isinstance(ex, _Exchange) and ex.received is received else None


def _split_source(splits, W: int) -> tuple[Node, list[Node]] | str:
    """``c.view(W, E_l).sum(1).tolist()`` (as Dynamo captures it: one ``getitem`` + ``item``
    per rank) -> ``(c, nodes)``."""
    if not isinstance(splits, (list, tuple)) or len(splits) != W:
        return f"split sizes {splits!r} are not one per rank ({W})"
    sums, nodes = None, []
    for i, it in enumerate(splits):
        if not (isinstance(it, Node) and is_method(it, "item")):
            return f"split size {i} is not read from a tensor of per-rank counts"
        g = it.args[0]
        if not (g.target is operator.getitem and g.args[1] == i):
            return f"split size {i} reads {g.name}, not entry {i} of per-rank counts"
        if sums is not None and g.args[0] is not sums:
            return "the split sizes come from different tensors"
        sums = g.args[0]
        nodes += [it, g]
    c = _per_rank_sum(sums, W, dim=1)
    if c is None:
        return f"{sums.name} is not counts.view({W}, E_l).sum(1)"
    return c, [*nodes, sums, sums.args[0]]


def _per_rank_sum(n: Node, W: int, dim: int) -> Node | None:
    """``c.view(W, E_l).sum(dim)`` (or ``reshape``, ``-1`` for E_l) -> ``c``."""
    if not (is_method(n, "sum") and arg(n, 1, "dim") in (dim, dim - 2)):
        return None
    if arg(n, 2, "keepdim", False):
        return None
    v = n.args[0]
    if not (is_method(v, "view", "reshape") and len(v.args) == 3 and v.args[1] == W):
        return None
    c = v.args[0]
    cv = val(c)
    if not isinstance(cv, torch.Tensor) or cv.dim() != 1 or v.args[2] not in (-1, cv.shape[0] // W):
        return None
    return c


# ----------------------------------------------------------------------------- regrouping
def _is_local_ids(n: Node, W: int, E_l: int) -> bool:
    """``arange(E_l).repeat(W)`` / ``.tile(W)``, or ``arange(E) % E_l``: the local expert of
    each (source rank, local expert) block of received rows."""
    if is_method(n, "repeat", "tile") and tuple(n.args[1:]) in ((W,), ((W,),)):
        return _is_arange(n.args[0], E_l)
    if is_call(n, operator.mod, torch.remainder) or is_method(n, "remainder"):
        return _is_arange(n.args[0], E_l * W) and n.args[1] == E_l
    return False


def _is_arange(n: Node, stop: int) -> bool:
    if not is_call(n, torch.arange):
        return False
    return tuple(n.args) in ((stop,), (0, stop), (0, stop, 1))


def _regroup(recv: Node, recv_counts: Node, W: int, E_l: int, filled_by: list[Node]):
    """``recv[argsort(repeat_interleave(local_ids, recv_counts))]`` -> ``(rows, regroup,
    nodes)``: the received rows grouped by local expert (any order inside a group: the way back
    undoes it)."""
    readers = [u for u in recv.users if u not in filled_by and not walks.hanger(u)]
    if len(readers) != 1:
        return f"the received rows are read by {len(readers)} nodes, not one regroup by expert"
    g = readers[0]
    if g.target is operator.getitem and isinstance(g.args[1], Node):
        regroup = g.args[1]
    elif is_method(g, "index_select") and g.args[1] == 0 and isinstance(g.args[2], Node):
        regroup = g.args[2]
    else:
        return f"the received rows go to {g.name} ({target_name(g)}), not a regroup by expert"
    nodes = [g, regroup]
    sorter = regroup
    if regroup.target is operator.getitem and regroup.args[1] == 1:
        sorter = regroup.args[0]
        nodes.append(sorter)
        if not (is_method(sorter, "sort") or is_call(sorter, torch.sort)):
            return f"{regroup.name} is not a sort of the received rows' experts"
    elif not (is_method(regroup, "argsort") or is_call(regroup, torch.argsort)):
        return f"the received rows are reordered by {regroup.name}, not by expert"
    key = sorter.args[0]
    if arg(sorter, 1, "dim", -1) not in (0, -1) or arg(sorter, 2, "descending", False):
        return "the regroup sort is descending or along another dim"
    if not is_call(key, torch.repeat_interleave) or len(key.args) < 2:
        return f"{key.name} is not the local expert of each received row"
    ids, reps = key.args[0], key.args[1]
    if unflatten(reps) is not recv_counts or not _is_local_ids(ids, W, E_l):
        return f"{key.name} does not give each received row its local expert"
    nodes += [key, ids, *walks.input_chain(reps, recv_counts), ids.args[0]]
    return g, regroup, nodes


def _unregroup(y: Node, regroup: Node):
    """``y[regroup] = y_g`` into a fresh buffer, or ``zeros.index_copy_(0, regroup, y_g)`` ->
    ``(y_g, nodes)``: rows put back in the received order."""
    if _is_buffer(y):
        writes = [u for u in y.users if u.target is operator.setitem]
        if len(writes) != 1 or writes[0].args[0] is not y or writes[0].args[1] is not regroup:
            return f"{y.name} is not filled as buf[regroup] = rows"
        return writes[0].args[2], [y, writes[0]]
    if is_method(y, "index_copy_", "index_copy") and y.args[1] == 0 and y.args[2] is regroup:
        if not _is_buffer(y.args[0]) or len(y.args[0].users) != 1:
            return f"{y.name} copies into a tensor that is not a fresh buffer"
        return y.args[3], [y, y.args[0]]
    return f"{y.name} does not put the expert outputs back in the received order"


# ----------------------------------------------------------------------------- the match
def _sorted_rows(s: Node):
    """The family-D front of the block: ids, permutation, token index, rows, weights, way back.

    Returns ``(walk, topk_idx, K, perm, tok, w_sorted, back, x, rows)``, why not, or None when
    ``s`` is no sort of top-k ids."""
    ids_flat = s.args[0] if s.args else s.kwargs.get("input")
    if not (isinstance(ids_flat, Node) and walks.is_int_tensor(ids_flat)):
        return None
    topk_idx = unflatten(ids_flat)
    tv = val(topk_idx)
    if val(ids_flat).dim() != 1 or not walks.is_int_tensor(topk_idx) or tv.dim() not in (1, 2):
        return None
    if arg(s, 1, "dim", -1) not in (0, -1) or arg(s, 2, "descending", False):
        return "the sort is descending or not along the ids"
    K = 1 if tv.dim() == 1 else tv.shape[1]
    if not isinstance(K, int):
        return "the number of slots per token is symbolic"
    w = walks.Walk(s)
    w.topk_idx = topk_idx
    w.seen += walks.input_chain(ids_flat, topk_idx)
    if walks.is_sort(s) and (is_call(s, torch.argsort) or is_method(s, "argsort")):
        perm = s
    else:
        perm = None
        for u in s.users:
            if u.target is operator.getitem and u.args[1] in (0, 1):
                perm = u if u.args[1] == 1 else perm
                w.sorted_vals = u if u.args[1] == 0 else w.sorted_vals
                w.seen.append(u)
            else:
                return f"the sort result is used by {u.name}"
        if perm is None:
            return None
    tok = perm if K == 1 else None
    w_sorted, back = None, []
    for u in perm.users:
        if K > 1 and walks.is_floordiv_by(u, perm, K):
            tok = u
        elif u.target is operator.getitem and u.args[1] is perm and walks.is_float_tensor(u):
            w_sorted = u
        elif (
            is_method(u, "index_copy_", "index_copy") and u.args[1] == 0 and u.args[2] is perm
        ) or (u.target is operator.setitem and u.args[1] is perm):
            back.append(u)
        elif is_call(u, torch.empty_like, torch.zeros_like) and u.args[0] is perm:
            continue
        elif K != 1:
            return f"the sort's permutation is also used by {u.name} ({target_name(u)})"
    if tok is None:
        return "no token index perm // K follows the sort"
    w.seen.append(tok)
    got = walks.gathered_rows([tok], back, w_sorted, K, w)
    if isinstance(got, str):
        return got
    rows, x = got
    return w, topk_idx, K, perm, tok, w_sorted, back, x, rows


def _match_ep(s: Node) -> MoEMatch | str | None:
    front = _sorted_rows(s)
    if not isinstance(front, tuple):
        return front
    w, topk_idx, K, perm, tok, w_sorted, back, x, rows = front
    sends = [u for u in rows.users if _is_a2a(u)]
    if not sends:
        return None  # no all_to_all of the sorted rows: not hand-written EP (family D's)
    others = [u for u in rows.users if u is not sends[0] and not _is_buffer(u)]
    if len(sends) != 1 or others:
        return "the sorted rows are used beside the all_to_all that sends them"
    fwd = _exchange(sends[0])
    if isinstance(fwd, str):
        return fwd
    w.seen += fwd.nodes

    got = walks.weights_and_way_back(back, perm, tok, w_sorted, topk_idx, K, w)
    if isinstance(got, str):
        return got
    returned, output, base, last_write, topk_weights = got

    # The way back: the reverse exchange, with the forward split sizes swapped.
    rev = _exchange_into(returned)
    if rev is None:
        return f"{returned.name} (what is unpermuted) is not what an all_to_all_single received"
    w.seen += rev.nodes
    if rev.group_name != fwd.group_name:
        return "the rows go out and come back over different groups"
    if list(rev.out_splits or []) != list(fwd.in_splits or [None]) or list(
        rev.in_splits or []
    ) != list(fwd.out_splits or [None]):
        return "the way back does not swap the forward split sizes"

    # The group, the split sizes and the count exchange.
    pg = group_by_name(fwd.group_name)
    if isinstance(pg, str):
        return pg
    W = pg.size()
    send = _split_source(fwd.in_splits, W)
    recv = _split_source(fwd.out_splits, W)
    if isinstance(send, str) or isinstance(recv, str):
        return f"send/receive sizes: {send if isinstance(send, str) else recv}"
    (counts, send_nodes), (recv_counts, recv_nodes) = send, recv
    E = w.counts_experts(strip_casts(counts))
    if E is None:
        return f"the send sizes are not summed from counts of the routed ids ({counts.name})"
    w.set_experts(E)
    if E % W:
        return f"{E} experts cannot be split over {W} ranks"
    E_l = E // W
    cx = _exchange_into(recv_counts)
    if cx is None or cx.src is not counts or cx.group_name != fwd.group_name:
        return "the receive sizes do not come from exchanging the send counts"
    for splits in (cx.in_splits, cx.out_splits):
        if splits is not None and list(splits) != [E_l] * W:
            return "the count exchange does not send E/W counts to each rank"
    w.seen += [*send_nodes, *recv_nodes, *cx.nodes, counts]

    # Rows regrouped by local expert, the experts, and back to the received order.
    got = _regroup(fwd.received, recv_counts, W, E_l, fwd.nodes)
    if isinstance(got, str):
        return got
    rows_g, regroup, nodes = got
    w.seen += nodes
    got = _unregroup(rev.src, regroup)
    if isinstance(got, str):
        return got
    out_g, nodes = got
    w.seen += nodes
    got = _body(rows_g, out_g, recv_counts, W, E_l, pg.rank(), E)
    if isinstance(got, str):
        return got
    body, nodes = got
    known = set(w.seen) | w.counts_chain | set(nodes)
    remove = walks.removal_set(output, last_write, base, x, topk_idx, topk_weights, known)
    if isinstance(remove, str):
        return remove
    return MoEMatch(
        family=FAMILY,
        module_path=common_prefix_path([module_path(topk_idx), module_path(s), module_path(out_g)]),
        num_experts=E,
        x=x,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        output=output,
        remove=remove,
        body=body,
        base=base,
        last_write=last_write,
        verify_at_w1=False,
        own_group=pg,
    )


# ----------------------------------------------------------------------------- expert bodies
def _body(rows: Node, out: Node, recv_counts: Node, W: int, E_l: int, rank: int, E: int):
    """The experts between the grouped rows and their outputs: stacked ``[E_l, ...]``
    parameters, or a ``ModuleList`` on ``split`` segments (given to the rewrite padded with None
    outside this rank's experts). Returns ``(body, nodes it covers)`` or why not."""

    def tokens_per_expert(n: Node) -> bool:
        return _per_rank_sum(strip_casts(n), W, dim=0) is recv_counts

    region = gbody.body_region(rows, out)
    if not region:
        return "the expert output does not depend on the grouped rows"
    for n in region:
        why = walks.check_body_node(n)
        if why is not None:
            return why
    sup = gbody.collect_support(region, rows, lambda n: "counts" if tokens_per_expert(n) else None)
    if isinstance(sup, str):
        return sup
    support, counts, row_ids, params = sup
    nodes = sorted(set(support) | set(region), key=graph_order(rows.graph).get)
    covered = [*nodes, *counts, *(a for c in counts for a in walks.input_chain(c, recv_counts))]
    stacked = [p for p in params if _used_stacked(p, set(nodes))]
    if params and len(stacked) == len(params):
        for p in params:
            if val(p).dim() == 0 or val(p).shape[0] != E_l:
                return f"{p.name} is not stacked over the {E_l} local experts"
        tags = gbody.branch_tags(nodes, rows, params, counts, E_l)
        if isinstance(tags, str):
            return tags
        b = gbody.Body(rows, out, nodes, counts, row_ids, params, tags, E_l)
        return StackedExperts(params, b.emit), covered
    if stacked:
        return f"{stacked[0].name} is a stacked parameter beside per-expert modules"
    subs = _module_list(rows, out, counts, E_l)
    if isinstance(subs, str):
        return subs
    pad_before, pad_after = [None] * (rank * E_l), [None] * (E - (rank + 1) * E_l)
    return ModuleListExperts(pad_before + subs + pad_after), covered


def _used_stacked(p: Node, region: set[Node]) -> bool:
    """``p`` is read only as ``p[j]``, transposed, or whole by a grouped matmul."""
    for u in p.users:
        if u not in region:
            continue
        if u.target is operator.getitem and isinstance(u.args[1], int):
            continue
        if is_method(u, "transpose", "permute", "contiguous") or is_call(
            u, torch.transpose, torch._grouped_mm
        ):
            continue
        return False
    return True


def _module_list(rows: Node, out: Node, counts: list[Node], E_l: int):
    """``torch.cat([expert_j(part_j) for j])`` over ``rows.split(tokens_per_expert.tolist())``:
    one :class:`ExpertSubgraph` per local expert, each reading only its own segment and
    parameters."""
    if not (is_call(out, torch.cat) and arg(out, 1, "dim", 0) == 0):
        return "the local experts' outputs are not concatenated along rows"
    outs = out.args[0]
    splits = [u for u in rows.users if is_method(u, "split") or is_call(u, torch.split)]
    if len(outs) != E_l or len(splits) != 1 or len(rows.users) != 1:
        return f"the grouped rows are not split into {E_l} expert segments"
    sp = splits[0]
    sizes = arg(sp, 1, "split_size_or_sections", sp.kwargs.get("split_size"))
    if arg(sp, 2, "dim", 0) != 0 or not isinstance(sizes, (list, tuple)) or len(sizes) != E_l:
        return "the grouped rows are not split by per-expert row counts"
    for j, it in enumerate(sizes):
        g = it.args[0] if isinstance(it, Node) and is_method(it, "item") else None
        if not (g is not None and g.target is operator.getitem and g.args[1] == j):
            return f"split size {j} is not the row count of local expert {j}"
        if g.args[0] not in counts:
            return f"split size {j} is not read from the per-expert row counts"
    parts = {u.args[1]: u for u in sp.users if u.target is operator.getitem}
    subs, owned = [], set()
    for j in range(E_l):
        if j not in parts:
            return f"local expert {j} reads no segment"
        nodes = nodes_between(parts[j], outs[j])
        if not nodes and outs[j] is not parts[j]:
            return f"local expert {j}'s output does not read its segment"
        inside = {parts[j], *nodes}
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                if not is_param_like(a) or a in owned:
                    return f"local expert {j}'s {n.name} reads {a.name}, not its own parameter"
        owned |= {a for n in nodes for a in n.all_input_nodes if is_param_like(a)}
        subs.append(ExpertSubgraph(j, parts[j], outs[j], nodes))
    return subs


# ----------------------------------------------------------------------------- by value
# Hand-written EP recognised by what it computes, whatever its spelling: the router's top-k
# ids, a ModuleList of experts (this rank's E_l, or all E when the block holds no collective:
# the W = 1 form of EP code), the rows x they read, the routed sum they reach, and a weight
# hypothesis; the simulated-world check (``_ep_world``) decides. This runs after every other
# family, so it only sees blocks none of them rewrote.
def find_by_value(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]:
    """One :class:`MoEMatch` per block confirmed by the simulated-world check."""
    graph = gm.graph
    done = _dispatched(graph)
    routers = router_ids(graph)
    ids_nodes = [i for i in routers if i not in done]
    if not ids_nodes:
        return []
    lists = _expert_lists(graph)
    if not lists:
        return []
    order = graph_order(graph)
    return each_candidate(FAMILY, ids_nodes, lambda i: _by_value(gm, i, lists, order), rejects)


def _dispatched(graph: fx.Graph) -> set[Node]:
    """Router ids (and their views) an earlier rewrite already hands to ``moe_ops``."""
    out: set[Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "moe_ops":
            a = n.args[1] if len(n.args) > 1 else None
            while isinstance(a, Node) and a not in out:
                out.add(a)
                a = a.args[0] if a.args else None
    return out


def _expert_lists(graph: fx.Graph) -> dict[str, dict[int, list[Node]]]:
    """``{P: {j: nodes run by module P.j}}`` for module lists whose entries ``0 .. n-1`` run
    in the graph (n >= 2, or one entry of a list named like experts)."""
    found: dict[str, dict[int, list[Node]]] = {}
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        for path in module_stack_paths(n):
            head, _, last = path.rpartition(".")
            if head and last.isdigit():
                found.setdefault(head, {}).setdefault(int(last), []).append(n)
    return {
        p: d
        for p, d in found.items()
        if sorted(d) == list(range(len(d))) and (len(d) >= 2 or "expert" in p.lower())
    }


def _rows_of(n: Node, T, H) -> bool:
    v = val(n)
    if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 2):
        return False
    return guard_or_false(v.shape[0] == T) and guard_or_false(v.shape[1] == H)


_WRITES = ("index_add_", "index_put_", "scatter_add_", "index_copy_", "add_")
_ONTO = ("index_add", "scatter_add", "index_put", "add")
_ONTO_CALLS = (torch.index_add, torch.scatter_add, torch.add, operator.add)


def _routed_sums(T, outs: list[Node], routed: set[Node], order) -> list[tuple]:
    """Candidates ``(output, last_write, writes, base)`` for the routed sum: an accumulator that
    in-place writes fill with every expert output, then the first three ``[T, H']`` values every
    expert output reaches (the weights may be applied after the first: ``bmm(w, rows)``)."""
    H = val(outs[0]).shape[-1]
    reaches = [reach(o, order) for o in outs]
    acc_writes: dict[Node, list[Node]] = {}
    for n in set().union(*reaches):
        if is_method(n, *_WRITES) or n.target in (operator.setitem, torch.Tensor.index_put_):
            acc = n.args[0]
            if isinstance(acc, Node) and acc not in routed:
                acc_writes.setdefault(acc, []).append(n)
    found = []
    for acc, ws in sorted(acc_writes.items(), key=lambda kv: order[kv[0]]):
        written = set().union(*(ancestors([w]) for w in ws))
        if all(o in written for o in outs) and _rows_of(acc, T, H):
            ws.sort(key=order.get)
            fresh = is_call(acc, torch.zeros, torch.zeros_like) or is_method(acc, "new_zeros")
            found.append((acc, ws[-1], ws, None if fresh else acc))
    joins = [n for n in sorted(set.intersection(*reaches), key=order.get) if _rows_of(n, T, H)]
    after = set().union(*reaches)
    for n in joins[:3]:
        found.append((n, None, [], None))
        # out-of-place accumulation onto a value of its own (``shared(x).scatter_add(...)``)
        acc = n.args[0] if n.args else None
        onto = is_method(n, *_ONTO) or is_call(n, *_ONTO_CALLS)
        if onto and isinstance(acc, Node) and acc not in routed | after and _rows_of(acc, T, H):
            found.append((n, None, [], acc))
    return found


def _drops_past_capacity(routed: set[Node], order) -> str | None:
    for n in sorted(routed, key=order.get):
        if (is_call(n, torch.cumsum) or is_method(n, "cumsum")) and val(n).dim() >= 2:
            for u in descendants(n):
                if u.op in ("call_function", "call_method") and str(u.target).split(".")[-1].strip(
                    "_<>' "
                ) in ("lt", "le", "gt", "ge"):
                    return (
                        f"tokens past an expert's capacity are dropped ({n.name} compared at "
                        f"{u.name}): moe_ops' capacity mode drops other tokens"
                    )
    return None


def _by_value(gm, ids: Node, lists, order) -> MoEMatch | str | None:
    routed = reach(ids, order)
    here = module_path(ids)
    found = None
    for path in sorted(lists, key=len, reverse=True):
        block = path.rsplit(".", 1)[0] if "." in path else ""
        if here.startswith(block) and any(n in routed for g in lists[path].values() for n in g):
            found = path, block
            break
    if found is None:
        return None
    path, block = found
    entries = lists[path]
    subs = []
    for j in range(len(entries)):
        sub = expert_subgraph(j, entries[j])
        if isinstance(sub, str):
            return f"expert {j} ({path}.{j}) {sub}"
        subs.append(sub)
    if any(s.input not in routed for s in subs):
        return "an expert's input does not depend on the router's ids"
    T = val(ids).shape[0]
    H = val(subs[0].input).shape[-1]
    common = set.intersection(*(ancestors([s.input]) for s in subs))
    xs = [n for n in common if n not in routed and n is not ids and _rows_of(n, T, H)]
    if not xs:
        return "no [T, H] rows that every expert's input is gathered from"
    x = max(xs, key=order.get)
    sums = _routed_sums(T, [s.output for s in subs], routed, order)
    if not sums:
        return "no [T, H'] value that every expert's output reaches"
    after = set().union(*(reach(s.output, order) for s in subs))
    upstream = ancestors([n for got in sums for n in (got[0], *got[2])])
    held = [n for n in (routed | after) & upstream if holds_collective(n)]
    if not held:
        pg, W, rank = None, 1, 0
    else:
        names = group_names(held)
        if len(names) != 1:
            return f"the block's collectives use {len(names)} groups ({sorted(names)}), not one"
        pg = group_by_name(next(iter(names)))
        if isinstance(pg, str):
            return pg
        W, rank = pg.size(), pg.rank()
    why = _drops_past_capacity(routed, order)
    if why is not None:
        return why
    E_l = len(subs)
    E = E_l * W
    scores = ids.args[0]  # argmax(scores) or topk(scores)[1]
    if ids.target is operator.getitem and isinstance(scores, Node) and scores.args:
        scores = scores.args[0]
    sv = val(scores) if isinstance(scores, Node) else None
    if isinstance(sv, torch.Tensor) and sv.dim() >= 1 and guard_or_false(sv.shape[-1] != E):
        return (
            f"the router picks among {sv.shape[-1]} experts, but the block holds {E_l} "
            f"per rank on {W} rank(s) ({E})"
        )
    body = ModuleListExperts([None] * (rank * E_l) + subs + [None] * (E - (rank + 1) * E_l))
    first = structural = None
    tries = [
        (got, w)
        for got in sums
        for w in weight_candidates(ids, subs, got[0], got[2], routed, order)
    ]
    for (output, last_write, writes, base), w in tries:
        remove = _removal(ids, x, w, subs, output, last_write, writes, base, routed, order)
        if isinstance(remove, str):
            structural = structural or f"with output {output.name}: {remove}"
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
            body=body,
            base=base,
            last_write=last_write,
            verify_at_w1=False,
            own_group=pg,
        )
        why = verify_in_world(gm, match, W, rank)
        if why is None:
            return match
        weights = "no weights" if w is None else f"weights {w.name}"
        first = first or f"with output {output.name} and {weights}: {why}"
    kind = "hand-written expert parallelism" if W > 1 or held else "routing"
    return (
        f"not recognised as {kind}: the block is not sum_k w[t, k] * expert_ids[t, k](x[t]) "
        f"for its router's ids ({ids.name}) under any weights tried (first: {first or structural})"
    )


def _dead_after(cand: set[Node], end: int, order) -> set[Node]:
    """Values the block computes from its own and never uses (``recv.split(sizes)`` whose
    parts nothing reads), with the runtime asserts on them: they go with the block."""
    below = set().union(*(descendants(n) for n in cand)) - cand
    dead: set[Node] = set()
    for n in sorted(below, key=order.get, reverse=True):
        pure = n.op in ("call_function", "call_method") and not is_inplace(n)
        pure = pure and not holds_collective(n)
        assert_ = n.target is torch.ops.aten._assert_scalar.default
        if order[n] <= end and (pure or assert_) and set(n.users) <= cand | dead:
            dead.add(n)
    return dead


def _removal(ids, x, w, subs, output, last_write, writes, base, routed, order):
    """What the rewrite deletes: what is routed, weighted or run by the experts on the way to
    the output (in-place writes and buffers made for the block included), minus what
    something else still reads."""
    end = order[last_write if last_write is not None else output]
    upstream = ancestors([output, *writes])
    experts = {n for s in subs for n in s.nodes}
    weighted = reach(w, order) if w is not None else set()
    inside = {n for n in routed | experts | weighted if order[n] <= end}
    cand = block_and_writes(upstream, inside, writes, output, base)
    changed = True
    while changed:
        changed = False
        for n in {a for c in cand for a in c.all_input_nodes} - cand:
            made = n.op == "get_attr" or (
                n.op in ("call_function", "call_method") and not is_inplace(n)
            )
            feeds = set(n.all_input_nodes) <= cand or n.target in CREATE or n.op == "get_attr"
            feeds = feeds or is_constant(n)
            if made and set(n.users) <= cand and feeds:
                cand.add(n)
                changed = True
    for n in list(cand):
        cand.update(assert_only_users(n))
    gbody.add_hangers(cand)
    cand |= _dead_after(cand, end, order)
    cand -= {ids, x, w, base} | ancestors([x])
    remove, why = prune_removal(cand, output, last_write)
    if why:
        return why
    kept = set(remove)
    for s in subs:
        if any(n not in kept for n in s.nodes):
            return f"expert {s.expert}'s output is used outside the block"
    return remove
