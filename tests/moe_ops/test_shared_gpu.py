"""The CUDA code paths at W > 1 on a single GPU: W ranks joined by gloo, tensors on GPU 0.

NCCL refuses two ranks on one device, so on a one-GPU machine these are the only runs of the
W > 1 CUDA paths with real kernels (Triton layout and row kernels, the regroup gather, the
combine-send scatter, pinned host -> device copies, the counts read on a side stream). The
bytes travel through gloo's host buffers, so nothing here says anything about speed. Marked
``gpu``; skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec, exact_capacity, fixed_case

pytestmark = pytest.mark.gpu

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32

SPECS = {
    "k2-f32": Spec(K=2, dtype=f32),
    "k4-bf16-Hp9": Spec(T=(12, 1, 7, 0), K=4, dtype=bf16, Hp=9, seed=2),
    "to_rank0-bf16": Spec(K=2, routing="to_rank0", dtype=bf16),
    "rank0_silent-f16-noweights": Spec(K=2, routing="rank0_silent", dtype=f16, weights=False),
    "T0-everywhere": Spec(T=(0,), K=2, dtype=bf16),
    "big-bf16": Spec(T=(300, 200, 0), K=4, E_l=4, H=64, Hp=32, dtype=bf16, seed=9),
}


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(shared_gpu_world, W, name):
    shared_gpu_world(W).run(_cases.dispatch_combine_equal, SPECS[name])


def test_round_trip_identity(shared_gpu_world):
    shared_gpu_world(2).run(_cases.round_trip, SPECS["k4-bf16-Hp9"])


@pytest.mark.parametrize("which", ["dispatch", "combine", "composed"])
def test_gradcheck(shared_gpu_world, which):
    for checked_rank in range(2):
        shared_gpu_world(2).run(_cases.gradcheck_case, which, 1, checked_rank)


def test_counts(shared_gpu_world):
    """K = 3 > W = 2: the rows go once per (token, rank), their slots in the same exchange."""
    want = _cases.expected_calls(2, 3)
    assert want["dispatch_a2a"] == 2
    got = shared_gpu_world(2).run(_cases.count_calls, Spec(T=(8, 6), K=3, dtype=bf16))
    assert got == [want, want]


@pytest.mark.parametrize("kind", ["id_too_big", "float_ids", "T_mismatch"])
def test_dispatch_one_bad_rank(shared_gpu_world, kind):
    shared_gpu_world(2).run(_cases.one_bad_rank_dispatch, 1, kind)


def test_combine_one_bad_rank_gives_nan_rows(shared_gpu_world):
    shared_gpu_world(2).run(_cases.one_bad_rank_combine_nan, 0)


@pytest.mark.parametrize("drop", [False, True])
def test_capacity_padded_transport(shared_gpu_world, drop):
    spec = Spec(T=(300,), K=4, E_l=4, H=64, Hp=32, dtype=bf16, seed=9)
    capacity = exact_capacity(spec, 2) - (20 if drop else 0)
    dropped = shared_gpu_world(2).run(fixed_case, spec, capacity, drop, "padded")
    assert (sum(dropped) >= 20) if drop else dropped == [0, 0]
