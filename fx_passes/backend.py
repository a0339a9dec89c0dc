"""The torch.compile backend: ``moe_backend``, the "moe" entry point, ``compile_moe``, ``explain``.

``torch.compile(model, backend="moe", fullgraph=True)`` rewrites every MoE block Dynamo captured
whole, then hands the graph to the inner compiler (inductor by default). Without ``fullgraph=True``
Dynamo does not capture data-dependent ops (``nonzero``, ``torch.where(mask)``, boolean indexing)
and breaks the graph there, so the pass never sees a whole block: use :func:`compile_moe`, which
turns the capture on. Blocks that look like MoE routing but were not rewritten are reported once,
at warning level, under the ``fx_passes`` logger.
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

from fx_passes._match import MoEMatch, Rejected, descendants, module_path
from fx_passes.rewrite import check_capacity, fuse_moe_routing

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
    for n in gm.graph.nodes:
        if n.target not in (torch.topk, "topk"):
            continue
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
    for r in rejects:
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

    The returned backend's ``matches`` attribute lists every block it rewrote
    (:class:`~fx_passes.MoEMatch`; ``match.summary()`` gives family, experts, module, layout).
    """
    check_capacity(capacity, "fx_passes.moe_backend")
    compile_inner = _inner_compiler(inner, mode)
    _check_cuda_graphs_have_capacity(mode, capacity)
    rewritten: list[MoEMatch] = []

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
            gm, group=group, example_inputs=example_inputs, capacity=capacity
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
        return run_inner(gm, example_inputs)

    backend.__name__ = "moe"
    backend.matches = rewritten
    return backend


def moe_backend_entry(gm: fx.GraphModule, example_inputs, *, options=None, mode=None):
    """``torch.compile(model, backend="moe", options={"inner": "aot_eager", "strict": True,
    "capacity": "worst-case", "mode": "reduce-overhead"})``: the options are :func:`moe_backend`'s
    keywords. ``torch.compile(..., backend="moe", mode=...)`` works too (torch.compile refuses
    ``mode`` and ``options`` together; put the mode in the options then)."""
    opts = dict(options or {})
    unknown = set(opts) - {"inner", "strict", "group", "capacity", "mode"}
    if unknown:
        raise ValueError(
            f"backend='moe': unknown options {sorted(unknown)}; expected inner, strict, group, "
            f"capacity, mode"
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
    **compile_kwargs: Any,
) -> Callable:
    """``torch.compile(model, backend=moe_backend(...))`` with Dynamo's capture of data-dependent
    ops turned on for every call, for code that cannot use ``fullgraph=True``.

    Returns a callable that runs the compiled model under ``torch._dynamo.config.patch(
    capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)``.
    """
    compiled = torch.compile(
        model,
        backend=moe_backend(group, inner=inner, strict=strict, capacity=capacity, mode=mode),
        **compile_kwargs,
    )

    @functools.wraps(getattr(model, "forward", model))
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(**_CAPTURE_FLAGS):
            return compiled(*args, **kwargs)

    run.compiled = compiled
    return run


def explain(
    model: Callable,
    *inputs: Any,
    group: dist.ProcessGroup | None = None,
    fullgraph: bool = False,
    file=None,
) -> list[dict[str, Any]]:
    """Compile ``model`` on ``inputs`` (with the capture flags on), print a table of the MoE blocks
    found and not found with reasons, and return its rows. Runs the graphs uncompiled."""
    from tabulate import tabulate

    rows: list[dict[str, Any]] = []

    def record(gm: fx.GraphModule, example_inputs):
        matches = fuse_moe_routing(gm, group=group, example_inputs=example_inputs)
        for m in matches:
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
                }
            )
        missed = _unrewritten_reasons(gm, matches, gm.meta.get("moe_rejected", []))
        for path, reason, _ in missed:
            rows.append(
                {
                    "block": path or "<top>",
                    "family": "",
                    "experts": "",
                    "rewritten": "no",
                    "detail": reason,
                }
            )
        return gm.forward

    with torch._dynamo.config.patch(**_CAPTURE_FLAGS):
        torch.compile(model, backend=record, fullgraph=fullgraph)(*inputs)
    table = tabulate(rows, headers="keys") if rows else "no MoE routing found"
    print(table, file=file)
    return rows
