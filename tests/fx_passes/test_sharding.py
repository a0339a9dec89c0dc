"""``fx_passes.shard_experts``: only local experts in memory, checkpoints across world sizes.

Real transformers 5 blocks (stacked ``[E, ...]`` experts become DTensor ``Shard(0)`` parameters)
and a ModuleList block (other ranks' experts dropped), expert parallel at W = 2 on gloo against
the single-device block; ``torch.distributed.checkpoint`` saved at W = 2 and loaded at W = 4 and
at W = 1; the pass's check on experts that hold NaN; the errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fx_passes
from tests.fx_passes import _harness as HR
from tests.fx_passes import _loop_models as L

transformers = pytest.importorskip("transformers")
from torch.distributed.tensor import DTensor  # noqa: E402

HIDDEN = 32


def _tf_block(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0, num_experts: int = 4
) -> nn.Module:
    """A transformers 5 MoE block (``experts_implementation="grouped_mm"``), top-2."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cls, cfg_cls = {
        "mixtral": (MixtralSparseMoeBlock, transformers.MixtralConfig),
        "gpt_oss": (GptOssMLP, transformers.GptOssConfig),
    }[name]
    cfg = cfg_cls(
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
    )
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    block = cls(cfg).to(dtype)
    with torch.no_grad():  # transformers leaves some expert weights uninitialised
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return block


def _run(block, x):
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    torch._dynamo.reset()
    return HR.first(torch.compile(block, backend=backend, fullgraph=True)(x)), backend.matches


def _local_rows(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


# ----------------------------------------------------------------------------- cases (run on ranks)
def _ep_sharded_equal(name: str, dtype: torch.dtype) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    ref_block, block = _tf_block(name, dtype), _tf_block(name, dtype)
    shards = fx_passes.shard_experts(block)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(10 + rank)).to(dtype)
    x_ref, x_ep = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = HR.first(ref_block(x_ref))
    out, matches = _run(block, x_ep)
    tol = HR.tolerance(dtype)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **tol)
    params = dict(block.named_parameters())
    assert list(block.state_dict()) == list(ref_block.state_dict())
    expert_bytes = 0
    for n, p in ref_block.named_parameters():
        q, want = params[n], p.grad.clone()
        if isinstance(q, DTensor):
            dist.all_reduce(want)  # experts see every rank's tokens; the rest only this rank's
            e_l = q.shape[0] // W
            assert q.to_local().shape[0] == e_l and q.grad.to_local().shape[0] == e_l
            torch.testing.assert_close(
                q.grad.to_local(), want[rank * e_l : (rank + 1) * e_l], **tol
            )
            expert_bytes += q.to_local().nbytes
        else:
            torch.testing.assert_close(q.grad, want, **tol)
    assert block.experts.gate_up_proj is params["experts.gate_up_proj"]  # eager: the DTensor
    with pytest.raises(Exception, match="DTensor"):  # ... which a plain forward rejects
        block(x)
    return dict(
        layouts=[s.layout for s in shards], families=[m.family for m in matches], bytes=expert_bytes
    )


def _nan_in_other_experts(kind: str) -> float:
    """Every expert this rank does not own is NaN; the strict backend still rewrites the block."""
    rank, W = dist.get_rank(), dist.get_world_size()
    if kind == "stacked":
        ref_block, block = _tf_block("mixtral"), _tf_block("mixtral")
        experts = [block.experts.gate_up_proj, block.experts.down_proj]
        E = block.experts.num_experts
        others = [e for e in range(E) if e // (E // W) != rank]
        with torch.no_grad():
            for p in experts:
                p[others] = float("nan")
        x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(rank))
    else:
        ref_block = L.Block()
        block = L.Block()
        block.load_state_dict(ref_block.state_dict())
        E = len(block.experts)
        with torch.no_grad():
            for e, expert in enumerate(block.experts):
                if e // (E // W) != rank:
                    for p in expert.parameters():
                        p.fill_(float("nan"))
        x = HR.make_x(T=8, seed=rank)
    out, matches = _run(block, x)
    assert len(matches) == 1
    ref = HR.first(ref_block(x))
    torch.testing.assert_close(out, ref, **HR.tolerance(torch.float32))
    return float(out.abs().sum())


def _save_sharded(kind: str, path: str) -> None:
    """Shard the "trained" model (seed 1) and save it with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    block = _build(kind, seed=1)
    fx_passes.shard_experts(block)
    dcp.save(block.state_dict(), checkpoint_id=path)


def _load_sharded(kind: str, path: str) -> list:
    """A fresh model (seed 0) sharded over this world, loaded from ``path``: its local rows are the
    saved model's, and its compiled output equals the saved model run on one device."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    block = _build(kind, seed=0)
    fx_passes.shard_experts(block)
    state = block.state_dict()
    dcp.load(state, checkpoint_id=path)
    block.load_state_dict(state)
    trained = _build(kind, seed=1)
    want = trained.state_dict()
    for key, v in block.state_dict().items():
        if isinstance(v, DTensor):
            e_l = v.to_local().shape[0]
            torch.testing.assert_close(v.to_local(), want[key][rank * e_l : (rank + 1) * e_l])
        else:
            torch.testing.assert_close(v, want[key])
    x = _inputs(kind, rank)
    out, _ = _run(block, x)
    torch.testing.assert_close(out, HR.first(trained(x)), **HR.tolerance(torch.float32))
    return sorted(block.state_dict())


