"""Family E (hand-written all-to-all EP): graph shape under the fake process group, near misses,
and equality with the block run eagerly on its own all_to_alls (gloo, W = 2)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from expecttest import assert_expected_inline

from fx_passes.backend import suggestion
from tests.fx_passes import _ep_models as M
from tests.fx_passes._harness import (
    _compile_moe,
    capture,
    code_of,
    ep_equal_hand_written,
    ep_equal_single_device,
    fake_group,
    grads_equal,
    make_x,
    normalized_code,
    tolerance,
)

bf16, f32 = torch.bfloat16, torch.float32


def _capture_fake(make, rank, dtype=f32, W=2):
    """Capture ``make()`` on rank ``rank`` of a fake process group of ``W``; the pass runs, the
    rewritten graph does not. Returns ``(code after, matches, unchanged, rejects)``."""
    with fake_group(rank, W) as group:
        torch.manual_seed(0)
        model = make().to(dtype)
        _, graphs, matches, before = capture(model, make_x(dtype=dtype), run=False)
        code = code_of(graphs[0]).replace(f"'{group.group_name}'", "'<group>'")
    unchanged = normalized_code(graphs[0]) == before[0]
    return code, matches, unchanged, graphs[0].meta["moe_rejected"]


def test_graph_titan_grouped_mm_bf16_rank1_of_2():
    """The user's three all_to_alls, ``tolist`` sizes and regroup become dispatch/combine; the
    local ``[E_l, ...]`` weights are used whole."""
    code, matches, _, _ = _capture_fake(lambda: M.TitanEP(grouped=True), rank=1, dtype=bf16)
    assert [m.family for m in matches] == ["ep"]
    assert matches[0].rewritten == dict(experts="stacked", world_size=2, rank=1)
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
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, idx, 4, '<group>', 2, False, False)
getitem_12 = dispatch_default[0]
getitem_13 = dispatch_default[1]
getitem_14 = dispatch_default[3]
getitem_15 = dispatch_default[2]
getitem_16 = dispatch_default[4]
getitem_17 = dispatch_default[5]
getitem_18 = dispatch_default[6]
getitem_19 = dispatch_default[8]
getitem_20 = dispatch_default[9]
getitem_21 = dispatch_default[10]
getitem_22 = dispatch_default[11]
getitem_23 = dispatch_default[12]
getitem_24 = dispatch_default[13]
getitem_25 = dispatch_default[14]
to_2 = getitem_13.to(torch.int64)
cumsum_1 = torch.cumsum(to_2, 0, dtype = torch.int32)
transpose_3 = l_self_parameters_w1_.transpose(-2, -1)
transpose_4 = l_self_parameters_w3_.transpose(-2, -1)
transpose_5 = l_self_parameters_w2_.transpose(-2, -1)
_grouped_mm_3 = torch._grouped_mm(getitem_12, transpose_3, offs = cumsum_1)
silu_2 = torch.nn.functional.silu(_grouped_mm_3)
_grouped_mm_4 = torch._grouped_mm(getitem_12, transpose_4, offs = cumsum_1)
mul_2 = silu_2 * _grouped_mm_4
_grouped_mm_5 = torch._grouped_mm(mul_2, transpose_5, offs = cumsum_1)
combine_default = torch.ops.moe_ops.combine.default(_grouped_mm_5, top_1, <layout>, '<group>', 2, False, True)
getitem_26 = combine_default[0]
add_1 = input_3 + getitem_26
return (add_1,)""",
    )


