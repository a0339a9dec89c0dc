"""The numerical check of a hand-written expert-parallel block, run in a simulated world.

A block holding the user's own collectives cannot run by itself in one process: its
collectives would wait for peers that are not there (and at compile time a rank that decided
differently would hang the others). :func:`verify_in_world` runs the block's region instead in a
world of W ranks simulated inside this process, where this rank r is real and every peer
*mirrors* it:

* in every exchange a peer sends this rank what this rank sends itself (its own chunk r): the
  same counts, the same expert ids, the same rows. Whatever the protocol (counts per (rank,
  expert) by ``all_to_all_single``, a count matrix by ``all_gather``, per-rank counts with the
  ids shipped beside the rows), the exchanges then agree with one another;
* a peer's experts are the identity: on the way back (an exchange whose input depends on the
  experts' outputs) a peer returns the rows this rank sent it, unchanged.

The block's output must then be ``base + sum_k w[t, k] * v(t, k)`` with ``v = expert(x[t])``
for this rank's experts and ``v = x[t]`` for every other rank's, which the W = 1 rewrite of the
local experts computes (other ranks' ids become -1, their identity term is added). And since
every peer sent it the same rows as it sent itself, the rows it sends back to each peer must
equal those it sends back to itself: this catches experts run on rows not grouped by local
expert, and the way back with the wrong split sizes. Inputs are random (routing over all E
experts, weights, parameters); a second draw routes every token to experts ``0 .. K-1``.

Shape letters: T tokens, H hidden, K top-k, E experts, W ranks, E_l = E / W.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import operator

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.emit import emit_routed
from fx_passes.graph import ancestors, call, descendants, is_param_slice, val
from fx_passes.match import ExpertSubgraph, ModuleListExperts, MoEMatch
from fx_passes.verify import _region_inputs, _region_nodes, _tolerance


def _ops(*names: str) -> tuple:
    out = []
    for ns in ("_c10d_functional", "_c10d_functional_autograd"):
        for name in names:
            packet = getattr(getattr(torch.ops, ns, None), name, None)
            if packet is not None:
                out += [packet, packet.default]
    return tuple(out)


A2A = _ops("all_to_all_single")
GATHER = _ops("all_gather_into_tensor")
WAIT = _ops("wait_tensor")
APPLY = getattr(torch.ops.higher_order, "autograd_function_apply", None)


def is_collective(n: Node) -> bool:
    """A ``torch.distributed`` collective as Dynamo captures it (functional op or wait)."""
    return n.op == "call_function" and "c10d" in str(n.target)


def holds_collective(n: Node) -> bool:
    """``n`` is a collective, or an autograd.Function application whose forward runs one."""
    if is_collective(n):
        return True
    if APPLY is None or n.op != "call_function" or n.target is not APPLY:
        return False
    body = n.args[0] if n.args else None
    if not (isinstance(body, Node) and body.op == "get_attr"):
        return False
    with contextlib.suppress(AttributeError):
        sub = fx.graph_module._get_attr(n.graph.owning_module, body.target)
        return any(holds_collective(m) for m in sub.graph.nodes)
    return False


def group_names(nodes) -> set[str]:
    """The group names the collectives among ``nodes`` (and in their autograd bodies) use."""
    names: set[str] = set()
    for n in nodes:
        if is_collective(n):
            for a in (*n.args, *n.kwargs.values()):
                if isinstance(a, str):
                    names.add(a)
        elif holds_collective(n):
            sub = fx.graph_module._get_attr(n.graph.owning_module, n.args[0].target)
            names |= group_names(sub.graph.nodes)
    return names


def is_constant(n: Node) -> bool:
    """A value computed from constants alone (no input, parameter or buffer)."""
    if n.op not in ("call_function", "call_method"):
        return False
    return all(a.op in ("call_function", "call_method") for a in ancestors([n]))


class _Broken(Exception):
    """The block does not behave like expert parallelism in the simulated world."""


class _World(fx.Interpreter):
    """Runs a region with its collectives answered by mirrored peers (module docstring)."""

    def __init__(self, module, W: int, rank: int, returns: set[str], state: dict):
        super().__init__(module)
        self.W, self.rank, self.returns, self.state = W, rank, returns, state

    def run_node(self, n: Node):
        self.node = n
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        name = self.node.name
        if target in WAIT:
            return args[0]
        if target in A2A:
            inp, out_splits, in_splits = args[:3]
            if name in self.returns:
                return self._back(name, inp, out_splits, in_splits)
            return self._out(name, inp, out_splits, in_splits)
        if target in GATHER:
            return torch.cat([args[0]] * self.W)
        if APPLY is not None and target is APPLY:
            fwd = args[0]
            inner = set(self.returns)
            if name in self.returns:
                inner |= {m.name for m in fwd.graph.nodes if m.target in A2A}
            grad = torch.is_grad_enabled()
            try:
                got = _World(fwd, self.W, self.rank, inner, self.state).run(*args[2:])
            finally:
                torch.set_grad_enabled(grad)
            return got[0]
        if "c10d" in str(target):
            raise _Broken(
                f"{name} ({target}) is a collective other than all_to_all_single / "
                f"all_gather_into_tensor: every rank would need every token's result"
            )
        return super().call_function(target, args, kwargs)

    def _chunks(self, name, t, splits, what):
        n = t.shape[0]
        sizes = list(splits) if splits is not None else [n // self.W] * self.W
        if len(sizes) != self.W or sum(sizes) != n:
            why = "not one chunk per rank"
            if what == "sends back":
                why = "its split sizes are not the forward ones swapped"
            raise _Broken(f"{name} {what} {n} rows in chunks {sizes}: {why}")
        return list(t.split(sizes))

    def _out(self, name, inp, out_splits, in_splits):
        chunks = self._chunks(name, inp, in_splits, "sends")
        own = chunks[self.rank]
        want = [own.shape[0]] * self.W
        if out_splits is not None and list(out_splits) != want:
            raise _Broken(
                f"{name} expects {list(out_splits)} rows from the ranks, but each sends it "
                f"{own.shape[0]} (as many as this rank sends itself)"
            )
        if inp.is_floating_point() and inp.dim() == 2:
            self.state.setdefault("sent", []).append(chunks)
        scale = self.state.get("scale")
        if scale and inp.is_floating_point() and inp.shape[1:] == self.state["row_shape"]:
            # peers send rows of their own (the same counts and ids, other values)
            return torch.cat([own if s == self.rank else own * scale[s] for s in range(self.W)])
        return torch.cat([own] * self.W)

    def _back(self, name, y, out_splits, in_splits):
        chunks = self._chunks(name, y, in_splits, "sends back")
        own = chunks[self.rank]
        self.state["back"] = chunks
        rtol, atol = _tolerance(y.dtype)
        for s, c in enumerate(chunks if not self.state.get("scale") else ()):
            same = c.shape == own.shape and torch.allclose(c, own, rtol=rtol, atol=atol)
            if s != self.rank and not same:
                raise _Broken(
                    f"the rows sent back to rank {s} differ from those sent back to rank "
                    f"{self.rank}, which sent the same rows: the experts do not see each rank's "
                    f"rows grouped by local expert"
                )
        sent = [c for c in self.state.get("sent", []) if all(a.shape[1:] == y.shape[1:] for a in c)]
        if not sent:
            raise _Broken(
                f"{name} sends back rows of shape {tuple(y.shape[1:])}, but no rows of that "
                f"shape went out: the check's peers (identity experts) cannot answer it"
            )
        fwd = sent[-1]
        out = []
        for s in range(self.W):
            got = own if s == self.rank else fwd[s].to(y.dtype)
            if out_splits is not None and out_splits[s] != got.shape[0]:
                raise _Broken(
                    f"the way back ({name}) expects {out_splits[s]} rows from rank {s}, which "
                    f"was sent {fwd[s].shape[0]}: its split sizes are not the forward ones swapped"
                )
            out.append(got)
        return torch.cat(out)


def _with_remote(routed, x, idx, w, lo: int, e_l: int):
    """``routed`` plus the identity experts of the other ranks: ``sum_k w[t, k] * x[t]`` over
    the slots whose expert is not in ``[lo, lo + e_l)``."""
    idx = idx if idx.dim() == 2 else idx.unsqueeze(1)
    remote = ((idx < lo) | (idx >= lo + e_l)).to(torch.float32)
    if w is not None:
        remote = remote * w.reshape(idx.shape).to(torch.float32)
    return routed + (x.to(torch.float32) * remote.sum(1, keepdim=True)).to(routed.dtype)


def _reference(gm, match: MoEMatch, ext: list[Node], W: int, rank: int) -> fx.GraphModule:
    """The W = 1 rewrite of this rank's experts, other ranks' experts as the identity."""
    e_l = match.num_experts // W
    lo = rank * e_l
    g = fx.Graph()
    env = {a: g.placeholder(f"in{i}") for i, a in enumerate(ext)}
    for a in ext:
        env[a].meta.update({k: v for k, v in a.meta.items() if k != "moe_shard"})
    idx = env[match.topk_idx]
    loc = call(g, operator.sub, (idx, lo))
    ge, lt = call(g, operator.ge, (loc, 0)), call(g, operator.lt, (loc, e_l))
    mine = call(g, torch.logical_and, (ge, lt))
    local_idx = call(g, torch.where, (mine, loc, -1))
    experts = match.body.experts[lo : lo + e_l]
    body = ModuleListExperts(
        [ExpertSubgraph(j, s.input, s.output, s.nodes) for j, s in enumerate(experts)]
    )
    local = dataclasses.replace(match, num_experts=e_l, body=body)
    for s in experts:
        for n in s.nodes:
            for a in n.all_input_nodes:
                if is_param_slice(a) and a not in env:
                    env[a] = g.node_copy(a, lambda b: env[b])

    def lookup(a: Node) -> Node:
        return local_idx if a is match.topk_idx else env[a]

    routed = emit_routed(g, local, lookup, "", 1, 0)
    w = env[match.topk_weights] if match.topk_weights is not None else None
    g.output(g.call_function(_with_remote, (routed, env[match.x], idx, w, lo, e_l)))
    return fx.GraphModule(gm, g)


def _inputs(match: MoEMatch, ext: list[Node], tokens: int, skewed: bool) -> list:
    """Random inputs for ``tokens`` tokens; per-token values the block reads besides the
    routing (router logits read for their shape, say) get random values of their own."""
    T = val(match.x).shape[0]
    E = match.num_experts
    out = []
    for a in ext:
        v = val(a)
        if isinstance(v, torch.SymInt):
            hint = v.node.hint if v.node.hint is not None else v
            out.append(tokens if v == T else int(hint))
            continue
        if not isinstance(v, torch.Tensor):
            out.append(v)
            continue
        rows = v.dim() and (v.shape[0] == T or isinstance(v.shape[0], torch.SymInt))
        shape = ((tokens,) if rows else (int(v.shape[0]),) if v.dim() else ()) + tuple(
            int(s) for s in v.shape[1:]
        )
        if a is match.topk_idx:
            K = 1 if v.dim() == 1 else int(v.shape[1])
            ids = torch.rand(tokens, E).argsort(-1)[:, :K]
            if skewed:
                ids = torch.arange(K).expand(tokens, K)
            out.append(ids.reshape(shape).to(v.dtype).to(v.device))
        elif a is match.topk_weights:
            out.append(torch.rand(shape, device=v.device).to(v.dtype) + 0.1)
        elif v.dtype.is_floating_point:
            out.append(torch.randn(shape, device=v.device).to(v.dtype) * 0.5)
        else:
            out.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
    return out


def _returns(region: list[Node], match: MoEMatch) -> set[Node]:
    """The exchanges of the way back: those whose input depends on an expert's output."""
    after: set[Node] = set()
    for s in match.body.experts:
        if s is not None:
            after |= descendants(s.output)
    return {n for n in region if n in after and holds_collective(n)}


