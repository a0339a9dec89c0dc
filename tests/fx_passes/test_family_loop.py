"""Families A (per-expert loop with where/nonzero + index_add_) and C (boolean-mask loop).

Graph shape (expecttest), near misses that must stay unchanged, forward and gradient equality
with the eager model (aot_eager; inductor for a few), W > 1 graphs under the fake process group,
and expert parallelism on gloo worlds of 2 ranks.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from expecttest import assert_expected_inline
from torch import nn

import fx_passes
from tests.fx_passes import _loop_models as M
from tests.fx_passes._harness import (
    capture,
    ep_equal,
    fake_group,
    grads_equal,
    make_x,
    normalized_code,
    rewritten,
    short_code,
    tolerance,
)

bf16, f32 = torch.bfloat16, torch.float32


# ----------------------------------------------------------------------------- graph shape
def test_graph_family_a_fp32_segments():
    torch.manual_seed(0)
    out, code, match = rewritten(M.Block("onehot_where", num_experts=2), make_x())
    assert match.summary()["experts"] == "segments"
    assert_expected_inline(
        code,
        """\
logits = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(logits, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
w = topk[0]
idx = topk[1]
sum_1 = w.sum(-1, keepdim = True)
w_1 = w / sum_1
w_2 = w_1.to(torch.float32)
dispatch = moe_ops.dispatch(l_x_, idx, 2, '', 1, False, False)
gi14 = dispatch[0]
gi15 = dispatch[1]
gi16 = dispatch[3]
gi17 = dispatch[2]
gi18 = dispatch[4]
gi19 = dispatch[5]
gi20 = dispatch[6]
gi21 = dispatch[8]
gi22 = dispatch[9]
gi23 = dispatch[10]
gi24 = dispatch[11]
gi25 = dispatch[12]
gi26 = dispatch[13]
gi27 = dispatch[14]
gi28 = dispatch[7]
tolist = gi28.tolist()
split = torch.functional.split(gi14, tolist)
gi29 = split[0]
reshape_2 = gi29.reshape(-1, 16)
linear_7 = torch._C._nn.linear(reshape_2, experts.0.gate.weight, None)
silu_2 = torch.nn.functional.silu(linear_7)
linear_8 = torch._C._nn.linear(reshape_2, experts.0.up.weight, None)
mul_4 = silu_2 * linear_8
linear_9 = torch._C._nn.linear(mul_4, experts.0.down.weight, None)
gi30 = split[1]
reshape_3 = gi30.reshape(-1, 16)
linear_10 = torch._C._nn.linear(reshape_3, experts.1.gate.weight, None)
silu_3 = torch.nn.functional.silu(linear_10)
linear_11 = torch._C._nn.linear(reshape_3, experts.1.up.weight, None)
mul_5 = silu_3 * linear_11
linear_12 = torch._C._nn.linear(mul_5, experts.1.down.weight, None)
cat = torch.cat([linear_9, linear_12])
combine = moe_ops.combine(cat, w_2, gi16, gi17, gi18, gi19, gi20, gi21, gi22, gi23, gi24, gi25, gi26, gi27, '', 1, False, True)
gi31 = combine[0]
return (gi31,)""",
    )


def test_graph_family_a_bf16_grouped_mm():
    torch.manual_seed(0)
    out, code, match = rewritten(M.Block("eq_nonzero", num_experts=2).to(bf16), make_x(dtype=bf16))
    assert match.summary()["experts"] == "grouped_mm"
    assert_expected_inline(
        code,
        """\
logits = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(logits, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
w = topk[0]
idx = topk[1]
sum_1 = w.sum(-1, keepdim = True)
w_1 = w / sum_1
w_2 = w_1.to(torch.bfloat16)
dispatch = moe_ops.dispatch(l_x_, idx, 2, '', 1, False, False)
gi14 = dispatch[0]
gi15 = dispatch[1]
gi16 = dispatch[3]
gi17 = dispatch[2]
gi18 = dispatch[4]
gi19 = dispatch[5]
gi20 = dispatch[6]
gi21 = dispatch[8]
gi22 = dispatch[9]
gi23 = dispatch[10]
gi24 = dispatch[11]
gi25 = dispatch[12]
gi26 = dispatch[13]
gi27 = dispatch[14]
cumsum = torch.cumsum(gi15, 0, dtype = torch.int32)
stack = torch.stack([experts.0.gate.weight, experts.1.gate.weight])
transpose = stack.transpose(-2, -1)
_grouped_mm = torch._grouped_mm(gi14, transpose, offs = cumsum)
silu_2 = torch.nn.functional.silu(_grouped_mm)
stack_1 = torch.stack([experts.0.up.weight, experts.1.up.weight])
transpose_1 = stack_1.transpose(-2, -1)
_grouped_mm_1 = torch._grouped_mm(gi14, transpose_1, offs = cumsum)
mul_4 = silu_2 * _grouped_mm_1
stack_2 = torch.stack([experts.0.down.weight, experts.1.down.weight])
transpose_2 = stack_2.transpose(-2, -1)
_grouped_mm_2 = torch._grouped_mm(mul_4, transpose_2, offs = cumsum)
combine = moe_ops.combine(_grouped_mm_2, w_2, gi16, gi17, gi18, gi19, gi20, gi21, gi22, gi23, gi24, gi25, gi26, gi27, '', 1, False, True)
gi28 = combine[0]
return (gi28,)""",
    )


def test_graph_family_c_bf16_grouped_mm():
    torch.manual_seed(0)
    out, code, match = rewritten(M.Block("mask_loop", num_experts=2).to(bf16), make_x(dtype=bf16))
    assert (match.family, match.num_experts) == ("C", 2)
    assert_expected_inline(
        code,
        """\
logits = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(logits, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
w = topk[0]
idx = topk[1]
sum_1 = w.sum(-1, keepdim = True)
w_1 = w / sum_1
w_2 = w_1.to(torch.bfloat16)
dispatch = moe_ops.dispatch(l_x_, idx, 2, '', 1, False, False)
gi18 = dispatch[0]
gi19 = dispatch[1]
gi20 = dispatch[3]
gi21 = dispatch[2]
gi22 = dispatch[4]
gi23 = dispatch[5]
gi24 = dispatch[6]
gi25 = dispatch[8]
gi26 = dispatch[9]
gi27 = dispatch[10]
gi28 = dispatch[11]
gi29 = dispatch[12]
gi30 = dispatch[13]
gi31 = dispatch[14]
cumsum = torch.cumsum(gi19, 0, dtype = torch.int32)
stack = torch.stack([experts.0.gate.weight, experts.1.gate.weight])
transpose = stack.transpose(-2, -1)
_grouped_mm = torch._grouped_mm(gi18, transpose, offs = cumsum)
silu_4 = torch.nn.functional.silu(_grouped_mm)
stack_1 = torch.stack([experts.0.up.weight, experts.1.up.weight])
transpose_1 = stack_1.transpose(-2, -1)
_grouped_mm_1 = torch._grouped_mm(gi18, transpose_1, offs = cumsum)
mul_8 = silu_4 * _grouped_mm_1
stack_2 = torch.stack([experts.0.down.weight, experts.1.down.weight])
transpose_2 = stack_2.transpose(-2, -1)
_grouped_mm_2 = torch._grouped_mm(mul_8, transpose_2, offs = cumsum)
combine = moe_ops.combine(_grouped_mm_2, w_2, gi20, gi21, gi22, gi23, gi24, gi25, gi26, gi27, gi28, gi29, gi30, gi31, '', 1, False, True)
gi32 = combine[0]
return (gi32,)""",
    )


def test_graph_rank1_of_2_fake_process_group():
    """At W = 2, rank 1 keeps experts 2 and 3 only; dispatch/combine name the group."""
    with fake_group(rank=1, world_size=2) as group:
        torch.manual_seed(0)
        _, graphs, matches, _ = capture(
            M.Block("onehot_where").to(bf16), make_x(dtype=bf16), group=group, run=False
        )
        code = short_code(graphs[0]).replace(f"'{group.group_name}'", "'<group>'")
    assert matches[0].rewritten["world_size"] == 2 and matches[0].rewritten["rank"] == 1
    assert "experts.0." not in code and "experts.1." not in code
    assert_expected_inline(
        code,
        """\
logits = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(logits, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
w = topk[0]
idx = topk[1]
sum_1 = w.sum(-1, keepdim = True)
w_1 = w / sum_1
w_2 = w_1.to(torch.bfloat16)
dispatch = moe_ops.dispatch(l_x_, idx, 4, '<group>', 2, False, False)
gi26 = dispatch[0]
gi27 = dispatch[1]
gi28 = dispatch[3]
gi29 = dispatch[2]
gi30 = dispatch[4]
gi31 = dispatch[5]
gi32 = dispatch[6]
gi33 = dispatch[8]
gi34 = dispatch[9]
gi35 = dispatch[10]
gi36 = dispatch[11]
gi37 = dispatch[12]
gi38 = dispatch[13]
gi39 = dispatch[14]
cumsum = torch.cumsum(gi27, 0, dtype = torch.int32)
reshape_4 = gi26.reshape(-1, 16)
stack = torch.stack([experts.2.gate.weight, experts.3.gate.weight])
transpose = stack.transpose(-2, -1)
_grouped_mm = torch._grouped_mm(reshape_4, transpose, offs = cumsum)
silu_4 = torch.nn.functional.silu(_grouped_mm)
stack_1 = torch.stack([experts.2.up.weight, experts.3.up.weight])
transpose_1 = stack_1.transpose(-2, -1)
_grouped_mm_1 = torch._grouped_mm(reshape_4, transpose_1, offs = cumsum)
mul_8 = silu_4 * _grouped_mm_1
stack_2 = torch.stack([experts.2.down.weight, experts.3.down.weight])
transpose_2 = stack_2.transpose(-2, -1)
_grouped_mm_2 = torch._grouped_mm(mul_8, transpose_2, offs = cumsum)
combine = moe_ops.combine(_grouped_mm_2, w_2, gi28, gi29, gi30, gi31, gi32, gi33, gi34, gi35, gi36, gi37, gi38, gi39, '<group>', 2, False, True)
gi40 = combine[0]
return (gi40,)""",
    )


def test_local_experts_under_fake_process_group():
    # W = 4, its first and last rank (rank 1 of 2: test_graph_rank1_of_2_fake_process_group)
    W = 4
    for rank in (0, W - 1):
        with fake_group(rank, W) as group:
            torch.manual_seed(0)
            _, graphs, matches, _ = capture(
                M.Block("mask_loop", num_experts=8), make_x(), group=group, run=False
            )
        code = short_code(graphs[0])
        used = {e for e in range(8) if f"experts.{e}.gate.weight" in code}
        e_l = 8 // W
        assert used == set(range(rank * e_l, (rank + 1) * e_l))
        # W as the world size of dispatch and combine (then their flags)
        assert "moe_ops.dispatch(l_x_, idx, 8, " in code and f", {W}, False, " in code


# ----------------------------------------------------------------------------- near misses
@pytest.mark.parametrize(
    "model, reason",
    [
        (M.Block("not_routing_mask"), "differs from the block on random inputs"),
        (M.Block("same_expert"), "not per-expert"),
        (M.Block("weights_on_input"), "applied to the expert input"),
        (M.ExpertChoice(), "could not build the rewrite"),
    ],
    ids=["mask-not-routing", "body-not-per-expert", "weights-on-input", "topk-over-tokens"],
)
def test_near_miss_left_unchanged(model, reason, caplog):
    x = make_x()
    with caplog.at_level("DEBUG", logger="fx_passes"):
        out, graphs, matches, before = capture(model, x)
    assert matches == []
    assert normalized_code(graphs[0]) == before[0]
    assert reason in caplog.text
    torch.testing.assert_close(out, model(x))


def test_topk_without_expert_loop_is_not_touched():
    class TopTokens(nn.Module):
        def forward(self, x):
            w, idx = torch.topk(x.sum(-1), 3)
            return x[idx] * w[:, None]

    x = make_x()
    _, graphs, matches, before = capture(TopTokens(), x)
    assert matches == [] and normalized_code(graphs[0]) == before[0]


def test_routing_mask_shared_with_aux_loss_stays():
    torch.manual_seed(0)
    model = M.WithAuxLoss()
    x = make_x()
    (out, aux), graphs, matches, _ = capture(model, x)
    code = short_code(graphs[0])
    assert len(matches) == 1 and "one_hot" in code and "index_add_" not in code
    ref_out, ref_aux = model(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(aux, ref_aux)


# ----------------------------------------------------------------------------- equality
# Each routing spelling in one dtype: the dtype picks how the experts run after the rewrite
# (float32: per-expert segments, bfloat16: grouped_mm), which does not depend on the spelling.
# Both are checked with and without expert biases (A-bias-gelu); the float32 onehot_where block
# is test_backend.py::test_backend_by_name_rewrites_and_matches_eager's.
VARIANTS = {
    "A-onehot-where": (dict(variant="onehot_where"), [bf16]),
    "A-eq-nonzero": (dict(variant="eq_nonzero"), [f32]),
    "A-functional-index_add": (dict(variant="chain"), [bf16]),
    "C-mask-loop": (dict(variant="mask_loop"), [f32]),
    "A-base-is-shared-expert": (dict(variant="base_acc"), [bf16]),
    "A-sigmoid-gather": (dict(routing="sigmoid"), [bf16]),
    "A-shared-no-renorm": (dict(renorm=False, shared=True), [bf16]),
    "A-bias-gelu": (dict(bias=True, act=F.gelu), [f32, bf16]),
    "C-bias-tanh": (dict(variant="mask_loop", bias=True, act=torch.tanh), [bf16]),
}


@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(name, dtype, id=f"{name}-{'f32' if dtype == f32 else 'bf16'}")
        for name, (_, dtypes) in VARIANTS.items()
        for dtype in dtypes
    ],
)
def test_equal_to_eager_aot_eager(name, dtype):
    torch.manual_seed(0)
    model = M.Block(**VARIANTS[name][0]).to(dtype)
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    # bf16: the eager block rounds each expert's weighted output to bf16 before adding it up,
    # combine adds in float32; gradients summed over tokens differ by a few bf16 ulps.
    tol = tolerance(dtype, 5e-2)
    torch._dynamo.reset()
    grads_equal(
        model,
        lambda m: torch.compile(m, backend=backend, fullgraph=True),
        make_x(dtype=dtype),
        **tol,
    )
    assert len(backend.matches) == 1


# float32 (per-expert segments) goes through inductor in test_expert_parallel_gloo_inductor (W = 2,
# training) and test_family_sorted.py::test_equal_to_eager_inductor (W = 1)
@pytest.mark.parametrize("dtype", [bf16], ids=["bf16-grouped_mm"])
def test_equal_to_eager_inductor(dtype):
    torch.manual_seed(0)
    model = M.Stack(1, variant="onehot_where").to(dtype)
    backend = fx_passes.moe_backend(inner="inductor", strict=True)
    tol = tolerance(dtype)
    torch._dynamo.reset()
    grads_equal(
        model,
        lambda m: torch.compile(m, backend=backend, fullgraph=True),
        make_x(dtype=dtype),
        **tol,
    )
    assert [m.module_path for m in backend.matches] == ["layers.0"]


def test_block_under_checkpoint():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = M.Block("onehot_where")

        def forward(self, x):
            return x + cp.checkpoint(self.moe, x, use_reentrant=False)

    torch.manual_seed(0)
    backend = fx_passes.moe_backend(inner="aot_eager")
    torch._dynamo.reset()
    grads_equal(
        Outer(),
        lambda m: torch.compile(m, backend=backend, fullgraph=True),
        make_x(),
        atol=1e-5,
        rtol=1e-4,
    )
    assert [m.module_path for m in backend.matches] == ["moe"]


# ----------------------------------------------------------------------------- gloo worlds
# W = 4 (one local expert per rank) compiles and runs this block in
# test_sharding.py::test_checkpoint_saved_at_2_loads_at_4_and_1[module_list]
@pytest.mark.parametrize("W, layers", [(2, 2)])
def test_expert_parallel_gloo(gloo_world, W, layers):
    make = partial(M.Stack, layers, variant="onehot_where")
    kept = gloo_world(W).run(ep_equal, make, f32, blocks=layers, shard="experts", low=2e-2)
    full = layers * M.E * 3 * M.H * M.I
    assert kept == [full // W] * W


def test_expert_parallel_gloo_inductor(gloo_world):
    """Through inductor, training: the per-expert segments' backward gets dispatch's layout
    but no tensor of R rows, so R must be nameable from what it gets (recv_perm's length)."""
    make = partial(M.Stack, 1, variant="onehot_where")
    gloo_world(2).run(
        ep_equal, make, f32, 8, shard="experts", low=2e-2, inner="inductor", timeout=300
    )


def test_expert_parallel_gloo_family_c_bf16(gloo_world):
    make = partial(M.Stack, 1, variant="mask_loop")
    gloo_world(2).run(ep_equal, make, bf16, shard="experts", low=2e-2)
