"""``shard_experts(model, stack=True)``: ModuleList experts read slices of one stacked parameter.

The model computes what it computed before (bit for bit, gradients included), and the rewrite's
``torch._grouped_mm`` reads the stacked parameter (a view) instead of stacking the experts'
weights at every forward.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from expecttest import assert_expected_inline

import fx_passes
from tests.fx_passes import _loop_models as M
from tests.fx_passes._harness import (
    capture,
    ep_equal,
    fake_group,
    make_x,
    short_code,
    tolerance,
)

bf16, f32 = torch.bfloat16, torch.float32


def _stacked(model):
    other = copy.deepcopy(model)
    fx_passes.shard_experts(other, stack=True)
    return other


def test_stacked_model_is_the_same_function_with_the_same_gradients():
    torch.manual_seed(0)
    model = M.Stack(2, bias=True).to(bf16)
    other = _stacked(model)
    names = [n for n, _ in other.named_parameters() if ".experts." in n]
    assert names == [
        f"layers.{i}.experts.stacked_{p}_{w}"
        for i in range(2)
        for p in ("gate", "up", "down")
        for w in ("weight", "bias")
    ]
    x1, x2 = make_x(dtype=bf16).requires_grad_(True), make_x(dtype=bf16).requires_grad_(True)
    out1, out2 = model(x1), other(x2)
    assert torch.equal(out1, out2)
    g = torch.randn_like(out1)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    for i, layer in enumerate(model.layers):
        for e, expert in enumerate(layer.experts):
            for name, p in expert.named_parameters():
                stacked = other.get_parameter(
                    f"layers.{i}.experts.stacked_{name.replace('.', '_')}"
                )
                assert torch.equal(stacked.grad[e], p.grad), (i, e, name)
                assert torch.equal(stacked[e], p), (i, e, name)


def test_stack_rejects_experts_of_different_shapes():
    model = M.Block()
    model.experts[1].up = torch.nn.Linear(M.H, M.I + 8, bias=False)
    with pytest.raises(ValueError, match="expert 1 of experts must have the parameters"):
        fx_passes.shard_experts(model, stack=True)


def test_graph_grouped_mm_reads_the_stacked_parameter():
    """No ``torch.stack`` and no per-expert slices are left: one view of each parameter."""
    torch.manual_seed(0)
    model = _stacked(M.Block("onehot_where").to(bf16))
    _, graphs, matches, _ = capture(model, make_x(dtype=bf16))
    assert matches[0].rewritten["experts"] == "grouped_mm"
    assert_expected_inline(
        short_code(graphs[0]),
        """\
logits = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(logits, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
w = topk[0]
idx = topk[1]
sum_1 = w.sum(-1, keepdim = True)
w_1 = w / sum_1
w_2 = w_1.to(torch.bfloat16)
dispatch = moe_ops.dispatch(l_x_, idx, 4, '', 1, False, False)
gi38 = dispatch[0]
gi39 = dispatch[1]
gi40 = dispatch[3]
gi41 = dispatch[2]
gi42 = dispatch[4]
gi43 = dispatch[5]
gi44 = dispatch[6]
gi45 = dispatch[8]
gi46 = dispatch[9]
gi47 = dispatch[10]
gi48 = dispatch[11]
gi49 = dispatch[12]
gi50 = dispatch[13]
gi51 = dispatch[14]
cumsum = torch.cumsum(gi39, 0, dtype = torch.int32)
reshape_4 = gi38.reshape(-1, 16)
transpose = l_self_modules_experts_parameters_stacked_gate_weight_.transpose(-2, -1)
_grouped_mm = torch._grouped_mm(reshape_4, transpose, offs = cumsum)
silu_4 = torch.nn.functional.silu(_grouped_mm)
transpose_1 = l_self_modules_experts_parameters_stacked_up_weight_.transpose(-2, -1)
_grouped_mm_1 = torch._grouped_mm(reshape_4, transpose_1, offs = cumsum)
mul_8 = silu_4 * _grouped_mm_1
transpose_2 = l_self_modules_experts_parameters_stacked_down_weight_.transpose(-2, -1)
_grouped_mm_2 = torch._grouped_mm(mul_8, transpose_2, offs = cumsum)
combine = moe_ops.combine(_grouped_mm_2, w_2, gi40, gi41, gi42, gi43, gi44, gi45, gi46, gi47, gi48, gi49, gi50, gi51, '', 1, False, True)
gi52 = combine[0]
return (gi52,)""",
    )


def test_graph_rank1_of_2_reads_only_its_stacked_experts():
    """At W = 2, rank 1 stacks experts 2 and 3 ([2, ...]); the others are placeholders."""
    with fake_group(rank=1, world_size=2) as group:
        torch.manual_seed(0)
        model = M.Block("onehot_where").to(bf16)
        fx_passes.shard_experts(model, stack=True)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "stacked" in n}
        _, graphs, matches, _ = capture(model, make_x(dtype=bf16), group=group, run=False)
    assert shapes == {
        "experts.stacked_gate_weight": (2, M.I, M.H),
        "experts.stacked_up_weight": (2, M.I, M.H),
        "experts.stacked_down_weight": (2, M.H, M.I),
    }
    code = short_code(graphs[0])
    assert matches[0].rewritten["rank"] == 1 and "torch.stack" not in code
    assert code.count("_grouped_mm(") == 3 and "experts.0." not in code
    assert "l_self_modules_experts_parameters_stacked_gate_weight_.transpose(-2, -1)" in code


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_compiled_stacked_equal_to_eager(dtype):
    """fp32 runs per-expert segments on the slices, bf16 grouped_mm on the stacked view."""
    torch.manual_seed(0)
    model = M.Stack(1, bias=True).to(dtype)
    other = _stacked(model)
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    torch._dynamo.reset()
    x = make_x(dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = model(x1)
    out = torch.compile(other, backend=backend, fullgraph=True)(x2)
    want = "grouped_mm" if dtype == bf16 else "segments"
    assert [m.rewritten["experts"] for m in backend.matches] == [want]
    tol = tolerance(dtype)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    for e, expert in enumerate(model.layers[0].experts):
        for name, p in expert.named_parameters():
            stacked = other.get_parameter(f"layers.0.experts.stacked_{name.replace('.', '_')}")
            torch.testing.assert_close(stacked.grad[e], p.grad, **tol, msg=f"{e} {name}")


def test_expert_parallel_gloo_stacked(gloo_world):
    """On every rank: shard and stack the experts, compile with the "moe" backend (aot_eager),
    compare output and gradients with the unsharded model run eagerly on all ranks' tokens."""
    make = partial(M.Stack, 1, num_experts=4)
    gloo_world(2).run(ep_equal, make, bf16, shard="stacked")
