"""The numerical check of a candidate: the matched region against its W = 1 rewrite.

:func:`verify_match` copies the nodes the rewrite would remove (plus the routing values they
read) into a graph of their own, emits the W = 1 rewrite of the same region into another, feeds
both the same random inputs (random routing, random floating-point weights: the check never
reads the values of experts) and compares. A match the check does not confirm is left alone.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node

from fx_passes.emit import emit_routed
from fx_passes.graph import ancestors, descendants, is_param_slice, val
from fx_passes.match import MoEMatch, StackedExperts


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-2, 3e-2
    if dtype == torch.float32:
        return 1e-4, 1e-4
    return 1e-9, 1e-9


def _region_nodes(match: MoEMatch) -> list[Node]:
    """What the check runs of the original block: the removed nodes, plus the routing values
    they read that stay in the graph for other users (a one-hot mask that also feeds an
    auxiliary loss, say), so that those follow the random ``topk_idx`` too, and the values they
    read that derive from the rows ``x`` alone, so that those follow the random rows."""
    removed = set(match.remove)
    boundary = ancestors([a for a in (match.x, match.topk_weights, match.base) if a is not None])
    routed = descendants(match.topk_idx)
    # values the block derives from the rows alone (x repeated per slot, x.expand(T, K, H)) are
    # recomputed from the random rows; the router's path to the ids and weights is not
    router = ancestors([a for a in (match.topk_idx, match.topk_weights) if a is not None])
    from_x = descendants(match.x) - router - {match.output}
    keep = ancestors(match.remove, within=(routed | removed | from_x) - boundary)
    region = removed | keep
    # experts' slices P[j] of a stacked parameter run with the block: the check feeds P
    region |= {a for n in region for a in n.all_input_nodes if is_param_slice(a)}
    return [n for n in match.output.graph.nodes if n in region]


def _region_inputs(match: MoEMatch, region: list[Node]) -> list[Node]:
    inside = set(region)
    ext: list[Node] = []

    def add(a: Node) -> None:
        if a not in inside and a not in ext:
            ext.append(a)

    for n in region:
        for a in n.all_input_nodes:
            add(a)
    for a in (match.x, match.topk_idx, match.topk_weights, match.base, match.output):
        if a is not None:
            add(a)
    if isinstance(match.body, StackedExperts):
        for p in match.body.params:
            add(p)
    return ext


def _random_inputs(
    match: MoEMatch, ext: list[Node], tokens: int, real: dict[Node, Any], skewed: bool = False
) -> list[Any] | str:
    """Inputs of the region for ``tokens`` tokens: random routing (``skewed``: every token to
    experts ``0 .. K-1``, the most load one expert can get), random floating-point values."""
    T = val(match.x).shape[0]
    E = match.num_experts
    out: list[Any] = []
    for a in ext:
        v = val(a)
        if a in real and not isinstance(real[a], torch.SymInt):
            out.append(real[a])
            continue
        if isinstance(v, torch.SymInt):
            out.append(tokens if v == T else int(v.node.hint if v.node.hint is not None else v))
            continue
        if not isinstance(v, torch.Tensor):
            return f"cannot verify: {a.name} has no example value"
        dev = v.device
        if a is match.x or a is match.output or a is match.base:
            shape = (tokens, *[int(s) for s in v.shape[1:]])
            out.append(torch.randn(shape, dtype=v.dtype, device=dev))
        elif a is match.topk_idx:
            K = 1 if v.dim() == 1 else int(v.shape[1])
            ids = torch.rand(tokens, E, device=dev).argsort(-1)[:, :K].to(v.dtype)
            if skewed:
                ids = torch.arange(K, device=dev).expand(tokens, K).to(v.dtype)
            out.append(ids.reshape(tokens) if v.dim() == 1 else ids)
        elif a is match.topk_weights:
            shape = (tokens, *[int(s) for s in v.shape[1:]])
            out.append(torch.rand(shape, device=dev).to(v.dtype) + 0.1)
        else:
            if v.dim() and (v.shape[0] == T or isinstance(v.shape[0], torch.SymInt)):
                return f"cannot verify: the block reads {a.name}, a per-token value"
            if any(isinstance(s, torch.SymInt) for s in v.shape):
                return f"cannot verify: {a.name} has a symbolic shape"
            if v.dtype.is_floating_point:
                out.append(torch.randn(tuple(v.shape), dtype=v.dtype, device=dev) * 0.5)
            else:
                out.append(torch.zeros(tuple(v.shape), dtype=v.dtype, device=dev))
    return out


def _region_modules(
    gm: fx.GraphModule,
    match: MoEMatch,
    region: list[Node],
    ext: list[Node],
    capacity: int | str | None = None,
):
    g_old, g_new = fx.Graph(), fx.Graph()
    env_old = {a: g_old.placeholder(f"in{i}") for i, a in enumerate(ext)}
    env_new = {a: g_new.placeholder(f"in{i}") for i, a in enumerate(ext)}
    for a in ext:  # the check feeds whole random weights, sharded experts' too
        env_new[a].meta.update({k: v for k, v in a.meta.items() if k != "moe_shard"})
    for n in region:
        env_old[n] = g_old.node_copy(n, lambda a: env_old[a])
        if is_param_slice(n):
            env_new[n] = g_new.node_copy(n, lambda a: env_new[a])
    g_old.output(env_old[match.output])
    out = emit_routed(g_new, match, lambda a: env_new[a], "", 1, 0, None, capacity)
    g_new.output(out)
    return fx.GraphModule(gm, g_old), fx.GraphModule(gm, g_new)


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


_ORIGINAL_FAILS = "the original block fails"


def _compare(match, old_mod, new_mod, ext, tokens, real, skewed: bool):
    """None when the block and its rewrite agree on one draw of inputs, else why not: a str, or
    a 1-tuple for a shape mismatch (the caller may retry with the real token count)."""
    inputs = _random_inputs(match, ext, tokens, real, skewed)
    if isinstance(inputs, str):
        return inputs
    # GraphModule prints a failing call's traceback to stderr; a failure here is an answer.
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            ref = old_mod(*[i.clone() if isinstance(i, torch.Tensor) else i for i in inputs])
        except Exception as e:  # noqa: BLE001 - the original may hard-code T
            return f"{_ORIGINAL_FAILS} on {tokens} random tokens: {e}"
        try:
            got = new_mod(*inputs)
        except Exception as e:  # noqa: BLE001
            return f"the rewrite fails on {tokens} random tokens: {type(e).__name__}: {e}"
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return (
            f"the rewrite gives {tuple(got.shape)} {got.dtype}, the block "
            f"{tuple(ref.shape)} {ref.dtype}",
        )
    rtol, atol = _tolerance(ref.dtype)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if not err <= atol * max(scale, 1.0) + rtol * scale:
        return f"the rewrite differs from the block on random inputs (max abs diff {err:.3g})"
    return None


def verify_match(
    gm: fx.GraphModule,
    match: MoEMatch,
    example_inputs: Sequence[Any] | None = None,
    capacity: int | str | None = None,
) -> str | None:
    """Run the matched region and its W = 1 rewrite on small random inputs.

    With ``capacity`` not None the rewrite checked is the capacity-mode one, with ``"worst-case"``
    capacity (an int capacity could overflow on the random routing). Parameters keep their real
    values when ``example_inputs`` holds real tensors for the graph's placeholders. Returns None
    when both agree, else why not (the graph is left untouched). Floating-point parameters and
    buffers always get random values: the check never reads the values of experts.
    """
    region = _region_nodes(match)
    ext = _region_inputs(match, region)
    real: dict[Node, Any] = {}
    if example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensor

        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for p, v in zip(phs, example_inputs, strict=False):
            routing = p is match.x or p is match.topk_idx or p is match.topk_weights
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) and p in ext:
                real.update({} if routing else {p: v})
    for a in ext:
        if a.op == "get_attr":
            with contextlib.suppress(AttributeError):
                real[a] = fx.graph_module._get_attr(gm, a.target)
    # Floating-point weights get values of the check's own: a rank's copy of experts it does not
    # own may be absent (a stand-in), NaN or garbage, and the rewrite must agree for any weights.
    real = {a: v for a, v in real.items() if not _is_float_tensor(v)}
    try:
        check_cap = None if capacity is None else "worst-case"
        old_mod, new_mod = _region_modules(gm, match, region, ext, check_cap)
    except Exception as e:  # noqa: BLE001 - any failure to build means "not sure"
        return f"could not build the rewrite: {type(e).__name__}: {e}"
    T = val(match.x).shape[0]
    T_hint = int(T.node.hint) if isinstance(T, torch.SymInt) and T.node.hint is not None else T
    sizes = [5] + ([int(T_hint)] if isinstance(T_hint, int) and T_hint != 5 else [])
    last_err = "no token count to try"
    for tokens in sizes:
        why = _compare(match, old_mod, new_mod, ext, tokens, real, skewed=False)
        if isinstance(why, tuple) and tokens != sizes[-1]:
            continue  # the block hard-codes T (static shapes): try the real token count
        if isinstance(why, tuple):
            return why[0]
        if why is not None and why.startswith(_ORIGINAL_FAILS):
            last_err = why
            continue
        if why is None:
            # every token on the same experts: catches blocks that drop or cap rows per expert
            why = _compare(match, old_mod, new_mod, ext, tokens, real, skewed=True)
            if isinstance(why, tuple):
                why = why[0]
            if why is not None and not why.startswith(_ORIGINAL_FAILS):
                why = f"with every token routed to the same experts: {why}"
            elif why is not None:
                why = None  # the block itself cannot run such a routing (it hard-codes one)
        return why
    return last_err
