"""opcheck, fake kernels and tracing: no process group, no device data.

``torch.library.opcheck`` runs the raw ops at W = 1. The rest traces the public API under
FakeTensorMode, make_fx, torch.export and torch.compile (forward and backward), checks that new
routings and token counts do not recompile, and traces W > 1 under the fake process group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols
from torch.testing._internal.distributed.fake_pg import FakeStore

import moe_ops
from moe_ops._ops import DispatchOutputs

T, K, E, H, HP = 6, 2, 4, 5, 3


def _inputs(T=T, K=K, E=E, H=H, unused=True, seed=0, one_d=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((T, H), generator=g)
    idx = torch.randint(0, E, (T, K), generator=g)
    if unused and T:
        idx[0, -1] = -1
        idx[T // 2, 0] = -1
    w = torch.rand((T, K), generator=g)
    if one_d:
        idx, w = idx[:, 0], w[:, 0]
    return x, idx, w


class _Block(torch.nn.Module):
    """dispatch -> per-expert elementwise stand-in mapping H -> H' -> combine."""

    def __init__(self, num_experts=E, hp=HP):
        super().__init__()
        self.num_experts = num_experts
        self.proj = torch.nn.Linear(H, hp, bias=False)

    def forward(self, x, idx, w):
        recv_x, handle = moe_ops.dispatch(x, idx, self.num_experts)
        expert_out = torch.tanh(self.proj(recv_x))
        out = moe_ops.combine(expert_out, handle, w)
        return out, handle.tokens_per_expert


# ----------------------------------------------------------------------------- opcheck
_OPCHECK_CASES = {
    "k2-unused": dict(),
    "T0": dict(T=0),
    "k1": dict(K=1),
    "k4-all-valid": dict(K=4, unused=False),
}


def _raw_dispatch(x, idx):
    """recv_x and the layout tensors in the order combine takes them."""
    out = DispatchOutputs(*torch.ops.moe_ops.dispatch(x, idx, E, "", 1))
    return out.recv_x, tuple(out.layout())


@pytest.mark.parametrize("case", list(_OPCHECK_CASES))
def test_opcheck_dispatch(case):
    x, idx, _ = _inputs(**_OPCHECK_CASES[case])
    torch.library.opcheck(torch.ops.moe_ops.dispatch, (x.requires_grad_(), idx, E, "", 1))


@pytest.mark.parametrize("case", list(_OPCHECK_CASES))
@pytest.mark.parametrize("weights", [True, False])
def test_opcheck_combine(case, weights):
    x, idx, w = _inputs(**_OPCHECK_CASES[case])
    recv_x, layout = _raw_dispatch(x, idx)
    args = (recv_x.requires_grad_(), w.requires_grad_() if weights else None, *layout, "", 1)
    torch.library.opcheck(torch.ops.moe_ops.combine, args)


@pytest.mark.parametrize("case", list(_OPCHECK_CASES))
@pytest.mark.parametrize("weights", [True, False])
def test_opcheck_combine_backward(case, weights):
    x, idx, w = _inputs(**_OPCHECK_CASES[case])
    recv_x, layout = _raw_dispatch(x, idx)
    grad_out = torch.randn((x.shape[0], H))
    returned = recv_x if weights else None
    args = (grad_out, returned, w if weights else None, *layout, "", 1)
    torch.library.opcheck(torch.ops.moe_ops._combine_backward, args)


