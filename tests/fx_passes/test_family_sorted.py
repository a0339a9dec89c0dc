"""Family D (sort-based permutation): graph shape, near misses, equality with eager, EP on gloo.

The 4.x-style blocks (GraniteMoE/JetMoE, Aria, torchtitan) are our re-implementations in
``_sorted_models``; the real transformers 5 ``"grouped_mm"`` blocks are in ``test_transformers``.
"""

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
    rewritten,
    tolerance,
)

bf16, f32 = torch.bfloat16, torch.float32


def test_graph_titan_grouped_mm_bf16():
    torch.manual_seed(0)
    model = M.TitanStyle(grouped=True).to(bf16)
    _, code, match = rewritten(model, make_x(dtype=bf16), family="sorted", code=code_of)
    assert match.base is not None  # scatter_add onto the shared expert's output
    assert_expected_inline(
        code,
        """\
linear = torch._C._nn.linear(l_x_, gate.weight, None)
float_1 = linear.float()
scores = torch.sigmoid(float_1)
topk = torch.topk(scores, k = 2, dim = 1)
top = topk[0]
idx = topk[1]
sum_1 = top.sum(-1, keepdim = True)
add = sum_1 + 1e-20
top_1 = top / add
input_1 = torch._C._nn.linear(l_x_, shared.0.weight, shared.0.bias)
input_2 = torch.nn.functional.silu(input_1, inplace = False)
input_3 = torch._C._nn.linear(input_2, shared.2.weight, shared.2.bias)
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, idx, 4, '', 1, False, False)
getitem_4 = dispatch_default[0]
getitem_5 = dispatch_default[1]
getitem_6 = dispatch_default[3]
getitem_7 = dispatch_default[2]
getitem_8 = dispatch_default[4]
getitem_9 = dispatch_default[5]
getitem_10 = dispatch_default[6]
getitem_11 = dispatch_default[8]
getitem_12 = dispatch_default[9]
getitem_13 = dispatch_default[10]
getitem_14 = dispatch_default[11]
getitem_15 = dispatch_default[12]
getitem_16 = dispatch_default[13]
getitem_17 = dispatch_default[14]
to_2 = getitem_5.to(torch.int64)
cumsum_1 = torch.cumsum(to_2, 0, dtype = torch.int32)
transpose_3 = l_self_parameters_w1_.transpose(-2, -1)
transpose_4 = l_self_parameters_w3_.transpose(-2, -1)
transpose_5 = l_self_parameters_w2_.transpose(-2, -1)
_grouped_mm_3 = torch._grouped_mm(getitem_4, transpose_3, offs = cumsum_1)
silu_2 = torch.nn.functional.silu(_grouped_mm_3)
_grouped_mm_4 = torch._grouped_mm(getitem_4, transpose_4, offs = cumsum_1)
mul_2 = silu_2 * _grouped_mm_4
_grouped_mm_5 = torch._grouped_mm(mul_2, transpose_5, offs = cumsum_1)
combine_default = torch.ops.moe_ops.combine.default(_grouped_mm_5, top_1, <layout>, '', 1, False, True)
getitem_18 = combine_default[0]
add_1 = input_3 + getitem_18
return (add_1,)""",
    )


