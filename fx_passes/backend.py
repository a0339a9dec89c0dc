"""The torch.compile backend: ``moe_backend``, the "moe" entry point, ``compile_moe``, ``explain``.

``torch.compile(model, backend="moe", fullgraph=True)`` rewrites every MoE block Dynamo captured
whole, then hands the graph to the inner compiler (inductor by default). Without ``fullgraph=True``
Dynamo does not capture data-dependent ops (``nonzero``, ``torch.where(mask)``, boolean indexing)
and breaks the graph there, so the pass never sees a whole block: use :func:`compile_moe`, which
turns the capture on. Blocks that look like MoE routing but were not rewritten are reported once,
at warning level, under the ``fx_passes`` logger.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.utils import counters

from fx_passes.emit import check_capacity
from fx_passes.fuse import fuse_moe_routing
from fx_passes.graph import descendants, module_path, topk_nodes
from fx_passes.match import MoEMatch, Rejected

log = logging.getLogger("fx_passes")

_CAPTURE_FLAGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
_HINT = (
    "To have it rewritten, let Dynamo capture the whole block as one graph: compile with "
    "fullgraph=True (or fx_passes.compile_moe, which turns on Dynamo's capture of data-dependent "
    "ops), loop over range(num_experts) rather than over experts found at run time "
    "(expert_hit = ...nonzero()), and drop data-dependent branches such as "
    "`if idx.numel() == 0: continue`. For transformers 5 models pass "
    "experts_implementation='grouped_mm'."
)
_warned: set[str] = set()


def _inner_compiler(inner: str | Callable, mode: str | None = None) -> Callable:
    if mode is not None:
        from torch._inductor import list_mode_options

        modes = list_mode_options()
        if mode not in modes:
            raise ValueError(
                f"fx_passes.moe_backend: unknown mode {mode!r}; inductor's modes are "
                f"{sorted(modes)}"
            )
        if inner != "inductor":
            raise ValueError(
                f"fx_passes.moe_backend: mode={mode!r} sets inductor options; it needs "
                f"inner='inductor', got inner={inner!r}"
            )
        from torch._inductor.compile_fx import compile_fx

        return functools.partial(compile_fx, config_patches=modes[mode])
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)


def _routing_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """``topk`` nodes whose indices look like expert routing (feed a one-hot, compare, mask,
    or gather), or leave the graph (Dynamo broke the block)."""
    out = []
    for n in topk_nodes(gm.graph):
        reach = descendants(n)
        if any(
            u.op == "output"
            or u.target
            in (
                torch.nn.functional.one_hot,
                torch._C._nn.one_hot,
                torch.where,
                torch.nonzero,
                "nonzero",
                operator.eq,
                "index_add_",
                operator.setitem,
                torch.argsort,
                torch.sort,
                "argsort",
                torch.bincount,
            )
            for u in reach
        ):
            out.append(n)
    return out


def _code_line(node: fx.Node) -> str:
    """``File "...", line N`` of the user code that made ``node`` (last frame), or ``""``."""
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    frames = [ln for ln in lines if ln.startswith("File ")]
    return frames[-1] if frames else ""


def _unrewritten_reasons(
    gm: fx.GraphModule, matches: list[MoEMatch], rejects: list[Rejected]
) -> list[tuple[str, str, str]]:
    """``(module path, reason, code line)`` for each MoE-looking block of ``gm`` that was not
    rewritten."""
    done = {m.module_path for m in matches}
    reasons: dict[str, tuple[str, str]] = {}
    lines = {module_path(n): _code_line(n) for n in _routing_candidates(gm)}
    # a failure of the pass wins, then the semantic family's reason (what the block computes)
    for r in sorted(rejects, key=lambda r: (r.error is None, r.family != "semantic")):
        if r.module_path not in done:
            where = lines.get(r.module_path, "")
            reasons.setdefault(r.module_path, (f"family {r.family}: {r.reason}", where))
    for n in _routing_candidates(gm):
        path = module_path(n)
        if path in done or any(path.startswith(d) or d.startswith(path) for d in done):
            continue
        if path in reasons:
            continue
        if any(u.op == "output" for u in descendants(n)):
            why = (
                "its routing leaves the compiled graph (Dynamo split the block, e.g. at a "
                "data-dependent loop or branch), so no graph holds the whole block"
            )
        else:
            why = "the routing was not recognised as any known family"
        reasons[path] = (why, _code_line(n))
    return sorted((path, why, where) for path, (why, where) in reasons.items())


def _check_cuda_graphs_have_capacity(mode: str | None, capacity) -> None:
    """CUDA-graph modes need the capacity-mode ops: with the default ones (which read row counts
    on the host and are tagged ``cudagraph_unsafe``) inductor's CUDA graphs fail at run time in
    torch 2.11 (an AssertionError inside cudagraph_trees when it captures the parts between them;
    a "storage data ptrs are not allocated in pool" RuntimeError before the ops were tagged)."""
    if capacity is not None or mode is None:
        return
    from torch._inductor import list_mode_options

    if list_mode_options(mode).get("triton.cudagraphs"):
        raise ValueError(
            f"fx_passes.moe_backend: mode={mode!r} uses CUDA graphs, which need the sync-free "
            f"ops: pass capacity='worst-case' too (same results; the default ops read row counts "
            f"on the host and cannot be captured)"
        )


# (what the reason says, what to change), first hit wins; the hint above is the default.
_SUGGESTIONS = (
    (
        "failed: ",
        "this is a failure of the pass itself, not of the model: please report it with "
        "the traceback logged under the fx_passes logger; strict=True raises it",
    ),
    (
        "not a multiple of the group size",
        "use an expert-parallel group whose size divides the number of experts",
    ),
    (
        "capacity",
        "the block drops tokens past an expert's capacity in an order moe_ops' "
        "capacity mode does not reproduce: keep it as it is, or route without a capacity "
        "(every token reaches its experts) to have it rewritten",
    ),
    (
        "differs from the block",
        "the block does not compute sum_k w[t, k] * expert_{idx[t, k]}"
        "(x[t]) for its router's top-k (ids, weights): check that nothing but the routing weights "
        "scales the expert outputs and that the weights are not applied to the expert input",
    ),
    (
        "row by row",
        "the expert computation holds an op that mixes rows: keep the experts to "
        "row-wise ops (linear layers, activations, elementwise math) and do the rest outside",
    ),
    (
        "row-wise",
        "the expert computation holds an op that mixes rows: keep the experts to "
        "row-wise ops (linear layers, activations, elementwise math) and do the rest outside",
    ),
    (
        "rows grouped by local expert",
        "hand-written EP: after the exchange, group the received rows by local expert (all "
        "ranks' rows for expert 0, then expert 1, ...) before the experts run, and undo that "
        "order before sending them back",
    ),
    (
        "forward ones swapped",
        "hand-written EP: send the rows back with the forward exchange's split sizes swapped "
        "(output sizes = the sizes sent, input sizes = the sizes received)",
    ),
    (
        "mixes up ranks",
        "hand-written EP: send each rank's rows back to that rank, in the order they came",
    ),
    (
        "per-token value",
        "the block reads a per-token tensor besides x, the top-k ids and "
        "weights: compute it outside the MoE block or from x inside the experts",
    ),
)


def suggestion(reason: str) -> str:
    """What a user can change so that a block left alone for ``reason`` gets rewritten."""
    for key, advice in _SUGGESTIONS:
        if key in reason:
            return advice
    return _HINT


def _warn_once(path: str, reason: str, where: str) -> None:
    key = f"{path}|{reason}|{where}"
    if key in _warned:
        return
    _warned.add(key)
    at = f" ({where})" if where else ""
    log.warning(
        "fx_passes: MoE-looking block %s%s was not rewritten: %s. %s",
        path or "<top>",
        at,
        reason,
        _HINT,
    )


def moe_backend(
    group: dist.ProcessGroup | None = None,
    *,
    inner: str | Callable = "inductor",
    strict: bool = False,
    capacity: int | str | None = None,
    mode: str | None = None,
    sum_per_rank: bool = False,
    transport: str | None = None,
    low_memory: bool = False,
) -> Callable:
    """A torch.compile backend that rewrites MoE routing into dispatch/combine, then compiles.

    Args:
        group: the expert-parallel ``ProcessGroup``; None means the default group when
            ``torch.distributed`` is initialized (at compile time), else a single rank.
        inner: ``"inductor"``, ``"aot_eager"`` (or any registered backend name), or a backend
            callable ``(gm, example_inputs) -> callable``; it receives the rewritten graph.
        strict: raise ``RuntimeError`` when a graph that looks like MoE routing had no block
            rewritten (instead of warning once).
        capacity: opt-in sync-free dispatch (see ``fuse_moe_routing``). None (default): the
            rewrite emits ``moe_ops.dispatch``/``combine`` (one device -> host sync per block,
            reading the row counts). ``"worst-case"`` (``W * T * K`` rows: nothing can be
            dropped, results unchanged) or an int ``C`` (``overflow="error"``): it emits
            ``moe_ops.dispatch_fixed``/``combine_fixed`` and grouped expert compute on the
            ``[C, H]`` padded rows, with no host sync, so the host can run ahead of the GPU. A
            block whose experts cannot be grouped keeps the default ops (logged at warning
            level; ``match.rewritten["capacity_fallback"]`` says why).
        mode: an inductor mode, as for ``torch.compile(mode=...)`` (``"reduce-overhead"``,
            ``"max-autotune"``, ...), for ``inner="inductor"``. Modes with CUDA graphs
            (``"reduce-overhead"``, ``"max-autotune"``) need ``capacity`` (``ValueError``
            otherwise): the default ops read row counts on the host and cannot be captured.
        sum_per_rank: :func:`moe_ops.dispatch`'s option (default ops: K > W; capacity-mode
            ops: the padded or p2p transport, K > 1): combine sums each token's slots on the
            rank of their experts and one row per (token, rank) comes back; fewer bytes, equal
            up to rounding, not bit for bit.
        transport: with ``capacity``, :func:`moe_ops.dispatch`'s transport (None: ``"padded"``,
            NCCL's ``all_to_all_single``, at W > 1; ``"p2p"``: the rows are read straight from
            the peers' CUDA symmetric memory, no NCCL call; CUDA, W > 1, one NVLink domain:
            elsewhere the rewrite of each block raises, which leaves the block alone with that
            reason, or raises with ``strict``).
        low_memory: :func:`moe_ops.dispatch`'s option (default ops, combine in slot order):
            large payloads come back in rounds of tokens, 1.5x the payload at the peak of
            dispatch + combine instead of 3x, 10-25% slower there; bit for bit the same.

    The returned backend's ``matches`` attribute lists every block it rewrote
    (:class:`~fx_passes.MoEMatch`; ``match.summary()`` gives family, experts, module, layout),
    its ``missed`` attribute every MoE-looking block it left alone, as ``(module path, reason,
    code line)``. A failure of the pass on one block leaves that block alone (reported like any
    other reason) unless ``strict``, which raises a ``RuntimeError`` naming the block.
    """
    check_capacity(capacity, "fx_passes.moe_backend", transport, low_memory)
    compile_inner = _inner_compiler(inner, mode)
    _check_cuda_graphs_have_capacity(mode, capacity)
    rewritten: list[MoEMatch] = []
    blocks_missed: list[tuple[str, str, str]] = []

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **compile_kwargs: Any):
        # torch.compile(..., backend=this, mode=m) hands the mode over here.
        call_mode = compile_kwargs.pop("mode", None)
        if compile_kwargs:
            raise ValueError(
                f"fx_passes.moe_backend: torch.compile passed {sorted(compile_kwargs)} to the "
                f"backend; give the moe backend's settings to fx_passes.moe_backend(...) instead"
            )
        run_inner = compile_inner
        if call_mode is not None and call_mode != mode:
            if mode is not None:
                raise ValueError(
                    f"fx_passes.moe_backend(mode={mode!r}) was compiled with torch.compile("
                    f"mode={call_mode!r}); give the mode once"
                )
            run_inner = _inner_compiler(inner, call_mode)
            _check_cuda_graphs_have_capacity(call_mode, capacity)
        matches = fuse_moe_routing(
            gm,
            group=group,
            example_inputs=example_inputs,
            capacity=capacity,
            strict=strict,
            sum_per_rank=sum_per_rank,
            transport=transport,
            low_memory=low_memory,
        )
        rewritten.extend(matches)
        missed = _unrewritten_reasons(gm, matches, gm.meta.get("moe_rejected", []))
        if strict and missed:
            path, reason, _ = missed[0]
            raise RuntimeError(
                f"fx_passes.moe_backend(strict=True): MoE block {path or '<top>'} was not "
                f"rewritten: {reason}. {_HINT}"
            )
        for path, reason, where in missed:
            _warn_once(path, reason, where)
        blocks_missed.extend(missed)
        return run_inner(gm, example_inputs)

    backend.__name__ = "moe"
    backend.matches = rewritten
    backend.missed = blocks_missed
    return backend


def moe_backend_entry(gm: fx.GraphModule, example_inputs, *, options=None, mode=None):
    """``torch.compile(model, backend="moe", options={"inner": "aot_eager", "strict": True,
    "capacity": "worst-case", "mode": "reduce-overhead"})``: the options are :func:`moe_backend`'s
    keywords. ``torch.compile(..., backend="moe", mode=...)`` works too (torch.compile refuses
    ``mode`` and ``options`` together; put the mode in the options then)."""
    opts = dict(options or {})
    known = ("inner", "strict", "group", "capacity", "mode", "sum_per_rank", "transport")
    known += ("low_memory",)
    unknown = set(opts) - set(known)
    if unknown:
        raise ValueError(
            f"backend='moe': unknown options {sorted(unknown)}; expected {', '.join(known)}"
        )
    if mode is not None:
        if opts.get("mode", mode) != mode:
            raise ValueError(
                f"backend='moe': mode={mode!r} and options['mode']={opts['mode']!r}; give one"
            )
        opts["mode"] = mode
    return moe_backend(**opts)(gm, example_inputs)


def compile_moe(
    model: Callable,
    *,
    group: dist.ProcessGroup | None = None,
    inner: str | Callable = "inductor",
    strict: bool = False,
    capacity: int | str | None = None,
    mode: str | None = None,
    sum_per_rank: bool = False,
    transport: str | None = None,
    low_memory: bool = False,
    **compile_kwargs: Any,
) -> Callable:
    """``torch.compile(model, backend=moe_backend(...))`` with Dynamo's capture of data-dependent
    ops turned on for every call, for code that cannot use ``fullgraph=True``.

    Returns a callable that runs the compiled model under ``torch._dynamo.config.patch(
    capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)``. What Dynamo does not
    give the pass is reported like a block left alone (a warning; ``RuntimeError`` with
    ``strict``): a frame Dynamo skipped (a graph break inside a loop makes it run the whole frame
    eagerly) in a model that has expert-like modules, and a compile that fails only because of
    the capture flags (a data-dependent value Dynamo cannot guard on, e.g. ``bincount(...)
    .tolist()`` without ``torch._check`` on its length): the model is then compiled without them.
    """
    backend = moe_backend(
        group,
        inner=inner,
        strict=strict,
        capacity=capacity,
        mode=mode,
        sum_per_rank=sum_per_rank,
        transport=transport,
        low_memory=low_memory,
    )
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    fallback: list[Callable] = []

    @functools.wraps(getattr(model, "forward", model))
    def run(*args: Any, **kwargs: Any) -> Any:
        if fallback:
            return fallback[0](*args, **kwargs)
        before = collections.Counter(counters["unimplemented"])
        try:
            with torch._dynamo.config.patch(**_CAPTURE_FLAGS):
                out = compiled(*args, **kwargs)
        except Exception as e:
            why = _data_dependent(e)
            if why is None:
                raise
            _not_seen(model, why, strict, backend)
            torch._dynamo.reset()
            fallback.append(torch.compile(model, backend=backend, **compile_kwargs))
            return fallback[0](*args, **kwargs)
        skipped = _skipped_frames(before)
        if skipped and not backend.matches and _looks_like_moe(model):
            _not_seen(model, skipped, strict, backend)
        return out

    run.compiled = compiled
    run.backend = backend
    return run


def _data_dependent(e: BaseException) -> str | None:
    """What Dynamo could not capture when ``e`` is its failure on a data-dependent value."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GuardOnDataDependentSymNode):
            first = str(e).strip().splitlines()[0]
            where = _user_line(str(e))
            at = f" at {where[0]}:{where[1]} `{where[2]}`" if where else ""
            return (
                f"Dynamo cannot compile it with data-dependent capture on{at} ({first}); it was "
                f"compiled without the capture, so no graph holds a whole MoE block. "
                f"{_data_dependent_fix(where)}"
            )
        e = e.__cause__ or e.__context__
    return None


