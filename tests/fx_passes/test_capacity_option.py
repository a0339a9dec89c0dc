"""The opt-in ``capacity=`` option of the rewrite and the "moe" backend: sync-free
``moe_ops.dispatch_fixed``/``combine_fixed`` with grouped experts on the padded ``[C, H]`` rows,
equality with eager (forward and gradients, W = 1, aot_eager), the fallback to the default ops for
experts that cannot be grouped, and ``options={"capacity": ...}`` through ``backend="moe"``."""

from __future__ import annotations

import logging
from functools import partial
from unittest import mock

import pytest
import torch
from torch.testing import FileCheck

import fx_passes
from tests.fx_passes import _loop_models as L
from tests.fx_passes import _sorted_models as S
from tests.fx_passes._harness import capture, grads_equal, make_x, short_code

bf16 = torch.bfloat16
_TOL = dict(atol=3e-2, rtol=3e-2)
_x = partial(make_x, dtype=bf16, seed=3)  # this module's tokens: bf16, seed 3


def _capture(model, x, capacity):
    out, graphs, matches, _ = capture(model, x, capacity=capacity)
    return out, short_code(graphs[0]), matches


def test_worst_case_emits_capacity_ops_and_grouped_mm():
    torch.manual_seed(0)
    model = L.Block("onehot_where", bias=True).to(bf16)
    x = _x()
    out, code, matches = _capture(model, x, "worst-case")
    [m] = matches
    assert m.rewritten["experts"] == "grouped_mm"
    assert m.rewritten["dispatch"] == "capacity=worst-case"
    # T * K = 8 * 2 = 16 rows at W = 1, no host read of the counts, one grouped_mm per linear
    (
        FileCheck()
        .check("moe_ops.dispatch_fixed(l_x_, idx, 4, 16, False, '', 1, 'local', False)")
        .check("torch.cumsum(")
        .check("torch._grouped_mm(")
        .check("moe_ops.combine_fixed(")
        .check_same(", 16, '', 1, 'local')")
        .run(code)
    )
    assert code.count("torch._grouped_mm(") == 3
    for synced in ("moe_ops.dispatch(", "moe_ops.combine(", "tolist", ".item()", "split"):
        assert synced not in code
    # bias rows: expert of each padded row without the counts on the host, none on padding rows
    FileCheck().check("torch.searchsorted(").check("torch.where(").run(code)
    torch.testing.assert_close(out, model(x), **_TOL)


def test_int_capacity_is_passed_through_and_overflow_raises():
    torch.manual_seed(0)
    model = L.Block("onehot_where").to(bf16)
    _, code, _ = _capture(model, _x(), 40)
    FileCheck().check(", 4, 40, False, '', 1, 'local', False)").check(", 40, '', 1, 'local')").run(
        code
    )
    compiled = torch.compile(
        model, backend=fx_passes.moe_backend(inner="aot_eager", capacity=3), fullgraph=True
    )
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="capacity"):
        compiled(_x())


def test_default_is_unchanged():
    torch.manual_seed(0)
    model = L.Block("onehot_where").to(bf16)
    _, code_default, _ = _capture(model, _x(), None)
    _, graphs, _, _ = capture(model, _x())
    assert code_default == short_code(graphs[0])
    FileCheck().check("moe_ops.dispatch(").check_not("dispatch_fixed").run(code_default)


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: L.Block("onehot_where", bias=True).to(bf16), _x()),
        (lambda: S.TitanStyle(grouped=True).to(bf16), _x()),
    ],
    ids=["family_A_bias", "family_D_titan_grouped"],
)
def test_equal_to_eager_aot_eager(make, x):
    torch.manual_seed(0)
    model = make()
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True, capacity="worst-case")
    grads_equal(model, lambda m: torch.compile(m, backend=backend, fullgraph=True), x, **_TOL)
    [m] = backend.matches
    assert m.rewritten["dispatch"] == "capacity=worst-case"
    assert "capacity_fallback" not in m.rewritten