def test_graph_granite_split_loop_rank1_of_2_fake_process_group():
    """At W = 2 rank 1 runs two branches of the per-expert loop on W[2:4]."""
    with fake_group(rank=1, world_size=2) as group:
        torch.manual_seed(0)
        _, graphs, matches, _ = capture(M.GraniteStyle(), make_x(), group=group, run=False)
        code = code_of(graphs[0]).replace(f"'{group.group_name}'", "'<group>'")
    assert matches[0].rewritten["world_size"] == 2 and matches[0].rewritten["rank"] == 1
    assert_expected_inline(
        code,
        """\
linear = torch._C._nn.linear(l_x_, router.weight, None)
logits = linear.float()
topk = logits.topk(2, dim = 1)
top_v = topk[0]
top_i = topk[1]
softmax = torch.softmax(top_v, dim = 1)
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, top_i, 4, '<group>', 2, False, False)
getitem_29 = dispatch_default[0]
getitem_30 = dispatch_default[1]
getitem_31 = dispatch_default[3]
getitem_32 = dispatch_default[2]
getitem_33 = dispatch_default[4]
getitem_34 = dispatch_default[5]
getitem_35 = dispatch_default[6]
getitem_36 = dispatch_default[8]
getitem_37 = dispatch_default[9]
getitem_38 = dispatch_default[10]
getitem_39 = dispatch_default[11]
getitem_40 = dispatch_default[12]
getitem_41 = dispatch_default[13]
getitem_42 = dispatch_default[14]
getitem_43 = l_self_parameters_w_in_[slice(2, 4, None)]
getitem_44 = l_self_parameters_w_out_[slice(2, 4, None)]
to = getitem_30.to(torch.int64)
getitem_45 = to[0]
getitem_46 = dispatch_default[7]
to_1 = getitem_46.to(torch.int64)
getitem_47 = to_1[0]
item_4 = getitem_47.item()
getitem_48 = to[1]
getitem_49 = to_1[1]
item_5 = getitem_49.item()
split_2 = getitem_29.split([item_4, item_5], dim = 0)
getitem_50 = split_2[0]
getitem_51 = split_2[1]
getitem_52 = getitem_43[0]
linear_9 = torch._C._nn.linear(getitem_50, getitem_52)
getitem_53 = getitem_43[1]
linear_10 = torch._C._nn.linear(getitem_51, getitem_53)
cat_2 = torch.cat([linear_9, linear_10], dim = 0)
chunk_1 = cat_2.chunk(2, dim = -1)
getitem_54 = chunk_1[0]
getitem_55 = chunk_1[1]
silu_1 = torch.nn.functional.silu(getitem_54)
mul_2 = silu_1 * getitem_55
split_3 = mul_2.split([item_4, item_5], dim = 0)
getitem_56 = split_3[0]
getitem_57 = split_3[1]
getitem_58 = getitem_44[0]
linear_11 = torch._C._nn.linear(getitem_56, getitem_58)
getitem_59 = getitem_44[1]
linear_12 = torch._C._nn.linear(getitem_57, getitem_59)
cat_3 = torch.cat([linear_11, linear_12], dim = 0)
combine_default = torch.ops.moe_ops.combine.default(cat_3, softmax, <layout>, '<group>', 2, False, True)
getitem_60 = combine_default[0]
return (getitem_60,)""",
    )


@pytest.mark.parametrize(
    "model, reason",
    [
        (M.GraniteStyle(variant="no_way_back"), "way back"),
        (M.GraniteStyle(variant="weights_on_input"), "the routing weights scale the expert input"),
        (M.GraniteStyle(variant="rows_mixed"), "mean over dim 0"),
        (M.SentinelStyle(variant="not_sentinel").to(bf16), "not the 4 experts"),
    ],
    ids=["sort-without-inverse", "weights-on-input", "body-mixes-rows", "mask-of-real-experts"],
)
def test_near_miss_left_unchanged(model, reason, caplog):
    x = make_x(dtype=next(model.parameters()).dtype)
    with caplog.at_level("DEBUG", logger="fx_passes"):
        out, graphs, matches, before = capture(model, x)
    assert matches == []
    assert normalized_code(graphs[0]) == before[0]
    assert reason in caplog.text
    torch.testing.assert_close(out, model(x))


def test_sort_that_is_not_routing_is_not_touched():
    class SortRows(torch.nn.Module):
        def forward(self, x):
            ids = x.argmax(-1)
            order = torch.argsort(ids)
            return x[order] * 2

    x = make_x()
    out, graphs, matches, before = capture(SortRows(), x)
    assert matches == [] and normalized_code(graphs[0]) == before[0]


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("granite", f32),
        ("aria", f32),
        ("titan_loop", f32),
        ("titan_grouped", bf16),
        ("sentinel", bf16),
    ],
)
def test_equal_to_eager_aot_eager(name, dtype):
    torch.manual_seed(0)
    model = M.MODELS[name]().to(dtype)
    tol = tolerance(dtype)
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    grads_equal(
        model,
        lambda m: torch.compile(m, backend=backend, fullgraph=True),
        make_x(dtype=dtype),
        **tol,
    )


def test_equal_to_eager_inductor():
    torch.manual_seed(0)
    model = M.GraniteStyle()
    backend = fx_passes.moe_backend(inner="inductor", strict=True)
    grads_equal(
        model,
        lambda m: torch.compile(m, backend=backend, fullgraph=True),
        make_x(),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "name, dtype", [("granite", f32), ("titan_grouped", bf16), ("sentinel", bf16)]
)
def test_expert_parallel_gloo(gloo_world, name, dtype):
    gloo_world(2).run(ep_equal, M.MODELS[name], dtype)