def _user_line(text: str) -> tuple[str, int, str] | None:
    """``(file, line, code)`` of the user code a Dynamo error names (``from user code:``)."""
    import re

    found = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    if not found:
        return None
    file, line, code = found[-1]
    return file, int(line), code.strip()


def _data_dependent_fix(where: tuple[str, int, str] | None) -> str:
    """What to change where Dynamo failed on a data-dependent value: a branch that reads the
    value (``if counts[i] == 0: continue``) cannot be captured whatever bounds it, so name it."""
    import linecache
    import re

    bound = (
        "Bound the data-dependent value where it is read (torch._check(counts.shape[0] == E) "
        "before counts.tolist(), say)"
    )
    if where is None:
        return bound
    file, line, code = where
    var = re.match(r"(\w+)\s*=.*\.tolist\(\)", code)
    names = {var.group(1)} if var else set()
    for i in range(line, line + 40):
        text = linecache.getline(file, i)
        if not text:
            break
        stripped = text.strip()
        branch = re.match(r"(if|while|elif)\b", stripped)
        if branch and (any(re.search(rf"\b{n}\b", stripped) for n in names) or i == line):
            return (
                f"Its branch on the value, `{stripped}` ({file}:{i}), cannot be captured at "
                f"all: a Python branch on tensor values splits the graph. Remove that branch "
                f"(an expert that gets no tokens runs on zero rows and adds nothing) and the "
                f"`.tolist()` that only feeds it, so that Dynamo captures the block in one graph"
            )
    return bound