def _compare(old, new, inputs, W: int, rank: int, returns: set[str]) -> str | None:
    """None when the block in the simulated world and the reference agree on ``inputs``."""
    state: dict = {}
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            ref = _World(old, W, rank, returns, state).run(*[_clone(i) for i in inputs])
        except _Broken as e:
            return e.args[0]
        except Exception as e:  # noqa: BLE001 - the block may hard-code T
            return f"the original block fails on random tokens: {type(e).__name__}: {e}"
        try:
            got = new(*inputs)
        except Exception as e:  # noqa: BLE001
            return f"the rewrite fails on random tokens: {type(e).__name__}: {e}"
    if not isinstance(ref, torch.Tensor) or got.shape != ref.shape:
        return f"the rewrite gives {tuple(got.shape)}, the block {getattr(ref, 'shape', ref)}"
    rtol, atol = _tolerance(ref.dtype)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if not err <= atol * max(scale, 1.0) + rtol * scale:
        return f"the rewrite differs from the block on random inputs (max abs diff {err:.3g})"
    return None


def _crossed(old, inputs, x_at: int, W: int, rank: int, returns: set[str]) -> str | None:
    """With peers sending rows of their own (rank s: this rank's rows times ``c_s``), the rows
    sent back to rank s must be what this rank's experts give on its own rows times ``c_s``
    (run with ``x`` scaled): catches rows sent back to another rank than they came from."""
    scale = {s: 1.5 + 0.5 * s for s in range(W)}
    row_shape = inputs[x_at].shape[1:]
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        state = {"scale": scale, "row_shape": row_shape}
        try:
            _World(old, W, rank, returns, state).run(*[_clone(i) for i in inputs])
        except Exception:  # noqa: BLE001 - the mirrored run passed; this one is not needed
            return None
        got = state.get("back")
        if got is None:
            return None
        for s in range(W):
            if s == rank:
                continue
            scaled = [_clone(i) for i in inputs]
            scaled[x_at] = scaled[x_at] * scale[s]
            ref_state: dict = {}
            _World(old, W, rank, returns, ref_state).run(*scaled)
            want = ref_state["back"][rank]
            rtol, atol = _tolerance(want.dtype)
            if got[s].shape != want.shape or not torch.allclose(got[s], want, rtol, atol):
                return (
                    f"the rows rank {s} sent are not the ones sent back to it (its rows scaled "
                    f"by {scale[s]} come back as another rank's): the way back mixes up ranks"
                )
    return None


