"""Helpers shared by the fx_passes tests: inputs, capturing a graph through the pass, normalized
graph code, the fake process group, equality with eager, and the expert-parallel case bodies run
on gloo worlds (``world.run(ep_equal, ...)``; see ``tests/_dist.py``).

The test blocks live in ``_loop_models`` (families A, C), ``_sorted_models`` (B, D) and
``_ep_models`` (E); all of them use the hidden size :data:`H`.
"""

from __future__ import annotations

import contextlib
import copy
import re
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

import fx_passes
from moe_ops import _comm

H = 16  # hidden size of every test block


def make_x(T: int = 8, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    """``[T, H]`` tokens from their own generator (the global RNG is left alone)."""
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def stacked_param(*shape: int) -> nn.Parameter:
    """A stacked ``[E, ...]`` expert weight, scaled by ``1 / sqrt(fan_in)`` (the last dim)."""
    return nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5)


def tolerance(dtype: torch.dtype, low: float = 3e-2) -> dict[str, float]:
    """``assert_close`` tolerances: tight for float32, ``low`` (atol = rtol) for other dtypes."""
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=low, rtol=low)


@contextlib.contextmanager
def fake_group(rank: int, world_size: int):
    """The default process group as a fake one of ``world_size`` (this process is ``rank``; no
    peers, collectives do nothing), destroyed on exit. Yields the group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- graphs
def capture(model, x, group=None, run=True, **options):
    """Compile ``model`` (``fullgraph=True``) with a backend that runs the pass
    (``fuse_moe_routing(gm, group=group, **options)``); returns ``(output, graphs, matches,
    code_before)``. ``run=False`` skips running the rewritten graph (for graphs built for a fake
    process group) and returns None as the output."""
    graphs, matches, before = [], [], []

    def backend(gm, example_inputs):
        before.append(normalized_code(gm))
        matches.extend(
            fx_passes.fuse_moe_routing(gm, group=group, example_inputs=example_inputs, **options)
        )
        graphs.append(gm)
        if not run:
            return lambda *args: [torch.empty(0)]
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return (out if run else None), graphs, matches, before


def rewritten(model, x, family: str | None = None, code=None, **kwargs):
    """:func:`capture` of a model with one MoE block, which must be rewritten (by ``family``
    when given); returns ``(output, code(graph), match)``, ``code`` defaulting to
    :func:`short_code`."""
    out, graphs, matches, _ = capture(model, x, **kwargs)
    if family is None:
        assert len(matches) == 1, matches
    else:
        assert [m.family for m in matches] == [family], matches
    return out, (code or short_code)(graphs[0]), matches[0]


_PARAM = re.compile(r"l_(?:self|s)_modules_(\w+?)_parameters_(weight|bias)_")


def normalized_code(gm) -> str:
    """``gm.code`` without placeholders' re-binding and ``x = None`` frees, with short parameter
    names (``experts.0.gate.weight``)."""
    lines = []
    for line in gm.code.splitlines():
        line = line.split(";  ")[0].rstrip()
        if not line.strip() or line.startswith("def forward") or re.match(r"\s+l_\w+ = L_", line):
            continue
        line = _PARAM.sub(lambda m: m.group(1).replace("_modules_", ".") + "." + m.group(2), line)
        lines.append(line.strip())
    return "\n".join(lines)


def short_code(gm) -> str:
    """:func:`normalized_code` with short names for the ops (``moe_ops.dispatch``) and for
    ``getitem_N`` (``giN``), so that lines fit the line length."""
    lines = []
    for line in normalized_code(gm).splitlines():
        line = line.replace("torch.ops.moe_ops.", "moe_ops.").replace(".default(", "(")
        line = re.sub(r"\b(dispatch|combine)_default", r"\1", line)
        lines.append(re.sub(r"\bgetitem_(\d+)", r"gi\1", line))
    return "\n".join(lines)


_COMBINE = re.compile(
    r"combine\.default\((\w+), (\w+), [\w, ]+?, ('[^']*'), (\d+)((?:, (?:True|False))*)\)"
)


def code_of(gm) -> str:
    """:func:`normalized_code` with combine's layout tensors shown as ``<layout>``."""
    return _COMBINE.sub(r"combine.default(\1, \2, <layout>, \3, \4\5)", normalized_code(gm))


# ----------------------------------------------------------------------------- equality
def first(out):
    """A block's output without the extras some return beside it (transformers' router logits)."""
    return out[0] if isinstance(out, tuple) else out