def _skipped_frames(before: collections.Counter) -> str | None:
    """Why Dynamo skipped a frame since ``before`` (a copy of its ``unimplemented`` counters)."""
    now = counters["unimplemented"]
    new = [k for k in now if now[k] > before.get(k, 0) and "Skipping the frame" in k]
    if not new:
        return None
    heads = [ln.strip() for ln in new[0].splitlines() if ln.strip() and ln[0] != " "]
    breaks = "; ".join(h for h in heads if not h.startswith(("***", "For more", "Developer")))
    return (
        f"Dynamo skipped a frame and ran it eagerly ({breaks}), so the pass never saw its MoE "
        f"routing"
    )


def _looks_like_moe(model: Any) -> bool:
    """A module with submodules or parameters named like experts (``experts.3``), or whose
    modules' ``forward`` picks the top-k (``topk``) of something."""
    if not isinstance(model, torch.nn.Module):
        return False
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    if any("expert" in n.lower() for n in names):
        return True
    for cls in {type(m) for m in model.modules()}:
        with contextlib.suppress(OSError, TypeError):
            if "topk(" in inspect.getsource(cls.forward):
                return True
    return False


def _not_seen(model: Any, reason: str, strict: bool, backend: Callable) -> None:
    """Report a model whose MoE blocks Dynamo did not hand to the pass (and list it among the
    backend's ``missed`` blocks)."""
    path = f"<{type(model).__name__}>"
    backend.missed.append((path, reason, ""))
    if strict:
        raise RuntimeError(
            f"fx_passes.compile_moe(strict=True): MoE block {path} was not rewritten: "
            f"{reason}. {_HINT}"
        )
    _warn_once(path, reason, "")