def test_graph_seed_plain_dist_module_list_rank0_of_2():
    """Plain ``dist.all_to_all_single`` (functional op + wait + ``copy_`` into a buffer) and a
    ``ModuleList`` of local experts: each runs on its segment of the received rows."""
    code, matches, _, _ = _capture_fake(M.SeedEP, rank=0)
    assert [m.family for m in matches] == ["ep"]
    assert matches[0].rewritten["experts"] == "segments"
    assert_expected_inline(
        code,
        """\
linear = torch._C._nn.linear(l_x_, router.weight, None)
probs = torch.nn.functional.softmax(linear, dim = -1, dtype = torch.float32)
topk = torch.topk(probs, 2, dim = -1)
topk_w = topk[0]
topk_idx = topk[1]
sum_1 = topk_w.sum(-1, keepdim = True)
topk_w_1 = topk_w / sum_1
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, topk_idx, 4, '<group>', 2, False, False)
getitem_18 = dispatch_default[0]
getitem_19 = dispatch_default[1]
getitem_20 = dispatch_default[3]
getitem_21 = dispatch_default[2]
getitem_22 = dispatch_default[4]
getitem_23 = dispatch_default[5]
getitem_24 = dispatch_default[6]
getitem_25 = dispatch_default[8]
getitem_26 = dispatch_default[9]
getitem_27 = dispatch_default[10]
getitem_28 = dispatch_default[11]
getitem_29 = dispatch_default[12]
getitem_30 = dispatch_default[13]
getitem_31 = dispatch_default[14]
getitem_32 = dispatch_default[7]
tolist = getitem_32.tolist()
split_1 = torch.functional.split(getitem_18, tolist)
getitem_33 = split_1[0]
linear_5 = torch._C._nn.linear(getitem_33, experts.0.up.weight, experts.0.up.bias)
chunk_2 = linear_5.chunk(2, dim = -1)
a_2 = chunk_2[0]
b_2 = chunk_2[1]
silu_2 = torch.nn.functional.silu(a_2)
mul_3 = silu_2 * b_2
linear_6 = torch._C._nn.linear(mul_3, experts.0.down.weight, experts.0.down.bias)
getitem_34 = split_1[1]
linear_7 = torch._C._nn.linear(getitem_34, experts.1.up.weight, experts.1.up.bias)
chunk_3 = linear_7.chunk(2, dim = -1)
a_3 = chunk_3[0]
b_3 = chunk_3[1]
silu_3 = torch.nn.functional.silu(a_3)
mul_4 = silu_3 * b_3
linear_8 = torch._C._nn.linear(mul_4, experts.1.down.weight, experts.1.down.bias)
cat_1 = torch.cat([linear_6, linear_8])
combine_default = torch.ops.moe_ops.combine.default(cat_1, topk_w_1, <layout>, '<group>', 2, False, True)
getitem_35 = combine_default[0]
return (getitem_35,)""",
    )


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: M.TitanEP(variant="no_regroup"), "not a regroup by expert"),
        (lambda: M.TitanEP(variant="swapped_back"), "does not swap the forward split sizes"),
        (M.ActivationA2A, "expected one way back to the tokens, found 0"),
    ],
    ids=["experts-read-rows-by-source-rank", "way-back-with-forward-sizes", "activation-a2a"],
)
def test_near_miss_left_unchanged(make, reason):
    code, matches, unchanged, rejects = _capture_fake(make, rank=1)
    assert matches == [] and unchanged
    assert "_c10d_functional.all_to_all_single" in code
    assert any(r.family == "ep" and reason in r.reason for r in rejects), rejects


@pytest.mark.parametrize(
    "name, dtype",
    [("titan", f32), ("seed", f32), ("titan_grouped", bf16)],
    ids=["titan-functional", "seed-plain-dist-modulelist", "titan-grouped-mm-bf16"],
)
def test_expert_parallel_gloo(gloo_world, name, dtype):
    """Output and gradients equal the eager block's; the compiled block runs 3 all_to_alls and
    1 host sync forward, 2 all_to_alls backward (the user's code: 3 and 2 syncs forward)."""
    for counts in gloo_world(2).run(ep_equal_hand_written, M.MODELS[name], dtype):
        assert counts == dict(fwd_a2a=3, fwd_sync=1, bwd_a2a=2, bwd_sync=0)


# ----------------------------------------------------------------------------- by value
BY_VALUE = list(M.BY_VALUE)


@pytest.mark.parametrize("name", BY_VALUE)
def test_by_value_w1_equal_to_eager(name):
    """At W = 1 (no collective) the block is rewritten: a moe_ops dispatch in the graph, output
    and gradients equal eager."""
    torch.manual_seed(0)
    model = M.BY_VALUE[name](None)
    backends = []

    def compile_fn(m):
        compiled, backend = _compile_moe(m)
        backends.append(backend)
        return compiled

    grads_equal(model, compile_fn, make_x(), **tolerance(f32))
    (backend,) = backends
    assert len(backend.matches) == 1, backend.matches
    assert "moe_ops.dispatch" in backend.matches[0].output.graph.python_code("self").src


