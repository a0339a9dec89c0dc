"""Stacked-expert blocks in spellings of our own (``_stacked_models``): expert bodies with tensor
row offsets, buffers filled by segment, padding to an alignment, 2-D weights viewed per expert,
a one-hot count and a recomputed token index. Each is rewritten (one ``moe_ops.dispatch``) and
equal to eager in output and gradients (aot_eager); at W = 2 (gloo) each rank runs only its
experts' slices and equals the single-device block. A body that is not each expert's own
function (it mixes rows of every expert) stays as it is, with the reason.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import fx_passes
from tests.fx_passes import _stacked_models as M
from tests.fx_passes._harness import capture, ep_equal, grads_equal, make_x, tolerance


@pytest.mark.parametrize("name", sorted(M.REWRITTEN))
def test_rewritten_and_equal_to_eager(name):
    torch.manual_seed(0)
    make, family = M.REWRITTEN[name]
    model = make()
    seen = {}

    def compile_moe(m):
        def inner(gm, example_inputs):
            seen["code"] = gm.code
            return lookup_backend("aot_eager")(gm, example_inputs)

        backend = fx_passes.moe_backend(inner=inner, strict=True)
        seen["backend"] = backend
        torch._dynamo.reset()
        return torch.compile(m, backend=backend, fullgraph=True)

    grads_equal(model, compile_moe, make_x(T=7, seed=3), **tolerance(torch.float32))
    matches = seen["backend"].matches
    assert [(m.family, m.num_experts, m.summary()["body"]) for m in matches] == [
        (family, M.E, "stacked")
    ]
    code = seen["code"]
    assert code.count("moe_ops.dispatch") == 1 and code.count("moe_ops.combine") == 1
    assert "argsort" not in code and "einsum" not in code  # the block's own routing is gone


def test_body_mixing_the_experts_rows_left_alone_with_reason():
    """``y - y.mean(0)`` over every expert's rows: the W = 1 rewrite computes the same, but one
    rank's experts alone would not; the check on split experts says so."""
    torch.manual_seed(0)
    model = M.CenteredNearMiss()
    x = make_x()
    out, graphs, matches, _ = capture(model, x)
    assert matches == []
    assert "moe_ops" not in graphs[0].code
    reasons = [r.reason for r in graphs[0].meta["moe_rejected"] if r.family == "sorted"]
    assert any("split over 2 ranks differs from the whole" in r for r in reasons), reasons
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("name", ["flat_viewed_ends", "padded", "dense_one_hot"])
def test_w2_gloo_equal_to_single_device(gloo_world, name):
    """Whole stacked weights on both ranks (2-D ``[E * I, H]`` ones too): each rank's rewrite
    runs its 2 of the 4 experts on its rows."""
    gloo_world(2).run(ep_equal, partial(M.REWRITTEN[name][0]), torch.float32)
