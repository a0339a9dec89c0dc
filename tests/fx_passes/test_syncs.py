"""One device -> host sync per rewritten block forward on CUDA: dispatch's read of the row counts.

Expert bodies that run per-expert segments (fp32 here, where no grouped GEMM applies) size their
splits from ``tokens_per_expert_host``, the counts that read already brought to the host, instead
of reading the device counts again. Marked ``gpu``; skips without CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fx_passes
from tests.fx_passes import _loop_models as L
from tests.fx_passes import _sorted_models as S

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


def _syncs(fn) -> tuple[list[str], object]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]
    return msgs, out


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
        syncs, got = _syncs(lambda: compiled(x))
    assert len(backend.matches) == 1
    assert backend.matches[0].rewritten.get("experts") != "grouped_mm"
    assert len(syncs) == 1, syncs
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-4)
