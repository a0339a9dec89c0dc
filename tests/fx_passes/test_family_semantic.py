"""The semantic family: routing recognised by what it computes, on spellings no other family
knows (``_semantic_models``).

Each block is rewritten (by the semantic family: one ``moe_ops.dispatch``), equal to eager in
output and gradients (aot_eager), and at W = 2 (gloo) equal to the single-device block. Near
misses that compute something else (weights on the expert input, a per-expert capacity) stay as
they are, with a reason.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import fx_passes
from tests.fx_passes import _semantic_models as M
from tests.fx_passes._harness import capture, ep_equal, grads_equal, make_x, tolerance

REWRITTEN = [
    "nonzero_index_put",
    "scatter_add",
    "onehot_einsum",
    "masked_sum",
    "argmax_top1",
    # rows derived from x alone (expanded or repeated per slot) before the experts read them
    "expand_per_slot",
    "repeat_flat_bmm",
]


def _grads_equal(model, x):
    """:func:`grads_equal` of ``model`` compiled once with the strict "moe" backend (aot_eager);
    returns the backend (``matches``) and the code of the graph it handed aot_eager (the
    rewritten one)."""
    seen = {}

    def inner(gm, example_inputs):
        seen["code"] = gm.code
        return lookup_backend("aot_eager")(gm, example_inputs)

    def compile_fn(m):
        seen["backend"] = fx_passes.moe_backend(inner=inner, strict=True)
        torch._dynamo.reset()
        return torch.compile(m, backend=seen["backend"], fullgraph=True)

    grads_equal(model, compile_fn, x, **tolerance(torch.float32))
    return seen["backend"], seen["code"]


@pytest.mark.parametrize("variant", REWRITTEN)
def test_rewritten_and_equal_to_eager(variant):
    torch.manual_seed(0)
    model = M.Routed(variant)
    backend, code = _grads_equal(model, make_x(T=7, seed=3))
    assert [m.family for m in backend.matches] == ["semantic"], backend.matches
    assert backend.matches[0].num_experts == M.E
    assert code.count("moe_ops.dispatch") == 1 and code.count("moe_ops.combine") == 1


def test_module_dict_experts_and_a_shared_expert_outside():
    torch.manual_seed(0)
    model = M.Routed("scatter_add", keyed=True)
    _, _, matches, _ = capture(model, make_x())
    assert [(m.family, m.num_experts) for m in matches] == [("semantic", M.E)]
    torch.manual_seed(0)
    shared = M.WithShared("nonzero_index_put")
    backend, _ = _grads_equal(shared, make_x())
    assert [(m.family, m.module_path) for m in backend.matches] == [("semantic", "moe")]


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("weights_on_input", "under any weights tried"),
        ("capacity", "per-expert capacity in token order"),
    ],
)
def test_near_miss_left_alone_with_reason(variant, reason):
    torch.manual_seed(0)
    model = M.Routed(variant)
    x = make_x()
    out, graphs, matches, before = capture(model, x)
    assert matches == []
    assert graphs[0].code.count("moe_ops") == 0
    reasons = [r.reason for r in graphs[0].meta["moe_rejected"] if r.family == "semantic"]
    assert any(reason in r for r in reasons), reasons
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("variant", ["scatter_add"])
def test_w2_gloo_equal_to_single_device(gloo_world, variant):
    """Sharded experts (each rank holds 2 of 4), a shared expert beside the block."""
    kept = gloo_world(2).run(
        ep_equal, partial(M.WithShared, variant), torch.float32, shard="experts"
    )
    assert kept == [M.E // 2 * (2 * M.H * M.I + M.I + M.H)] * 2