class _NaNTailGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` whose output rows and input-gradient rows past the last offset are
    NaN: what CUDA may leave there (uninitialized memory)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        out = torch._grouped_mm(a, b, offs=offs)
        out[offs[-1] :] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            ga, gb = torch.autograd.grad(torch._grouped_mm(a_, b_, offs=offs), [a_, b_], grad)
        ga[offs[-1] :] = float("nan")
        return ga, gb, None


def _nan_tail_inner(gm, example_inputs):
    for n in gm.graph.nodes:
        if n.target is torch._grouped_mm:
            n.target = lambda a, b, offs: _NaNTailGroupedMM.apply(a, b, offs)
    gm.recompile()
    return gm.forward


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: L.Block("onehot_where", bias=True).to(bf16), _x()),
        (lambda: S.TitanStyle(grouped=True).to(bf16), _x()),
    ],
    ids=["family_A_bias", "family_D_titan_grouped"],
)
def test_padding_rows_are_never_read(make, x):
    """NaN in every padding row, forward and backward, reaches no output and no gradient."""
    torch.manual_seed(0)
    model = make()
    backend = fx_passes.moe_backend(inner=_nan_tail_inner, strict=True, capacity=64)
    grads_equal(model, lambda m: torch.compile(m, backend=backend, fullgraph=True), x, **_TOL)
    assert backend.matches[0].rewritten["dispatch"] == "capacity=64"


@pytest.mark.parametrize(
    "make, x, why",
    [
        (lambda: L.Block("onehot_where"), _x(dtype=torch.float32), "dtype torch.float32"),
        (lambda: S.TitanStyle(grouped=False), _x(dtype=torch.float32), "uses item"),
    ],
    ids=["family_A_float32", "family_D_split_loop"],
)
def test_ungroupable_body_falls_back_to_default_dispatch(make, x, why, caplog):
    torch.manual_seed(0)
    model = make()
    with caplog.at_level(logging.WARNING, logger="fx_passes"):
        out, code, matches = _capture(model, x, "worst-case")
    [m] = matches
    assert why in m.rewritten["capacity_fallback"]
    assert "keeps the default (synced) dispatch" in caplog.text
    FileCheck().check("moe_ops.dispatch(").check_not("dispatch_fixed").run(code)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)


def test_options_through_backend_name():
    torch.manual_seed(0)
    model = L.Block("onehot_where").to(bf16)
    seen = []

    def inner(gm, example_inputs):
        seen.append(short_code(gm))
        return gm.forward

    torch._dynamo.reset()
    opts = {"inner": inner, "strict": True, "capacity": "worst-case"}
    out = torch.compile(model, backend="moe", fullgraph=True, options=opts)(_x())
    FileCheck().check("moe_ops.dispatch_fixed(").check("moe_ops.combine_fixed(").run(seen[0])
    torch.testing.assert_close(out, model(_x()), **_TOL)


def test_bad_capacity_is_rejected():
    with pytest.raises(ValueError, match="capacity must be >= 0 rows, got -1"):
        fx_passes.moe_backend(capacity=-1)
    with pytest.raises(TypeError, match="capacity must be None, an int or 'worst-case'"):
        fx_passes.moe_backend(capacity="all")


def _recording_compile_fx(seen: list):
    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm.forward

    return fake_compile_fx


@pytest.mark.parametrize(
    "how",
    ["mode kwarg", "options", "moe_backend", "moe_backend + mode kwarg"],
)
def test_mode_sets_inductor_options(how):
    model = L.Block("onehot_where").to(bf16)
    seen = []
    torch._dynamo.reset()
    with mock.patch("torch._inductor.compile_fx.compile_fx", _recording_compile_fx(seen)):
        if how == "mode kwarg":
            mode = "max-autotune-no-cudagraphs"  # no capacity: a mode without CUDA graphs
            compiled = torch.compile(model, backend="moe", fullgraph=True, mode=mode)
        elif how == "options":
            opts = {"mode": "reduce-overhead", "capacity": "worst-case"}
            compiled = torch.compile(model, backend="moe", fullgraph=True, options=opts)
        elif how == "moe_backend":
            backend = fx_passes.moe_backend(capacity="worst-case", mode="reduce-overhead")
            compiled = torch.compile(model, backend=backend, fullgraph=True)
        else:
            backend = fx_passes.moe_backend(capacity="worst-case")
            compiled = torch.compile(model, backend=backend, fullgraph=True, mode="reduce-overhead")
        out = compiled(_x())
    from torch._inductor import list_mode_options

    want = "max-autotune-no-cudagraphs" if how == "mode kwarg" else "reduce-overhead"
    assert seen == [list_mode_options(want)]
    torch.testing.assert_close(out, model(_x()), **_TOL)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown mode 'fast'; inductor's modes are"):
        fx_passes.moe_backend(mode="fast")
    with pytest.raises(ValueError, match="needs inner='inductor', got inner='aot_eager'"):
        fx_passes.moe_backend(mode="reduce-overhead", inner="aot_eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown options \\['cudagraphs'\\]"):
        torch.compile(L.Block("onehot_where"), backend="moe", options={"cudagraphs": True})(_x())


def test_two_different_modes_are_rejected():
    model = L.Block("onehot_where").to(bf16)
    torch._dynamo.reset()
    backend = fx_passes.moe_backend(capacity="worst-case", mode="max-autotune")
    with pytest.raises(Exception, match="give the mode once"):
        torch.compile(model, backend=backend, fullgraph=True, mode="reduce-overhead")(_x())
    torch._dynamo.reset()
    opts = {"mode": "max-autotune"}
    with pytest.raises(ValueError, match="mode='reduce-overhead' and options\\['mode'\\]"):
        fx_passes.backend.moe_backend_entry(None, [], options=opts, mode="reduce-overhead")


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_need_capacity(mode):
    msg = f"mode='{mode}' uses CUDA graphs, which need the sync-free ops: pass capacity="
    with pytest.raises(ValueError, match=msg):
        fx_passes.moe_backend(mode=mode)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=msg):  # through backend="moe" and torch.compile's mode
        torch.compile(L.Block("onehot_where"), backend="moe", mode=mode)(_x(dtype=torch.float32))
    fx_passes.moe_backend(mode="max-autotune-no-cudagraphs")  # no CUDA graphs: fine
    fx_passes.moe_backend(mode=mode, capacity="worst-case")


def _cuda_graph_steps(backend, steps: int = 4):
    """Train-like steps of the compiled block on new data each time (new routing), each checked
    against eager: forward, input gradient, router gradient."""
    torch.manual_seed(0)
    model = L.Block("onehot_where").to("cuda", bf16)
    torch._dynamo.reset()
    from torch._inductor import cudagraph_trees

    cudagraph_trees.reset_cudagraph_trees()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for seed in range(steps):  # warm-up, recording, then replays
        x = _x(T=64, seed=seed).cuda().requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.float().square().sum().backward()
        got = (out.detach().clone(), x.grad.clone(), model.router.weight.grad.clone())
        model.zero_grad(set_to_none=True)
        ref = model(x_ref)
        ref.float().square().sum().backward()
        torch.testing.assert_close(got[0], ref, **_TOL)
        torch.testing.assert_close(got[1], x_ref.grad, **_TOL)
        torch.testing.assert_close(got[2], model.router.weight.grad, **_TOL)
    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    return manager is not None and any(manager.roots.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_the_rewritten_block():
    """capacity + mode="reduce-overhead": inductor captures the rewritten block in CUDA graphs
    with no skip, and replays on new routing give eager's forward and gradients."""
    from torch._dynamo.utils import counters

    backend = fx_passes.moe_backend(strict=True, capacity="worst-case", mode="reduce-overhead")
    skips = counters["inductor"]["cudagraph_skips"]
    assert _cuda_graph_steps(backend), "no CUDA graph was recorded"
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert len(backend.matches) == 1
