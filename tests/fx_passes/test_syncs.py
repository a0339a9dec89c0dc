"""One device -> host sync per rewritten block forward on CUDA: dispatch's read of the row counts.

Expert bodies that run per-expert segments (fp32 here, where no grouped GEMM applies) size their
splits from ``tokens_per_expert_host``, the counts that read already brought to the host, instead
of reading the device counts again. Marked ``gpu``; skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import fx_passes
from tests.fx_passes import _loop_models as L
from tests.fx_passes import _sorted_models as S
from tests.moe_ops._cases import cuda_syncs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODELS = {
    "A-modulelist-segments": lambda: L.Block("onehot_where"),
    "D-granite-split-loop": lambda: S.GraniteStyle(),
    "D-titan-split-loop": lambda: S.TitanStyle(),
    "B-batched-mm-fallback": lambda: S.BatchedStyle(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_sync_per_block_forward(name):
    torch.manual_seed(0)
    model = MODELS[name]().cuda()
    x = torch.randn(32, S.H, device="cuda")
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(
        capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True
    ):
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        compiled(x)  # compile outside the count
        got, syncs = cuda_syncs(lambda: compiled(x))
    assert len(backend.matches) == 1
    assert backend.matches[0].rewritten.get("experts") != "grouped_mm"
    assert len(syncs) == 1, syncs
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- W = 2, NCCL
def _tf_block_cuda(name: str) -> torch.nn.Module:
    """A transformers 5 MoE block (grouped_mm experts, bf16, realistic widths), E = 8, top-2."""
    transformers = pytest.importorskip("transformers")
    configs = {
        "mixtral": (transformers.MixtralConfig, dict(num_local_experts=8, intermediate_size=512)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=8, moe_intermediate_size=512)),
        "gpt_oss": (transformers.GptOssConfig, dict(num_local_experts=8, intermediate_size=512)),
        "deepseek_v3": (
            transformers.DeepseekV3Config,
            dict(n_routed_experts=8, moe_intermediate_size=512, n_group=2, topk_group=1,
                 first_k_dense_replace=0, n_shared_experts=1),
        ),
    }  # fmt: skip
    cls, kw = configs[name]
    cfg = cls(
        hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=64, num_experts_per_tok=2, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="grouped_mm", dtype=torch.bfloat16
    )
    return model.model.layers[0].mlp.cuda().train()


def _count_block_syncs(name: str) -> dict[str, list[str]]:
    import torch.distributed as dist

    block = _tf_block_cuda(name)
    fx_passes.shard_experts(block)
    rank = dist.get_rank()
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    x = x + rank  # each rank its own tokens
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, fullgraph=True)

    def fwd():
        out = compiled(x.clone().requires_grad_(True))
        return out[0] if isinstance(out, tuple) else out

    fwd().float().sum().backward()  # compile outside the count
    dist.barrier()
    out, fwd_syncs = cuda_syncs(fwd)
    loss = out.float().sum()
    torch.cuda.synchronize()
    _, bwd_syncs = cuda_syncs(loss.backward)
    assert len(backend.matches) == 1
    return {"forward": fwd_syncs, "backward": bwd_syncs}


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_real_block_syncs_once_forward_never_backward_nccl(nccl_world, name):
    """A sharded transformers 5 block at W = 2 with NCCL, training mode: the forward syncs once
    (dispatch reads the row counts), the backward never."""
    for counts in nccl_world(2).run(_count_block_syncs, name):
        assert len(counts["forward"]) == 1, counts
        assert counts["backward"] == [], counts
