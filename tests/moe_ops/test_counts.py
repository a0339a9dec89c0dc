"""Pinned costs: collectives and host syncs per call, no [T, K, H]-sized intermediate, and no
payload-sized zero fill in the backward.

Collectives are counted by wrapping ``moe_ops._comm.all_to_all`` (the only collective
``moe_ops._comm`` issues), host syncs by wrapping ``moe_ops._comm.read_to_host``.
"""

from __future__ import annotations

import pytest

from tests.moe_ops import _cases
from tests.moe_ops._cases import Spec

_SPEC = Spec(T=(8, 6, 5), K=3, E_l=2, H=6, Hp=6, seed=11)
_BIG = Spec(T=(8, 8), K=4, E_l=2, H=16, Hp=16, unused=0.4, seed=2)


def test_counts_single_rank():
    assert _cases.count_calls(_SPEC) == _cases.expected_calls(1, _SPEC.K)


@pytest.mark.parametrize("W", [2, 3])
def test_counts_distributed(gloo_world, W):
    """K = 3 > W = 2: the rows go once per (token, rank), with their slots in the same exchange;
    K = W = 3: once per (token, slot)."""
    for counts in gloo_world(W).run(_cases.count_calls, _SPEC):
        assert counts == _cases.expected_calls(W, _SPEC.K)


def _check_no_big_intermediate(found: dict) -> None:
    TK, H = found["TK"], found["H"]
    # The send/receive buffers ([N (+W), H], [R (+W), H]) are allowed; the routing leaves enough
    # unused slots that they stay below T * K rows, so only a [T, K, H]-sized temporary reaches it.
    assert max(found["N"], found["R"]) + 2 < TK, found
    assert found["calls"] > 20, found
    assert found["big"][1] < TK * H, found


def test_no_tkh_intermediate_single_rank():
    _check_no_big_intermediate(_cases.largest_intermediates(_BIG))


def test_no_tkh_intermediate_distributed(gloo_world):
    for found in gloo_world(2).run(_cases.largest_intermediates, _BIG):
        _check_no_big_intermediate(found)


@pytest.mark.parametrize("W", [1, 2])
def test_backward_fills_no_payload_sized_zeros(gloo_world, W):
    """No payload-sized zero gradient is made for combine's second output (the rows that came
    back), which no loss reads."""
    results = gloo_world(W).run(_cases.zero_fills, _BIG) if W > 1 else [_cases.zero_fills(_BIG)]
    for found in results:
        assert found["payload"] > 0, found
        assert all(n < found["payload"] for _, n in found["fills"]), found
