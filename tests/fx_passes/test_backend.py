"""The "moe" backend: entry point, inner compilers, strict mode, warnings for blocks that were not
rewritten, ``compile_moe`` (capture flags), ``explain``, and ``shard_experts``."""

from __future__ import annotations

import importlib.metadata
import io
import logging

import pytest
import torch
from torch import nn

import fx_passes
from fx_passes import backend as backend_mod
from tests.fx_passes import _loop_models as M
from tests.fx_passes._harness import fake_group, grads_equal, make_x


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert [ep.value for ep in eps if ep.name == "moe"] == ["fx_passes.backend:moe_backend_entry"]
    assert "moe" in torch._dynamo.list_backends()


def test_backend_by_name_rewrites_and_matches_eager(caplog):
    torch.manual_seed(0)
    model = M.Block("onehot_where")
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="fx_passes"):
        grads_equal(
            model,
            lambda m: torch.compile(
                m, backend="moe", fullgraph=True, options={"inner": "aot_eager", "strict": True}
            ),
            make_x(seed=3),
            atol=1e-5,
            rtol=1e-4,
        )
    assert "rewrote MoE block <top> (family A, 4 experts, segments)" in caplog.text


def test_entry_point_rejects_unknown_options():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown options"):
        torch.compile(M.Block(), backend="moe", options={"bogus": 1})(make_x(seed=3))


def test_inner_callable_receives_rewritten_graph():
    seen = []

    def inner(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes])
        return gm.forward

    torch._dynamo.reset()
    torch.compile(M.Block("mask_loop"), backend=fx_passes.moe_backend(inner=inner), fullgraph=True)(
        make_x(seed=3)
    )
    assert torch.ops.moe_ops.dispatch.default in seen[0]
    assert torch.ops.moe_ops.combine.default in seen[0]
    assert "index_add_" not in seen[0] and torch.where not in seen[0]


def test_unrewritable_block_warns_once_and_stays_correct(caplog):
    """A Mixtral-style loop over experts found at run time cannot be captured as one graph."""
    backend_mod._warned.clear()
    torch.manual_seed(0)
    model = M.ExpertHitLoop()
    compiled = torch.compile(model, backend=fx_passes.moe_backend(inner="aot_eager"))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="fx_passes"):
        for _ in range(3):
            x = make_x(seed=3)
            torch.testing.assert_close(compiled(x), model(x))
    warnings = [r for r in caplog.records if "was not rewritten" in r.getMessage()]
    assert len(warnings) == 1
    assert "expert_hit" in warnings[0].getMessage()


def test_strict_raises_when_nothing_was_rewritten():
    torch._dynamo.reset()
    compiled = torch.compile(
        M.ExpertHitLoop(), backend=fx_passes.moe_backend(inner="aot_eager", strict=True)
    )
    with pytest.raises(Exception, match=r"strict=True\): MoE block .* was not rewritten"):
        compiled(make_x(seed=3))


def test_compile_moe_captures_without_fullgraph():
    """Without fullgraph=True Dynamo breaks at torch.where; compile_moe turns the capture on."""
    torch.manual_seed(0)
    model = M.Stack(1, variant="eq_nonzero")
    torch._dynamo.reset()
    run = fx_passes.compile_moe(model, inner="aot_eager", strict=True)
    x = make_x(seed=3)
    torch.testing.assert_close(run(x), model(x))


def test_explain_prints_found_and_not_found_blocks():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.good = M.Block("mask_loop")
            self.bad = M.Block("not_routing_mask")

        def forward(self, x):
            return self.good(x) + self.bad(x)

    torch.manual_seed(0)
    torch._dynamo.reset()
    buf = io.StringIO()
    rows = fx_passes.explain(Two(), make_x(seed=3), file=buf)
    by_block = {r["block"]: r for r in rows}
    assert by_block["good"]["rewritten"] == "yes" and by_block["good"]["family"] == "C"
    assert by_block["bad"]["rewritten"] == "no"
    assert "differs from the block" in by_block["bad"]["detail"]
    assert "good" in buf.getvalue() and "rewritten" in buf.getvalue()


def test_shard_experts_keeps_only_local_weights():
    with fake_group(rank=1, world_size=4):
        model = M.Stack(num_experts=8)
        info = fx_passes.shard_experts(model)
    assert [(s.path, s.num_experts, s.local_experts) for s in info] == [
        ("layers.0.experts", 8, range(2, 4)),
        ("layers.1.experts", 8, range(2, 4)),
    ]
    for name, p in model.named_parameters():
        if ".experts." in name:
            e = int(name.split(".experts.")[1].split(".")[0])
            assert p.requires_grad == (e in (2, 3)), name
            assert (p.untyped_storage().nbytes() > p.element_size()) == (e in (2, 3)), name


def test_shard_experts_rejects_uneven_split():
    with (
        fake_group(rank=0, world_size=3),
        pytest.raises(ValueError, match="4 experts, not a multiple of the group size 3"),
    ):
        fx_passes.shard_experts(M.Block())


def test_quickstart_example_runs_expert_parallel():
    """examples/ep_quickstart.py: 2 gloo ranks, sharded experts, equal to one device."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "ep_quickstart.py"), "--inner", "aot_eager"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rewrote layers.0: family A, 4 experts" in proc.stdout
    assert proc.stdout.count("output and gradients match the single-device model") == 2
