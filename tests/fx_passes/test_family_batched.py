"""Family B (batched gather ``W[ids]`` + ``bmm``): graph shape, near misses, equality, EP."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline

import fx_passes
from tests.fx_passes import _sorted_models as M
from tests.fx_passes._harness import (
    capture,
    code_of,
    ep_equal,
    fake_group,
    grads_equal,
    make_x,
    normalized_code,
    tolerance,
)

bf16, f32 = torch.bfloat16, torch.float32


def test_graph_bf16_grouped_mm_with_bias():
    torch.manual_seed(0)
    model = M.BatchedStyle(bias=True, transposed=True).to(bf16)
    _, graphs, matches, _ = capture(model, make_x(dtype=bf16))
    assert [m.family for m in matches] == ["batched"]
    assert_expected_inline(
        code_of(graphs[0]),
        """\
linear = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(linear, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
top_w = topk[0]
top_i = topk[1]
sum_1 = top_w.sum(-1, keepdim = True)
top_w_1 = top_w / sum_1
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, top_i, 4, '', 1, False, False)
getitem_7 = dispatch_default[0]
getitem_8 = dispatch_default[1]
getitem_9 = dispatch_default[3]
getitem_10 = dispatch_default[2]
getitem_11 = dispatch_default[4]
getitem_12 = dispatch_default[5]
getitem_13 = dispatch_default[6]
getitem_14 = dispatch_default[8]
getitem_15 = dispatch_default[9]
getitem_16 = dispatch_default[10]
getitem_17 = dispatch_default[11]
getitem_18 = dispatch_default[12]
getitem_19 = dispatch_default[13]
getitem_20 = dispatch_default[14]
size = getitem_7.size(0)
repeat_interleave_1 = torch.repeat_interleave(getitem_8, output_size = size)
to_1 = repeat_interleave_1.to(torch.int64)
cumsum = torch.cumsum(getitem_8, 0, dtype = torch.int32)
_grouped_mm = torch._grouped_mm(getitem_7, l_self_parameters_gate_up_, offs = cumsum)
getitem_21 = l_self_parameters_b_up_[to_1]
add__1 = _grouped_mm.add_(getitem_21)
chunk_1 = _grouped_mm.chunk(2, dim = -1)
getitem_22 = chunk_1[0]
getitem_23 = chunk_1[1]
silu_1 = torch.nn.functional.silu(getitem_22)
mul_2 = silu_1 * getitem_23
cumsum_1 = torch.cumsum(getitem_8, 0, dtype = torch.int32)
_grouped_mm_1 = torch._grouped_mm(mul_2, l_self_parameters_down_, offs = cumsum_1)
combine_default = torch.ops.moe_ops.combine.default(_grouped_mm_1, top_w_1, <layout>, '', 1, False, True)
getitem_24 = combine_default[0]
return (getitem_24,)""",
    )


def test_graph_fp32_segments_rank0_of_2_fake_process_group():
    with fake_group(rank=0, world_size=2) as group:
        torch.manual_seed(0)
        _, graphs, matches, _ = capture(M.BatchedStyle(), make_x(), group=group, run=False)
        code = code_of(graphs[0]).replace(f"'{group.group_name}'", "'<group>'")
    assert matches[0].rewritten["rank"] == 0
    assert_expected_inline(
        code,
        """\
linear = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(linear, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
top_w = topk[0]
top_i = topk[1]
sum_1 = top_w.sum(-1, keepdim = True)
top_w_1 = top_w / sum_1
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, top_i, 4, '<group>', 2, False, False)
getitem_6 = dispatch_default[0]
getitem_7 = dispatch_default[1]
getitem_8 = dispatch_default[3]
getitem_9 = dispatch_default[2]
getitem_10 = dispatch_default[4]
getitem_11 = dispatch_default[5]
getitem_12 = dispatch_default[6]
getitem_13 = dispatch_default[8]
getitem_14 = dispatch_default[9]
getitem_15 = dispatch_default[10]
getitem_16 = dispatch_default[11]
getitem_17 = dispatch_default[12]
getitem_18 = dispatch_default[13]
getitem_19 = dispatch_default[14]
getitem_20 = l_self_parameters_gate_up_[slice(0, 2, None)]
getitem_21 = l_self_parameters_down_[slice(0, 2, None)]
transpose = getitem_20.transpose(-2, -1)
getitem_22 = dispatch_default[7]
tolist = getitem_22.tolist()
split = torch.functional.split(getitem_6, tolist)
getitem_23 = split[0]
getitem_24 = transpose[0]
mm = torch.mm(getitem_23, getitem_24)
getitem_25 = split[1]
getitem_26 = transpose[1]
mm_1 = torch.mm(getitem_25, getitem_26)
cat = torch.cat([mm, mm_1])
chunk_1 = cat.chunk(2, dim = -1)
getitem_27 = chunk_1[0]
getitem_28 = chunk_1[1]
silu_1 = torch.nn.functional.silu(getitem_27)
mul_2 = silu_1 * getitem_28
transpose_1 = getitem_21.transpose(-2, -1)
tolist_1 = getitem_22.tolist()
split_1 = torch.functional.split(mul_2, tolist_1)
getitem_29 = split_1[0]
getitem_30 = transpose_1[0]
mm_2 = torch.mm(getitem_29, getitem_30)
getitem_31 = split_1[1]
getitem_32 = transpose_1[1]
mm_3 = torch.mm(getitem_31, getitem_32)
cat_1 = torch.cat([mm_2, mm_3])
combine_default = torch.ops.moe_ops.combine.default(cat_1, top_w_1, <layout>, '<group>', 2, False, True)
getitem_33 = combine_default[0]
return (getitem_33,)""",
    )


def test_near_miss_weights_not_gathered_by_routing_ids(caplog):
    model = M.BatchedStyle(ids="shifted")
    x = make_x()
    with caplog.at_level("DEBUG", logger="fx_passes"):
        out, graphs, matches, before = capture(model, x)
    assert matches == []
    assert normalized_code(graphs[0]) == before[0]
    assert "family batched" in caplog.text
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize(
    "kwargs, dtype",
    [({}, f32), (dict(bias=True, transposed=True), f32), (dict(bias=True), bf16)],
    ids=["fp32", "fp32-bias-transposed", "bf16-bias"],
)
def test_equal_to_eager_aot_eager(kwargs, dtype):
    torch.manual_seed(0)
    model = M.BatchedStyle(**kwargs).to(dtype)
    tol = tolerance(dtype)
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    compile_fn = lambda m: torch.compile(m, backend=backend, fullgraph=True)
    grads_equal(model, compile_fn, make_x(dtype=dtype), **tol)


def test_expert_parallel_gloo(gloo_world):
    gloo_world(2).run(ep_equal, M.MODELS["batched_bias_t"], f32)
