"""A failure of the pass on one block never breaks the user's compile.

Failures are injected into a matcher (one candidate, and a whole family), into the check and into
the emission (after it has inserted nodes): the block is left as it was (the graph code too),
with the exception as its reason, the model still equals eager, and ``strict=True`` raises a
``RuntimeError`` naming the block. A frame Dynamo skips (so the pass never sees it) is reported
by ``compile_moe`` and ``explain`` too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_passes
from fx_passes import emit, fuse
from fx_passes.families import Family, sort
from tests.fx_passes import _loop_models as L
from tests.fx_passes import _semantic_models as M
from tests.fx_passes import _sorted_models as S
from tests.fx_passes._harness import capture, make_x, normalized_code


class Injected(RuntimeError):
    pass


def _boom(*args, **kwargs):
    raise Injected("injected failure")


class Two(nn.Module):
    """Two blocks: ``good`` (family C) and ``other`` (family A), to see one fail alone."""

    def __init__(self):
        super().__init__()
        self.good = L.Block("mask_loop")
        self.other = L.Block("onehot_where")

    def forward(self, x):
        return self.other(self.good(x))


def _rejects(graphs):
    return [r for gm in graphs for r in gm.meta.get("moe_rejected", [])]


def test_matcher_failure_on_one_candidate_rejects_that_block():
    torch.manual_seed(0)
    model = S.GraniteStyle()
    x = make_x()
    ref = model(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sort, "_match_sort", _boom)
        out, graphs, matches, before = capture(model, x)
    assert not [m for m in matches if m.family == "sorted"]
    failed = [r for r in _rejects(graphs) if r.family == "sorted"]
    assert failed and "the matcher failed: Injected: injected failure" in failed[0].reason
    assert isinstance(failed[0].error, Injected)
    torch.testing.assert_close(out, ref)


def test_a_family_that_fails_as_a_whole_leaves_the_others_working():
    torch.manual_seed(0)
    model = Two()
    x = make_x()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuse, "FAMILIES", (Family("broken", _boom), *fuse.FAMILIES))
        out, graphs, matches, _ = capture(model, x)
    assert sorted(m.module_path for m in matches) == ["good", "other"]
    (failed,) = [r for r in _rejects(graphs) if r.family == "broken"]
    assert failed.reason == "the matcher failed: Injected: injected failure"
    torch.testing.assert_close(out, model(x))


def test_check_failure_rejects_the_block():
    torch.manual_seed(0)
    model = Two()
    x = make_x()
    calls = []

    def fail_for_good(gm, match, *args):
        calls.append(match.module_path)
        if match.module_path == "good":
            raise Injected("injected failure")
        return None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuse, "verify_match", fail_for_good)
        out, graphs, matches, _ = capture(model, x)
    assert [m.module_path for m in matches] == ["other"]
    reasons = [r.reason for r in _rejects(graphs) if r.module_path == "good"]
    assert "the check failed: Injected: injected failure" in reasons
    assert "good" in calls
    torch.testing.assert_close(out, model(x))


def test_emission_failure_leaves_the_graph_as_it_was():
    torch.manual_seed(0)
    model = L.Block("onehot_where")
    x = make_x()
    real = emit.emit_routed

    def emit_then_fail(graph, *args, **kwargs):
        real(graph, *args, **kwargs)  # nodes are in the graph now: they must go again
        raise Injected("injected failure")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emit, "emit_routed", emit_then_fail)
        out, graphs, matches, before = capture(model, x)
    assert matches == []
    assert normalized_code(graphs[0]) == before[0]
    reasons = [r.reason for r in _rejects(graphs)]
    assert "the rewrite failed: Injected: injected failure" in reasons
    torch.testing.assert_close(out, model(x))


def test_strict_raises_naming_the_block():
    torch.manual_seed(0)
    model = Two()
    x = make_x()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emit, "emit_routed", _boom)
        backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"MoE block good \(family C\): the rewrite failed"):
            torch.compile(model, backend=backend, fullgraph=True)(x)
        gm_holder = []

        def keep(gm, example_inputs):
            gm_holder.append(gm)
            with pytest.raises(RuntimeError, match="MoE block good") as info:
                fx_passes.fuse_moe_routing(gm, example_inputs=example_inputs, strict=True)
            assert isinstance(info.value.__cause__, Injected)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=keep, fullgraph=True)(x)
    assert gm_holder


def test_explain_lists_the_failed_block_with_a_suggestion():
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emit, "emit_routed", _boom)
        torch._dynamo.reset()
        rows = fx_passes.explain(Two(), make_x(), file=None)
    by_block = {r["block"]: r for r in rows}
    assert by_block["good"]["rewritten"] == "no"
    assert "the rewrite failed: Injected: injected failure" in by_block["good"]["detail"]
    assert "failure of the pass itself" in by_block["good"]["suggestion"]


def test_explain_reports_a_frame_dynamo_skipped():
    torch.manual_seed(0)
    model = M.SkipsEmpty()
    x = make_x()
    rows = fx_passes.explain(model, x, file=None)
    (row,) = [r for r in rows if r["block"] == "<SkipsEmpty>"]
    assert row["rewritten"] == "no"
    assert "Dynamo skipped a frame" in row["detail"]
    assert "fullgraph=True" in row["suggestion"]
    torch._dynamo.reset()
    run = fx_passes.compile_moe(model, inner="aot_eager", strict=True)
    with pytest.raises(RuntimeError, match="<SkipsEmpty> was not rewritten: Dynamo skipped"):
        run(x)