def _clone(i):
    return i.clone() if isinstance(i, torch.Tensor) else i


def verify_in_world(gm: fx.GraphModule, match: MoEMatch, W: int, rank: int) -> str | None:
    """None when ``match`` (ModuleList experts, padded with None outside this rank's) agrees
    with its rewrite in the simulated world of ``W`` ranks (module docstring), else why not."""
    region = _region_nodes(match)
    # values made from constants alone (``arange(T).expand(E, -1)``) run with the block
    made = {a for n in region for a in ancestors(n.all_input_nodes) if is_constant(a)}
    region = [n for n in match.output.graph.nodes if n in made or n in set(region)]
    ext = _region_inputs(match, region)
    returns = _returns(region, match)
    try:
        g_old = fx.Graph()
        env = {a: g_old.placeholder(f"in{i}") for i, a in enumerate(ext)}
        for n in region:
            env[n] = g_old.node_copy(n, lambda a: env[a])
        g_old.output(env[match.output])
        old = fx.GraphModule(gm, g_old)
        new = _reference(gm, match, ext, W, rank)
    except Exception as e:  # noqa: BLE001 - any failure to build means "not sure"
        return f"could not build the check: {type(e).__name__}: {e}"
    names = {env[n].name for n in returns}
    T = val(match.x).shape[0]
    hint = T.node.hint if isinstance(T, torch.SymInt) else T
    sizes = [5] + ([int(hint)] if isinstance(hint, int) and hint != 5 else [])
    why = "no token count to try"
    for tokens in sizes:
        inputs = _inputs(match, ext, tokens, False)
        why = _compare(old, new, inputs, W, rank, names)
        if why is not None and why.startswith("the original block fails"):
            continue
        if why is None and W > 1:
            why = _crossed(old, inputs, ext.index(match.x), W, rank, names)
        if why is None:
            why = _compare(old, new, _inputs(match, ext, tokens, True), W, rank, names)
            if why is not None and why.startswith("the original block fails"):
                why = None  # the block cannot run such a routing (it hard-codes one)
            elif why is not None:
                why = f"with every token routed to the same experts: {why}"
        return why
    return why
