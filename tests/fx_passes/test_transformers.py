"""Real transformers 5 MoE blocks (small configs, random weights) rewritten and equal to eager.

``experts_implementation="grouped_mm"`` (family D: ``grouped_mm_fallback`` in fp32,
``torch._grouped_mm`` in bf16) and ``"batched_mm"`` (family B), for several model families,
forward and gradients through the "moe" backend with aot_eager.
"""

from __future__ import annotations

import pytest
import torch

import fx_passes
from tests.fx_passes._harness import capture, first, normalized_code, tolerance

transformers = pytest.importorskip("transformers")

HIDDEN = 64
_DEEPSEEK = dict(
    n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1,
    first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
)  # fmt: skip
_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=32), "mlp"),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48),
        "mlp",
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, intermediate_size=32), "mlp"),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(num_local_experts=4, intermediate_size=32),
        "block_sparse_moe",
    ),
    "deepseek_v3": ("DeepseekV3Config", _DEEPSEEK, "mlp"),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, intermediate_size=32), "mlp"),
}


def _block(name: str, impl: str, dtype: torch.dtype):
    cls, kw, sub = _CONFIGS[name]
    cfg = getattr(transformers, cls)(
        hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=32, num_experts_per_tok=2, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation=impl, dtype=dtype
    )
    return model.model.layers[0].get_submodule(sub)


@pytest.mark.parametrize(
    "name, impl, dtype",
    [
        ("mixtral", "grouped_mm", torch.float32),
        ("mixtral", "grouped_mm", torch.bfloat16),
        ("qwen2_moe", "grouped_mm", torch.float32),
        ("olmoe", "grouped_mm", torch.bfloat16),
        ("granitemoe", "grouped_mm", torch.float32),
        ("deepseek_v3", "grouped_mm", torch.float32),
        ("gpt_oss", "grouped_mm", torch.float32),
        ("gpt_oss", "grouped_mm", torch.bfloat16),
        ("mixtral", "batched_mm", torch.float32),
        ("qwen2_moe", "batched_mm", torch.bfloat16),
        ("gpt_oss", "batched_mm", torch.float32),
    ],
)
def test_block_rewritten_and_equal(name, impl, dtype):
    block = _block(name, impl, dtype)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = first(block(x1))
    backend = fx_passes.moe_backend(inner="aot_eager", strict=True)
    torch._dynamo.reset()
    out = first(torch.compile(block, backend=backend, fullgraph=True)(x2))
    family = "sorted" if impl == "grouped_mm" else "batched"
    assert [m.family for m in backend.matches] == [family]
    tol = tolerance(dtype)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    params = [p for p in block.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, [x2, *params], g, allow_unused=True)
    want = torch.autograd.grad(ref, [x1, *params], g, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, **tol)


def test_grouped_mm_graph_names_the_ops():
    """fp32 keeps transformers' grouped_mm_fallback on the local experts; no sort is left."""
    block = _block("mixtral", "grouped_mm", torch.float32)
    _, graphs, matches, _ = capture(block, torch.randn(2, 5, HIDDEN))
    code = normalized_code(graphs[0])
    assert len(matches) == 1
    assert "torch.sort" not in code and "histc" not in code
    assert code.count("moe_ops.dispatch") == 1 and code.count("moe_ops.combine") == 1
    assert code.count("transformers.grouped_mm_fallback") == 2