def _load_other_expert_count(path: str) -> str:
    """A model with 8 experts loading a checkpoint of 4: every rank raises, nothing is loaded."""
    import torch.distributed.checkpoint as dcp

    block = _tf_block("mixtral", num_experts=8)
    fx_passes.shard_experts(block)
    before = {
        k: v.to_local().clone() for k, v in block.state_dict().items() if isinstance(v, DTensor)
    }
    with pytest.raises(dcp.api.CheckpointException) as err:  # every rank's planner failed
        dcp.load(block.state_dict(), checkpoint_id=path)
    assert sorted(err.value.failures) == [0, 1]
    assert all("Size mismatch" in str(f) for f in err.value.failures.values())
    for k, v in block.state_dict().items():
        if isinstance(v, DTensor):
            assert torch.equal(v.to_local(), before[k])
    return type(err.value).__name__


def _build(kind: str, seed: int) -> nn.Module:
    if kind == "stacked":
        return _tf_block("mixtral", seed=seed)
    torch.manual_seed(seed)
    return L.Block()


def _inputs(kind: str, rank: int) -> torch.Tensor:
    if kind == "stacked":
        return torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(rank))
    return HR.make_x(T=8, seed=rank)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "name, dtype",
    [("mixtral", torch.float32), ("mixtral", torch.bfloat16), ("gpt_oss", torch.float32)],
)
def test_stacked_experts_sharded_equal_single_device(gloo_world, name, dtype):
    results = gloo_world(2).run(_ep_sharded_equal, name, dtype)
    full = sum(p.nbytes for n, p in _tf_block(name, dtype).named_parameters() if "experts" in n)
    for r in results:
        assert r["layouts"] == ["stacked"] and r["families"] == ["sorted"]
        assert r["bytes"] == full // 2  # each rank holds E/W of the experts


@pytest.mark.parametrize("kind", ["stacked", "module_list"])
def test_check_ignores_experts_the_rank_does_not_own(gloo_world, kind):
    sums = gloo_world(2).run(_nan_in_other_experts, kind)
    assert all(s == s for s in sums)  # no NaN reached an output


@pytest.mark.parametrize("kind", ["stacked", "module_list"])
def test_checkpoint_saved_at_2_loads_at_4_and_1(gloo_world, tmp_path, kind):
    path = str(tmp_path / "ckpt")
    gloo_world(2).run(_save_sharded, kind, path)
    keys = gloo_world(4).run(_load_sharded, kind, path)
    unsharded = _build(kind, seed=0)
    if kind == "stacked":  # DTensors: every rank has every key
        assert all(k == sorted(unsharded.state_dict()) for k in keys)
    else:  # whole experts: the ranks together hold every key, each its own experts
        assert sorted(set().union(*keys)) == sorted(unsharded.state_dict())
        assert all(len(k) < len(unsharded.state_dict()) for k in keys)
    # W = 1: the plain model, no process group
    import torch.distributed.checkpoint as dcp

    state = unsharded.state_dict()
    dcp.load(state, checkpoint_id=path)
    unsharded.load_state_dict(state)
    for key, v in _build(kind, seed=1).state_dict().items():
        torch.testing.assert_close(unsharded.state_dict()[key], v)


def test_checkpoint_of_another_expert_count_fails_on_every_rank(gloo_world, tmp_path):
    path = str(tmp_path / "ckpt")
    gloo_world(2).run(_save_sharded, "stacked", path)
    assert len(gloo_world(2).run(_load_other_expert_count, path)) == 2


def test_module_list_experts_of_other_ranks_leave_memory_and_state_dict():
    model = L.Block()
    with HR.fake_group(rank=1, world_size=2):
        shards = fx_passes.shard_experts(model)
    (s,) = shards
    assert s.layout == "module_list" and s.local_experts == range(2, 4)
    keys = list(model.state_dict())
    assert any(k.startswith("experts.2.") for k in keys)
    assert not any(k.startswith(("experts.0.", "experts.1.")) for k in keys)
    stand_ins = [
        entry[1]
        for sub in model.experts[0].modules()
        for entry in sub.__dict__.get("_moe_attrs", {}).values()
    ]
    assert len(stand_ins) == 3  # gate, up, down: one element of memory each
    assert all(t.untyped_storage().nbytes() == t.element_size() for t in stand_ins)
    assert not list(model.experts[0].parameters())


def test_nothing_to_shard_says_what_it_looked_for():
    with pytest.raises(ValueError, match="found no experts to shard in Sequential: looked for"):
        fx_passes.shard_experts(nn.Sequential(nn.Linear(4, 4)))


def test_expert_count_not_a_multiple_of_the_group():
    with (
        HR.fake_group(rank=0, world_size=3),
        pytest.raises(ValueError, match="4 experts, not a multiple"),
    ):
        fx_passes.shard_experts(_tf_block("mixtral"))


class _DenseExperts(nn.Module):
    """Every expert on every token (Llama 4 style): no routing for the pass to rewrite."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.experts_w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return torch.einsum("th,eoh->to", x, self.experts_w)


def test_unrewritten_block_reading_sharded_experts_is_an_error():
    model = _DenseExperts()
    with HR.fake_group(rank=0, world_size=2):
        fx_passes.shard_experts(model)
        backend = fx_passes.moe_backend(inner="aot_eager")
        torch._dynamo.reset()
        with pytest.raises(Exception, match="experts_w is sharded by shard_experts"):
            torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 8))


def test_backend_on_another_group_than_the_shards_is_an_error():
    block = _tf_block("mixtral")
    with HR.fake_group(rank=0, world_size=2):
        fx_passes.shard_experts(block)
        backend = fx_passes.moe_backend(group=dist.new_group([0]), inner="aot_eager")
        torch._dynamo.reset()
        with pytest.raises(Exception, match="pass the same group to shard_experts and to the"):
            torch.compile(block, backend=backend, fullgraph=True)(torch.randn(1, 3, HIDDEN))
