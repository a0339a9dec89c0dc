"""``moe_ops.chunked_moe``: micro-batched dispatch/experts/combine equals the unchunked one.

On the CPU nothing overlaps (gloo is synchronous) but every micro-batch goes through the same ops
and collectives as on GPUs; the CUDA stream logic runs in ``test_nccl.py`` and
``test_shared_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import moe_ops
from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

SPECS = {
    "k2-f32": Spec(T=(7, 3, 0, 5), K=2, dtype=torch.float32),
    "k4-bf16-Hp9": Spec(T=(12, 1, 7, 0), K=4, dtype=torch.bfloat16, Hp=9, seed=2),
    "k1-1d-f64-noweights": Spec(T=(5, 9), K=1, one_d=True, dtype=torch.float64, weights=False),
    "skewed-f32": Spec(T=(16, 11), K=2, routing="skewed", seed=4),
}


@pytest.mark.parametrize("chunks", [1, 2, 3, 8])
@pytest.mark.parametrize("name", list(SPECS))
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


@pytest.mark.parametrize(
    "chunks, err, match",
    [
        (0, ValueError, "chunks must be an int >= 1, got 0"),
        (True, ValueError, "chunks must be an int >= 1, got True"),
        (2.0, ValueError, "chunks must be an int >= 1, got 2.0"),
    ],
)
def test_bad_chunks(chunks, err, match):
    x, idx = torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64)
    with pytest.raises(err, match=match):
        moe_ops.chunked_moe(x, idx, None, 2, lambda r, n: r, chunks=chunks)


def test_experts_not_callable():
    x, idx = torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64)
    with pytest.raises(TypeError, match="experts must be callable"):
        moe_ops.chunked_moe(x, idx, None, 2, "mlp")


def test_bad_dispatch_input_raises_the_dispatch_error():
    x, idx = torch.randn(4, 3), torch.full((4, 2), 7)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 2\)"):
        moe_ops.chunked_moe(x, idx, None, 2, lambda r, n: r)


def test_under_torch_compile_is_a_graph_break():
    x = torch.randn(6, 4)
    idx = torch.tensor([[0, 1], [1, -1], [0, 0], [1, 1], [-1, -1], [0, 1]])
    w = torch.rand(6, 2)

    def f(x):
        return moe_ops.chunked_moe(torch.sin(x), idx, w, 2, lambda r, n: r * 3, chunks=2) + 1

    want = f(x)
    got = torch.compile(f, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
