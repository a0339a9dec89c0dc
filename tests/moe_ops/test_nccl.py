"""The distributed case bodies on GPUs with NCCL (marked ``gpu``; skip, saying why, with no GPU).

Two ways to run them:

* ``pytest tests/moe_ops/test_nccl.py -m gpu`` spawns NCCL worlds of 1, 2 and 4 processes, one
  GPU each (a test for W ranks skips, saying why, with fewer than W GPUs);
* ``torchrun --nproc-per-node 4 -m pytest tests/moe_ops/test_nccl.py -p no:cacheprovider``
  (or ``--nproc-per-node 2``, or 1 for the single-GPU path with NCCL initialised) runs them in the
  launched processes; tests written for another W skip.
"""

from __future__ import annotations

import pytest
import torch

from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

pytestmark = pytest.mark.gpu

WORLDS = [1, 2, 4]

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32

SPECS = {
    "k2-f32": Spec(K=2, dtype=f32),
    "k2-bf16": Spec(K=2, dtype=bf16),
    "k1-1d-f32": Spec(K=1, one_d=True),
    "k4-bf16-Hp9": Spec(T=(12, 1, 7, 0), K=4, dtype=bf16, Hp=9, seed=2),
    "to_rank0-bf16": Spec(K=2, routing="to_rank0", dtype=bf16),
    "rank0_silent-f16-noweights": Spec(K=2, routing="rank0_silent", dtype=f16, weights=False),
    "all_unused-bf16": Spec(K=2, routing="all_unused", dtype=bf16),
    "T0-everywhere": Spec(T=(0,), K=2, dtype=bf16),
    "big-bf16": Spec(T=(300, 200), K=4, E_l=4, H=64, Hp=32, dtype=bf16, seed=9),
}


@pytest.mark.parametrize("W", WORLDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(nccl_world, W, name):
    nccl_world(W).run(_cases.dispatch_combine_equal, SPECS[name])


@pytest.mark.parametrize("W", WORLDS)
@pytest.mark.parametrize("name", ["k2-f32", "k2-bf16", "k1-1d-f32"])
def test_round_trip_identity(nccl_world, W, name):
    nccl_world(W).run(_cases.round_trip, SPECS[name])


@pytest.mark.parametrize("W", WORLDS)
def test_counts(nccl_world, W):
    spec = Spec(T=(8, 6), K=3, dtype=bf16)
    for counts in nccl_world(W).run(_cases.count_calls, spec):
        assert counts == _cases.expected_calls(W, spec.K)


@pytest.mark.parametrize("W", WORLDS)
@pytest.mark.parametrize("which", ["dispatch", "combine", "composed"])
def test_gradcheck(nccl_world, W, which):
    for checked_rank in range(W):
        nccl_world(W).run(_cases.gradcheck_case, which, 1, checked_rank)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("kind", ["id_too_big", "float_ids", "T_mismatch", "meta_idx"])
def test_dispatch_one_bad_rank(nccl_world, W, kind):
    names = nccl_world(W).run(_cases.one_bad_rank_dispatch, W - 1, kind)
    assert all(name == "PeerInputError" for name in names[: W - 1]), names


# W = 2 only: the case's inputs give every rank of a 2-rank world tokens with and without a pair
# for the bad rank, which the case asserts (at W = 4 one rank has none).
def test_combine_one_bad_rank_gives_nan_rows(nccl_world):
    nccl_world(2).run(_cases.one_bad_rank_combine_nan, 0)


PER_RANK_SPECS = {
    "k4-bf16-Hp9": SPECS["k4-bf16-Hp9"],
    "big-k8-bf16": Spec(T=(300, 200), K=8, E_l=4, H=64, Hp=32, dtype=bf16, seed=9),
    "k6-f32-noweights": Spec(T=(9, 4, 0, 5), K=6, E_l=2, weights=False, seed=8),
    "T0-everywhere-k5": Spec(T=(0,), K=5, dtype=bf16),
}


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("name", list(PER_RANK_SPECS))
def test_sum_per_rank(nccl_world, W, name):
    """``sum_per_rank=True`` (Triton kernels, NCCL) against the reference, within rounding."""
    nccl_world(W).run(_cases.per_rank_sums, PER_RANK_SPECS[name])


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("name", ["big-k8-bf16", "k6-f32-noweights"])
def test_sum_per_rank_in_rounds(nccl_world, W, name):
    """The partial sums back in rounds of tokens (forced), against the reference, and bit for
    bit equal to one exchange (K = 8: W rounds; a rank without tokens has one)."""
    spec = PER_RANK_SPECS[name]
    nccl_world(W).run(_cases.in_rounds, _cases.per_rank_sums, spec)
    if spec.weights:
        assert nccl_world(W).run(_cases.rounds_equal_one_exchange, spec) == [W] * W