def grads_equal(model, compile_fn, x, *, atol, rtol):
    """Forward and gradient (input and parameters) of ``compile_fn(copy)`` vs eager ``model``."""
    other = copy.deepcopy(model)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = model(x1)
    out = compile_fn(other)(x2)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, [x1, *model.parameters()], g, allow_unused=True)
    out_g = torch.autograd.grad(out, [x2, *other.parameters()], g, allow_unused=True)
    for a, b in zip(out_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _compile_moe(model, **options):
    """``model`` compiled with the strict "moe" backend (aot_eager unless ``options`` say
    otherwise; they are :func:`fx_passes.moe_backend`'s); returns it and the backend
    (``backend.matches``)."""
    backend = fx_passes.moe_backend(**{"inner": "aot_eager", "strict": True, **options})
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True), backend


# ----------------------------------------------------------------------------- gloo cases
def ep_equal(
    make,
    dtype: torch.dtype,
    tokens: int = 6,
    *,
    blocks: int = 1,
    shard=None,
    low: float = 3e-2,
    **options,
) -> int:
    """On every rank of the default group: compile ``make()`` with the "moe" backend (aot_eager),
    which must rewrite ``blocks`` MoE blocks, and check its output and gradients (within
    :func:`tolerance` with ``low``) against an unsharded copy run eagerly on all ranks' tokens.

    ``shard="experts"`` first keeps only this rank's experts (``fx_passes.shard_experts``),
    ``shard="stacked"`` also stacks them (``stack=True``); their gradients (each slice of a
    stacked parameter) must equal the copy's. Every other gradient is summed over the ranks
    first: the replicated parts see only this rank's tokens, and stacked ``[E, ...]`` weights
    that stay whole are sliced by the rewrite. Returns the expert parameters this rank keeps (0
    without ``shard``). ``make`` is sent to the ranks: a class or a ``functools.partial``.
    ``options`` go to :func:`fx_passes.moe_backend`."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make().to(dtype)
    reference = copy.deepcopy(model)
    x_all = torch.randn(W * tokens, H, dtype=dtype)
    g_all = torch.randn_like(x_all)
    mine = slice(rank * tokens, (rank + 1) * tokens)
    ref = reference(x_all)
    (ref * g_all).sum().backward()
    assert shard in (None, "experts", "stacked"), shard
    info = fx_passes.shard_experts(model, stack=shard == "stacked") if shard else []
    compiled, backend = _compile_moe(model, **options)
    out = compiled(x_all[mine])
    (out * g_all[mine]).sum().backward()
    assert len(backend.matches) == blocks, backend.matches
    if options.get("capacity") is not None:  # the capacity-mode ops ran, not the default ones
        assert not [
            m.rewritten["capacity_fallback"]
            for m in backend.matches
            if "capacity_fallback" in m.rewritten
        ]
    t = tolerance(dtype, low)
    torch.testing.assert_close(out, ref[mine], **t)

    ref_params = dict(reference.named_parameters())
    slices = {}  # stacked parameter -> the reference's parameter of each slice
    for s in info if shard == "stacked" else []:
        for name, _ in reference.get_submodule(s.path)[0].named_parameters():
            stacked = f"{s.path}.stacked_{name.replace('.', '_')}"
            slices[stacked] = [f"{s.path}.{e}.{name}" for e in s.local_experts]
    kept = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:  # another rank's expert
            continue
        if name in slices:
            want = slices.pop(name)
            assert p.shape[0] == len(want), (name, p.shape, want)
            for j, ref_name in enumerate(want):
                torch.testing.assert_close(p.grad[j], ref_params[ref_name].grad, **t, msg=ref_name)
            kept += p.numel()
            continue
        if shard and ".experts." in name:  # a local expert's own parameter
            kept += p.numel()
        else:
            dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, ref_params[name].grad, **t, msg=name)
    assert not slices, f"stacked parameters not found: {list(slices)}"
    return kept


def ep_equal_hand_written(
    make, dtype: torch.dtype, tokens: int = 6, local=("w1", "w2", "w3", "experts")
) -> dict[str, int]:
    """On every rank of the default group: a hand-written EP block (family E, its own
    all_to_alls) compiled with the "moe" backend (aot_eager) against the same block run eagerly,
    with different tokens and local experts (the parameters named ``local*``) per rank. The eager
    reference gets ``differentiable = True`` (``SeedEP`` then swaps its plain collectives for
    differentiable ones). Checks output, input and parameter gradients (:func:`tolerance`). Returns
    the collectives and host syncs of the compiled block's second forward and its backward."""
    rank = dist.get_rank()
    torch.manual_seed(rank)  # each rank its own local experts
    model = make().to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():  # the replicated parts (router, shared expert) equal on all ranks
        for pname, p in model.named_parameters():
            if not pname.startswith(local):
                p.copy_(torch.randn_like(p) * 0.5)
    reference = make().to(dtype)  # (a process group cannot be deep-copied)
    reference.load_state_dict(model.state_dict())
    reference.differentiable = True
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    dy = torch.randn(tokens, H, generator=g).to(dtype)
    x_ref = x.clone().requires_grad_(True)
    ref = reference(x_ref)
    (ref * dy).sum().backward()

    compiled, backend = _compile_moe(model)
    compiled(x.clone().requires_grad_(True))
    model.zero_grad()
    assert [m.family for m in backend.matches] == ["ep"], backend.matches
    x_out = x.clone().requires_grad_(True)
    # moe_ops._comm.all_to_all is the only collective moe_ops issues
    a2a = mock.patch.object(_comm, "all_to_all", wraps=_comm.all_to_all)
    sync = mock.patch.object(_comm, "read_to_host", wraps=_comm.read_to_host)
    with a2a as a2a_mock, sync as sync_mock:
        out = compiled(x_out)
        counts = dict(fwd_a2a=a2a_mock.call_count, fwd_sync=sync_mock.call_count)
        (out * dy).sum().backward()
        counts.update(bwd_a2a=a2a_mock.call_count - counts["fwd_a2a"])
        counts.update(bwd_sync=sync_mock.call_count - counts["fwd_sync"])
    t = tolerance(dtype)
    torch.testing.assert_close(out, ref, **t)
    torch.testing.assert_close(x_out.grad, x_ref.grad, **t)
    ref_params = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[pname].grad, **t, msg=pname)
    return counts


