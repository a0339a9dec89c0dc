"""``torch.autograd.gradcheck`` in float64: dispatch w.r.t. x, combine w.r.t. expert_out and
topk_weights, and dispatch -> f -> combine, at W = 1 in this process and at W = 2 on gloo."""

from __future__ import annotations

import pytest

from tests.moe_ops import _cases

WHICH = ["dispatch", "combine", "composed"]


@pytest.mark.parametrize("which", WHICH)
def test_gradcheck_single_rank(which):
    _cases.gradcheck_case(which, seed=1)


@pytest.mark.parametrize("checked_rank", [0, 1])
@pytest.mark.parametrize("which", WHICH)
def test_gradcheck_two_ranks(gloo_world, which, checked_rank):
    gloo_world(2).run(_cases.gradcheck_case, which, 1, checked_rank)