def test_by_value_graph_fastmoe_style_rank1_of_2():
    """FastMoE style: the count exchange, the matrix's prefix sums, the scatter and gather
    Functions (row gather and exchange inside) and the ``bmm`` by the scores become one
    dispatch and one combine with the scores as weights; the local experts run on segments."""
    code, matches, _, _ = _capture_fake(lambda: M.CountMatrixTop2EP(dist.group.WORLD), rank=1)
    assert matches[0].topk_weights.name == "score"
    assert_expected_inline(
        code,
        """\
linear = torch._C._nn.linear(l_x_, gate.weight, gate.bias)
topk = torch.topk(linear, 2, dim = -1)
val = topk[0]
idx = topk[1]
score = torch.nn.functional.softmax(val, dim = -1)
_set_grad_enabled = torch._C._set_grad_enabled(False)
_set_grad_enabled_1 = torch._C._set_grad_enabled(True)
dispatch_default = torch.ops.moe_ops.dispatch.default(l_x_, idx, 4, '<group>', 2, False, False)
getitem_22 = dispatch_default[0]
getitem_23 = dispatch_default[1]
getitem_24 = dispatch_default[3]
getitem_25 = dispatch_default[2]
getitem_26 = dispatch_default[4]
getitem_27 = dispatch_default[5]
getitem_28 = dispatch_default[6]
getitem_29 = dispatch_default[8]
getitem_30 = dispatch_default[9]
getitem_31 = dispatch_default[10]
getitem_32 = dispatch_default[11]
getitem_33 = dispatch_default[12]
getitem_34 = dispatch_default[13]
getitem_35 = dispatch_default[14]
getitem_36 = dispatch_default[7]
tolist = getitem_36.tolist()
split_1 = torch.functional.split(getitem_22, tolist)
getitem_37 = split_1[0]
linear_5 = torch._C._nn.linear(getitem_37, experts.0.up.weight, experts.0.up.bias)
chunk_2 = linear_5.chunk(2, dim = -1)
a_2 = chunk_2[0]
b_2 = chunk_2[1]
silu_2 = torch.nn.functional.silu(a_2)
mul_2 = silu_2 * b_2
linear_6 = torch._C._nn.linear(mul_2, experts.0.down.weight, experts.0.down.bias)
getitem_38 = split_1[1]
linear_7 = torch._C._nn.linear(getitem_38, experts.1.up.weight, experts.1.up.bias)
chunk_3 = linear_7.chunk(2, dim = -1)
a_3 = chunk_3[0]
b_3 = chunk_3[1]
silu_3 = torch.nn.functional.silu(a_3)
mul_3 = silu_3 * b_3
linear_8 = torch._C._nn.linear(mul_3, experts.1.down.weight, experts.1.down.bias)
cat_1 = torch.cat([linear_6, linear_8])
combine_default = torch.ops.moe_ops.combine.default(cat_1, score, <layout>, '<group>', 2, False, True)
getitem_39 = combine_default[0]
return (getitem_39,)""",
    )


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("no_regroup", "the experts do not see each rank's rows grouped by local expert"),
        ("swapped_back", "its split sizes are not the forward ones swapped"),
        ("crossed_ranks", "the way back mixes up ranks"),
    ],
)
def test_by_value_near_miss_left_unchanged(variant, reason):
    """The simulated world catches what the spelling cannot show: experts run on rows in
    source-rank order, the way back sent with the forward split sizes, rows sent back to
    another rank than they came from."""
    make = partial(M.GatheredCountsEP, variant=variant)
    code, matches, unchanged, rejects = _capture_fake(lambda: make(dist.group.WORLD), rank=1)
    assert matches == [] and unchanged
    (why,) = [r.reason for r in rejects if r.family == "ep" and reason in r.reason]
    assert suggestion(why).startswith("hand-written EP: "), suggestion(why)


def test_by_value_gloo_equal_to_single_device(gloo_world):
    """At W = 2 (gloo) every spelling is rewritten by family ep and equals the single-device
    block (the same block on a one-rank group): output, input and parameter gradients. On each
    rank each spelling's collectives, count exchange, split sizes and regroup became one dispatch
    and one combine over the block's group of 2."""
    names = list(M.BY_VALUE)
    for rank_results in gloo_world(2).run(ep_equal_single_device, list(M.BY_VALUE.values())):
        assert [r["family"] for r in rank_results] == ["ep"] * len(names)
        for name, r in zip(names, rank_results, strict=True):
            code = r["code"]
            assert r["world_size"] == 2 and r["num_experts"] == 4, name
            assert "_c10d_functional" not in code and "autograd_function_apply" not in code, name
            assert code.count("moe_ops.dispatch.default(") == 1, name
            assert code.count("moe_ops.combine.default(") == 1, name


def test_by_value_one_rank_group_holding_collectives():
    """Over a one-rank gloo group the blocks keep their collectives (a W = 1 EP run): each is
    rewritten by family ep over that group, output and gradients equal the block run eagerly.
    (Two spellings: a Function around plain dist, functional collectives with shipped ids.)"""
    from torch.distributed import HashStore

    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        for name in ("count_matrix_top2", "shipped_ids"):
            make = M.BY_VALUE[name]
            torch.manual_seed(0)
            reference = make(dist.group.WORLD)
            torch.manual_seed(0)
            model = make(dist.group.WORLD)
            compiled, backend = _compile_moe(model)
            x_ref, x_out = make_x().requires_grad_(True), make_x().requires_grad_(True)
            ref, out = reference(x_ref), compiled(x_out)
            assert [m.family for m in backend.matches] == ["ep"], (name, backend.matches)
            dy = torch.randn_like(ref)
            (ref * dy).sum().backward()
            (out * dy).sum().backward()
            t = tolerance(f32)
            torch.testing.assert_close(out, ref, **t, msg=name)
            torch.testing.assert_close(x_out.grad, x_ref.grad, **t, msg=name)
            ref_params = dict(reference.named_parameters())
            for pname, p in model.named_parameters():
                torch.testing.assert_close(p.grad, ref_params[pname].grad, **t, msg=pname)
    finally:
        dist.destroy_process_group()