def explain(
    model: Callable,
    *inputs: Any,
    group: dist.ProcessGroup | None = None,
    fullgraph: bool = False,
    file=None,
) -> list[dict[str, Any]]:
    """Compile ``model`` on ``inputs`` as :func:`compile_moe` does, print a table of the MoE
    blocks found: rewritten ones with their expert layout, every block left alone (frames Dynamo
    skipped included) with its reason and a suggested change. Returns the rows (dicts with keys
    ``block``, ``family``, ``experts``, ``rewritten``, ``detail``, ``suggestion``). Runs the
    graphs uncompiled."""
    from tabulate import tabulate

    run = compile_moe(
        model, group=group, inner=lambda gm, example_inputs: gm.forward, fullgraph=fullgraph
    )
    run(*inputs)
    backend = run.backend
    rows: list[dict[str, Any]] = []
    for m in backend.matches:
        detail = m.rewritten.get("experts", "")
        if "why_not_grouped" in m.rewritten:
            detail += f" ({m.rewritten['why_not_grouped']})"
        rows.append(
            {
                "block": m.module_path or "<top>",
                "family": m.family,
                "experts": m.num_experts,
                "rewritten": "yes",
                "detail": detail,
                "suggestion": "",
            }
        )
    for path, reason, where in backend.missed:
        rows.append(
            {
                "block": path or "<top>",
                "family": "",
                "experts": "",
                "rewritten": "no",
                "detail": reason + (f" ({where})" if where else ""),
                "suggestion": suggestion(reason),
            }
        )
    table = tabulate(rows, headers="keys") if rows else "no MoE routing found"
    print(table, file=file)
    return rows
