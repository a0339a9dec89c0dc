"""``moe_ops._pipeline.chunked_moe`` (the overlap experiment): micro-batched dispatch/experts/
combine equals the unchunked one, bad input raises on every rank, and on CUDA the experts wait for
the side stream.

On the CPU nothing overlaps (gloo is synchronous) but every micro-batch goes through the same ops
and collectives as on GPUs; the CUDA stream logic runs in the ``gpu`` tests here, in
``test_nccl.py`` and in ``test_shared_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from moe_ops._pipeline import chunked_moe
from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

SPECS = {
    "k2-f32": Spec(T=(7, 3, 0, 5), K=2, dtype=torch.float32),
    "k4-bf16-Hp9": Spec(T=(12, 1, 7, 0), K=4, dtype=torch.bfloat16, Hp=9, seed=2),
    "k1-1d-f64-noweights": Spec(T=(5, 9), K=1, one_d=True, dtype=torch.float64, weights=False),
    "skewed-f32": Spec(T=(16, 11), K=2, routing="skewed", seed=4),
    "big-bf16": Spec(T=(300, 200), K=4, E_l=4, H=64, Hp=32, dtype=torch.bfloat16, seed=9),
}


@pytest.mark.parametrize("chunks", [1, 2, 3, 8])
@pytest.mark.parametrize("name", list(SPECS)[:4])
def test_single_rank(name, chunks):
    _cases.chunked_equal(SPECS[name], chunks)


@pytest.mark.parametrize("W,chunks", [(2, 2), (2, 5), (3, 2)])
@pytest.mark.parametrize("name", ["k2-f32", "k4-bf16-Hp9", "k1-1d-f64-noweights"])
def test_gloo(gloo_world, W, chunks, name):
    gloo_world(W).run(_cases.chunked_equal, SPECS[name], chunks)


@pytest.mark.parametrize("chunks", [1, 3])
def test_counts(gloo_world, chunks):
    got = gloo_world(2).run(_cases.chunked_counts, Spec(T=(8, 6), K=3), chunks)
    want = dict(fwd_a2a=3 * chunks, fwd_sync=chunks, bwd_a2a=2 * chunks, bwd_sync=0)
    assert got == [want, want]


def test_counts_single_rank():
    got = _cases.chunked_counts(Spec(T=(8,), K=3), 4)
    assert got == dict(fwd_a2a=0, fwd_sync=4, bwd_a2a=0, bwd_sync=0)


@pytest.mark.parametrize("kind", ["T_mismatch", "w_shape", "w_int"])
def test_one_bad_rank_gloo(gloo_world, kind):
    got = gloo_world(2).run(_cases.chunked_one_bad_rank, 1, kind)
    assert got[0] == "PeerInputError"


def _inputs(T=6):
    x = torch.randn(T, 3)
    idx = torch.tensor([[0, 1], [1, -1], [0, 0], [1, 1], [-1, -1], [0, 1]])[:T]
    return x, idx, torch.rand(T, 2)


@pytest.mark.parametrize(
    "chunks, err, match",
    [
        (0, ValueError, "chunks must be an int >= 1, got 0"),
        (True, ValueError, "chunks must be an int >= 1, got True"),
        (2.0, ValueError, "chunks must be an int >= 1, got 2.0"),
    ],
)
def test_bad_chunks(chunks, err, match):
    x, idx, _ = _inputs()
    with pytest.raises(err, match=match):
        chunked_moe(x, idx, None, 2, lambda r, n: r, chunks=chunks)


def test_bad_inputs_single_rank():
    x, idx, w = _inputs()
    experts = lambda r, n: r  # noqa: E731
    with pytest.raises(TypeError, match="experts must be callable"):
        chunked_moe(x, idx, w, 2, "mlp")
    with pytest.raises(ValueError, match="topk_idx has 6 rows but x has 5 tokens"):
        chunked_moe(x[:5], idx, w, 2, experts, chunks=4)
    with pytest.raises(ValueError, match=r"topk_weights must match topk_idx \(\[6, 2\]"):
        chunked_moe(x, idx, w[:5], 2, experts, chunks=4)
    with pytest.raises(TypeError, match="topk_weights must be a floating-point Tensor"):
        chunked_moe(x, idx, w.long(), 2, experts)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 2\)"):
        chunked_moe(x, idx + 5, w, 2, experts)


def test_under_torch_compile_is_a_graph_break():
    x, idx, w = _inputs()

    def f(x):
        return chunked_moe(torch.sin(x), idx, w, 2, lambda r, n: r * 3, chunks=2) + 1

    want = f(x)
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x).graph_break_count >= 1
    got = torch.compile(f, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunks", [2, 4])
@pytest.mark.parametrize("name", ["k2-f32", "big-bf16"])
def test_cuda_experts_wait_for_the_side_stream(name, chunks):
    _cases.chunked_waits_for_the_side_stream(SPECS[name], chunks, "cuda")
