"""A whole rewritten block in CUDA graphs at W = 2 with NCCL: ``moe_backend(capacity=
"worst-case", mode="reduce-overhead")`` on a sharded transformers 5 block (top-2, and top-4
with ``sum_per_rank=True``: token rows, sums per rank), replayed on new routing and compared with
the single-device block in eager. Marked ``gpu``; needs 2 GPUs."""

from __future__ import annotations

import pytest
import torch

import fx_passes

pytestmark = pytest.mark.gpu

_TOL = dict(atol=3e-2, rtol=3e-2)


def _qwen3_block(top_k: int = 2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64, num_experts=8, num_experts_per_tok=top_k, moe_intermediate_size=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="grouped_mm", dtype=torch.bfloat16
    )
    return model.model.layers[0].mlp.cuda()


def _graph_replays_equal_eager(
    steps: int, sum_per_rank: bool = False, transport: str | None = None
) -> bool:
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    rank = dist.get_rank()
    top_k = 4 if sum_per_rank else 2
    ref_block, block = _qwen3_block(top_k), _qwen3_block(top_k)
    fx_passes.shard_experts(block)
    backend = fx_passes.moe_backend(
        strict=True,
        capacity="worst-case",
        mode="reduce-overhead",
        sum_per_rank=sum_per_rank,
        transport=transport,
    )
    torch._dynamo.reset()
    cudagraph_trees.reset_cudagraph_trees()
    skips = counters["inductor"]["cudagraph_skips"]
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    for step in range(steps):  # warm-up, recording, then replays on new routing
        gen = torch.Generator(device="cuda").manual_seed(100 * step + rank)
        x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
        x_ep, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.compiler.cudagraph_mark_step_begin()
        block.zero_grad(set_to_none=True)  # gradients of a replay live in the graph's memory
        out = compiled(x_ep)
        out.float().square().sum().backward()
        got = (out.detach().clone(), x_ep.grad.clone())
        ref = ref_block(x_ref)
        ref.float().square().sum().backward()
        torch.testing.assert_close(got[0], ref, **_TOL)
        torch.testing.assert_close(got[1], x_ref.grad, **_TOL)
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"
    assert len(backend.matches) == 1
    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    return manager is not None and any(manager.roots.values())


@pytest.mark.parametrize(
    ("sum_per_rank", "transport"),
    [(False, None), (True, None), (True, "p2p")],
    ids=["slot_order", "sum_per_rank", "sum_per_rank-p2p"],
)
def test_sharded_block_in_cuda_graphs_at_w2_nccl(nccl_world, sum_per_rank, transport):
    recorded = nccl_world(2).run(_graph_replays_equal_eager, 4, sum_per_rank, transport)
    assert all(recorded), "no CUDA graph was recorded"