def ep_equal_single_device(makes, tokens: int = 6) -> list[dict]:
    """On every rank of the default group, for each ``make(group)`` (a hand-written EP block
    taking its group, local experts filled by global id): the block built over the whole group,
    compiled with the strict "moe" backend (aot_eager), against the same block built on a
    one-rank group (every expert local: the single-device block) run eagerly on this rank's
    tokens. Checks the output, the input gradient and every parameter gradient (the reference's
    summed over the ranks' tokens; a local expert ``experts.j`` against global expert
    ``experts.{rank * E_l + j}``). Returns, for each block, the match that rewrote it
    (``family``, ``num_experts``, ``world_size``: the rewrite's) and the code of the graph the pass
    handed on (``code``)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    solo = [dist.new_group([r]) for r in range(W)][rank]  # every rank makes every group
    families = []
    for make in makes:
        torch.manual_seed(0)
        reference = make(solo)
        torch.manual_seed(0)
        model = make(dist.group.WORLD)
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(tokens, H, generator=g)
        dy = torch.randn(tokens, H, generator=g)
        x_ref, x_out = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ref = reference(x_ref)
        (ref * dy).sum().backward()
        compiled, backend = _compile_moe(model)
        out = compiled(x_out)
        (out * dy).sum().backward()
        assert len(backend.matches) == 1, (make, backend.matches)
        m = backend.matches[0]
        families.append(
            dict(
                family=m.family,
                num_experts=m.num_experts,
                world_size=m.rewritten.get("world_size"),
                code=m.output.graph.python_code("self").src,
            )
        )
        t = tolerance(torch.float32)
        torch.testing.assert_close(out, ref, **t)
        torch.testing.assert_close(x_out.grad, x_ref.grad, **t)
        ref_params = dict(reference.named_parameters())
        for p in ref_params.values():
            dist.all_reduce(p.grad)
        e_l = len(model.experts)
        for name, p in model.named_parameters():
            m = re.match(r"experts\.(\d+)\.(.*)", name)
            if m is not None:
                want = ref_params[f"experts.{rank * e_l + int(m.group(1))}.{m.group(2)}"].grad
            else:
                dist.all_reduce(p.grad)
                want = ref_params[name].grad
            torch.testing.assert_close(p.grad, want, **t, msg=name)
    return families