# ----------------------------------------------------------------------------- fake tensors
def test_cudagraph_tags():
    """The default-mode ops size their exchanges on the host: inductor must keep them out of CUDA
    graphs. The capacity-mode ops are graph-safe."""
    ops = torch.ops.moe_ops
    for op in (ops.dispatch, ops.combine, ops._combine_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op
    for op in (ops.dispatch_fixed, ops.combine_fixed, ops._combine_fixed_backward):
        assert torch.Tag.cudagraph_unsafe not in op.default.tags, op


def test_fake_tensor_mode_shapes():
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x, idx, w = (mode.from_tensor(t) for t in _inputs())
        recv_x, handle = moe_ops.dispatch(x, idx, E)
        out = moe_ops.combine(recv_x[:, :HP] * 2, handle, w)
    assert free_unbacked_symbols(recv_x.shape[0])  # R is data-dependent
    assert recv_x.shape[1] == H and tuple(handle.tokens_per_expert.shape) == (E,)
    assert handle.tokens_per_expert.dtype == torch.int64
    assert tuple(out.shape) == (T, HP) and out.dtype == torch.float32


def test_fake_tensor_mode_checks_shapes():
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x, idx, w = (mode.from_tensor(t) for t in _inputs())
        with pytest.raises(ValueError, match=r"topk_idx has 6 rows but x has 5 tokens"):
            moe_ops.dispatch(x[:5], idx, E)
        recv_x, handle = moe_ops.dispatch(x, idx, E)
        with pytest.raises(ValueError, match=r"topk_weights must be \[T, K\] = \[6, 2\]"):
            moe_ops.combine(recv_x, handle, w[:, :1])


def _fwd_bwd(x, idx, w, proj):
    recv_x, handle = moe_ops.dispatch(x, idx, E)
    out = moe_ops.combine(torch.tanh(recv_x @ proj), handle, w)
    return (out,) + torch.autograd.grad(out.sum(), (x, w, proj))


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_make_fx_forward_backward(tracing_mode):
    x, idx, w = _inputs()
    proj = torch.randn(H, HP)
    args = (x.requires_grad_(), idx, w.requires_grad_(), proj.requires_grad_())
    gm = make_fx(_fwd_bwd, tracing_mode=tracing_mode)(*args)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    for op in (
        "moe_ops.dispatch.default",
        "moe_ops.combine.default",
        "moe_ops._combine_backward.default",
    ):
        assert op in targets, targets
    # dispatch's backward is a combine without weights: two combines in all
    assert targets.count("moe_ops.combine.default") == 2
    for got, want in zip(gm(*args), _fwd_bwd(*args), strict=True):
        assert torch.equal(got, want)
    if tracing_mode == "symbolic":
        out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
        assert isinstance(out_node.meta["val"].shape[0], torch.SymInt)  # T stays symbolic


@pytest.mark.parametrize("strict", [True, False])
def test_export(strict):
    torch.manual_seed(0)
    block = _Block()
    x, idx, w = _inputs()
    ep = torch.export.export(block, (x, idx, w), strict=strict)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"moe_ops.dispatch.default", "moe_ops.combine.default"} <= targets
    x2, idx2, w2 = _inputs(seed=3)  # other routing, same shapes
    for got, want in zip(ep.module()(x2, idx2, w2), block(x2, idx2, w2), strict=True):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- torch.compile
def _compiled_vs_eager(backend, dynamic=None):
    torch.manual_seed(0)
    block = _Block()
    compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=dynamic)
    results = []
    for seed, T_ in [(0, T), (1, T), (2, T + 3)]:
        x, idx, w = _inputs(T=T_, seed=seed)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ws = [w.clone().requires_grad_(), w.clone().requires_grad_()]
        out_c, tpe_c = compiled(xs[0], idx, ws[0])
        out_e, tpe_e = block(xs[1], idx, ws[1])
        out_c.square().sum().backward()
        out_e.square().sum().backward()
        results.append((out_c, out_e, tpe_c, tpe_e, xs, ws))
    return block, results


def test_compile_aot_eager_forward_backward_equal():
    _, results = _compiled_vs_eager(CompileCounterWithBackend("aot_eager"), dynamic=True)
    for out_c, out_e, tpe_c, tpe_e, xs, ws in results:
        assert torch.equal(out_c, out_e) and torch.equal(tpe_c, tpe_e)
        assert torch.equal(xs[0].grad, xs[1].grad) and torch.equal(ws[0].grad, ws[1].grad)


