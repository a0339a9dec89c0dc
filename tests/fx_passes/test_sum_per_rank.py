"""The "moe" backend with ``sum_per_rank=True``: the rewrite passes the option to
``moe_ops.dispatch`` (both modes), and a compiled block with more slots than ranks (K > W)
matches the single-device block on a gloo world, forward and gradients, with the experts sharded
(default ops, and the capacity-mode ops at W = 2 with K = 2)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.fx_passes import _loop_models as M
from tests.fx_passes._harness import capture, ep_equal, make_x
from tests.moe_ops._cases import in_rounds


def test_the_rewrite_passes_the_option():
    model = M.Block("onehot_where", num_experts=8, top_k=4)
    for option in (False, True):
        _, graphs, matches, _ = capture(model, make_x(), sum_per_rank=option)
        assert len(matches) == 1
        dispatches = [
            n
            for g in graphs
            for n in g.graph.nodes
            if n.target is torch.ops.moe_ops.dispatch.default
        ]
        assert [n.args[5] for n in dispatches] == [option]


def test_the_rewrite_passes_the_option_to_the_capacity_ops():
    model = M.Block("onehot_where", num_experts=8, top_k=4).to(torch.bfloat16)
    x = make_x(dtype=torch.bfloat16)  # grouped_mm: the capacity ops' experts
    for option in (False, True):
        _, graphs, matches, _ = capture(model, x, capacity="worst-case", sum_per_rank=option)
        assert len(matches) == 1 and "capacity_fallback" not in matches[0].rewritten
        dispatches = [
            n
            for g in graphs
            for n in g.graph.nodes
            if n.target is torch.ops.moe_ops.dispatch_fixed.default
        ]
        assert [n.args[8] for n in dispatches] == [option]


def test_expert_parallel_gloo(gloo_world):
    make = partial(M.Stack, 1, variant="onehot_where", num_experts=8, top_k=4)
    kept = gloo_world(2).run(
        ep_equal, make, torch.float32, 8, shard="experts", low=2e-2, sum_per_rank=True
    )
    assert kept[0] == kept[1] > 0


def test_expert_parallel_gloo_capacity(gloo_world):
    """Capacity-mode ops with per-rank sums: K = 2 at W = 2 (token rows from K > 1 on)."""
    make = partial(M.Stack, 1, variant="onehot_where", num_experts=8, top_k=2)
    gloo_world(2).run(
        ep_equal,
        make,
        torch.bfloat16,
        8,
        shard="experts",
        capacity="worst-case",
        sum_per_rank=True,
    )


def test_backend_name_takes_the_option():
    """The option through ``backend="moe"`` (which builds ``fx_passes.moe_backend(**options)``:
    the keyword is checked here at W = 1 and in the gloo cases at W = 2)."""
    model = M.Block("onehot_where", num_experts=8, top_k=4)
    torch._dynamo.reset()
    x = make_x()
    opts = {"inner": "aot_eager", "strict": True, "sum_per_rank": True}
    out = torch.compile(model, backend="moe", options=opts, fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rounds", [False, True], ids=["one exchange", "rounds"])
def test_expert_parallel_gloo_inductor(gloo_world, rounds):
    """The same through inductor (the combine's weights output has an unbacked size, and so has
    the layout's round positions), also with the partial sums back in rounds (forced)."""
    make = partial(M.Stack, 1, variant="onehot_where", num_experts=8, top_k=3)
    case = (in_rounds, ep_equal) if rounds else (ep_equal,)
    gloo_world(2).run(
        *case,
        make,
        torch.float32,
        8,
        shard="experts",
        low=2e-2,
        sum_per_rank=True,
        inner="inductor",
        timeout=300,
    )