def test_compile_inductor_forward_backward():
    _, results = _compiled_vs_eager("inductor", dynamic=True)
    for out_c, out_e, tpe_c, tpe_e, xs, ws in results:
        torch.testing.assert_close(out_c, out_e)
        assert torch.equal(tpe_c, tpe_e)
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ws[0].grad, ws[1].grad)


def test_no_recompile_on_new_routing_or_token_count():
    counter = CompileCounterWithBackend("aot_eager")
    _compiled_vs_eager(counter, dynamic=True)  # three routings, two values of T
    assert counter.frame_count == 1


def test_no_recompile_on_new_routing_static_shapes():
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(0)
    compiled = torch.compile(_Block(), backend=counter, fullgraph=True)
    for seed in range(4):
        compiled(*_inputs(seed=seed))
    x, idx, w = _inputs()
    compiled(x, torch.full_like(idx, -1), w)  # nothing routed at all
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- fake process group
@pytest.fixture
def fake_world(request):
    dist.init_process_group(
        "fake", store=FakeStore(), rank=request.param - 1, world_size=request.param
    )
    yield request.param
    dist.destroy_process_group()


@pytest.mark.parametrize("fake_world", [2, 4], indirect=True)
@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_fake_process_group_traces(fake_world, tracing_mode):
    W, num_experts = fake_world, 8

    def f(x, idx, w):
        recv_x, handle = moe_ops.dispatch(x, idx, num_experts)
        out = moe_ops.combine(recv_x * 2, handle, w)
        return out, handle.tokens_per_expert

    x, idx, w = _inputs(E=num_experts)
    gm = make_fx(f, tracing_mode=tracing_mode)(x, idx, w)
    (disp,) = [n for n in gm.graph.nodes if n.target == torch.ops.moe_ops.dispatch.default]
    (comb,) = [n for n in gm.graph.nodes if n.target == torch.ops.moe_ops.combine.default]
    name = dist.group.WORLD.group_name
    assert disp.args[2:] == (num_experts, name, W)
    # w needs no gradient: the rows that came back are not kept (keep_rows=False)
    assert comb.args[-4:] == (name, W, False, False)
    recv_val, tpe_val = disp.meta["val"][0], disp.meta["val"][1]
    assert free_unbacked_symbols(recv_val.shape[0]) and recv_val.shape[1] == H
    assert tuple(tpe_val.shape) == (num_experts // W,)
    assert tuple(disp.meta["val"][5].shape) == (W,)  # send splits, one per rank
    out_val = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert out_val.shape[1] == H
    if tracing_mode == "fake":
        assert out_val.shape[0] == T


@pytest.mark.parametrize("fake_world", [2], indirect=True)
def test_fake_process_group_compile_graph(fake_world):
    """torch.compile of fake inputs under the fake group captures the ops with W = 2."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, idx, w):
        recv_x, handle = moe_ops.dispatch(x, idx, 8)
        return moe_ops.combine(recv_x * 2, handle, w), handle.tokens_per_expert

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x, idx, w = (mode.from_tensor(t) for t in _inputs(E=8))
        out, tpe = torch.compile(f, backend=backend, fullgraph=True)(x, idx, w)
    assert tuple(tpe.shape) == (4,) and tuple(out.shape) == (T, H)
    (disp,) = [n for n in graphs[0].graph.nodes if n.target == torch.ops.moe_ops.dispatch.default]
    assert disp.args[2:] == (8, dist.group.WORLD.group_name, 2, False, False)


def test_fake_cuda_tensors_need_no_gpu():
    """The fake kernels trace CUDA tensors on a machine without one."""
    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty((T, H), device="cuda")
        idx = torch.zeros((T, K), dtype=torch.int64, device="cuda")
        recv_x, handle = moe_ops.dispatch(x, idx, E)
        out = moe_ops.combine(recv_x, handle, torch.ones((T, K), device="cuda"))
    assert recv_x.device.type == "cuda" and handle.tokens_per_expert.device.type == "cuda"
    assert out.device.type == "cuda" and tuple(out.shape) == (T, H)
    assert handle.layout.send_splits.device.type == "cpu"  # split sizes live on the host
