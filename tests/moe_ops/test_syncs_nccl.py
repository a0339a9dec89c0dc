"""Host syncs per call, measured: one in default-mode dispatch, none in combine, none in either
backward, none at all in capacity mode, at every W.

GPU (NCCL, marked ``gpu``): syncs are counted as the warnings of
``torch.cuda.set_sync_debug_mode("warn")`` (every device -> host read, stream/device
synchronization and copy from pageable host memory warns), with the Triton kernels and with the
plain torch path. Run with ``pytest tests/moe_ops/test_syncs_nccl.py -m gpu`` (spawns worlds of 1,
2 and 4 ranks; a test skips, saying why, with fewer GPUs) or under
``torchrun --nproc-per-node 2 -m pytest tests/moe_ops/test_syncs_nccl.py -p no:cacheprovider``
(or 4; tests for another W skip).

CPU (gloo): there is no device to sync with, so these count what would be one: reads of tensor
values on the host (``item``, ``tolist``, ``cpu``, ``bool()``, ``int()``...) made inside the ops
(``torch.Tensor``'s methods are wrapped, which, unlike a ``TorchFunctionMode``, also sees the
ops' own bodies), except reads of the CPU split tensors that dispatch's one sync produced.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import moe_ops
from moe_ops import _capacity_ops, _comm, _ops
from tests._dist import device, under_torchrun
from tests.moe_ops._cases import (
    Spec,
    cuda_syncs,
    forced_pair_rounds,
    make_inputs,
    rank_and_world,
    triton_kernels,
)

bf16 = torch.bfloat16
_SPEC = Spec(T=(40, 24, 33, 0), K=4, E_l=3, H=32, dtype=bf16, seed=5)
# The capacity mode at W > 1 with C > T * K (worst case) needs the same T on every rank.
_EQUAL_T = Spec(T=(32,), K=4, E_l=3, H=32, dtype=bf16, seed=6)


_MODES = ["default", "capacity", "per_rank", "rounds", "pair_rounds"]


def _capacity_kwargs(mode: str) -> dict:
    if mode == "capacity":
        return dict(capacity="worst-case")
    return dict(sum_per_rank=True) if mode in ("per_rank", "rounds") else {}


def _rounds(mode: str):
    """``mode="rounds"``: combine sums per rank in rounds of tokens, forced for small payloads;
    ``"pair_rounds"``: the default mode's rows come back in rounds (``low_memory``, three),
    forced too."""
    if mode == "rounds":
        return mock.patch.object(_ops, "_rounds", lambda T, row_bytes, W: W if T else 1)
    if mode == "pair_rounds":
        return forced_pair_rounds(3)
    return contextlib.nullcontext()


def _one_round(x, idx, w, g, E: int, kwargs: dict) -> dict[str, int]:
    (recv_x, handle), s_d = cuda_syncs(lambda: moe_ops.dispatch(x, idx, E, **kwargs))
    eo = (recv_x.detach() * 2 + 0.5).requires_grad_(True)  # elementwise: needs no sizes
    out, s_c = cuda_syncs(lambda: moe_ops.combine(eo, handle, w))
    (g_eo, g_w), s_cb = cuda_syncs(lambda: torch.autograd.grad(out, (eo, w), g))
    (g_x,), s_db = cuda_syncs(lambda: torch.autograd.grad(recv_x, x, g_eo))
    assert g_x.shape == x.shape and g_w.shape == w.shape
    return dict(dispatch=len(s_d), combine=len(s_c), combine_bwd=len(s_cb), dispatch_bwd=len(s_db))


def count_syncs_case(spec: Spec, mode: str, triton: bool) -> dict[str, int]:
    """Syncs of dispatch forward, combine forward, combine backward and dispatch backward."""
    r, W = rank_and_world()
    dev = device()
    inp = make_inputs(spec, W)
    kwargs = _capacity_kwargs(mode)
    x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
    w = inp.ws[r].to(dev, copy=True).requires_grad_(True)
    idx = inp.idxs[r].to(dev)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(r)).to(dev, spec.dtype)
    with triton_kernels(triton), _rounds(mode):
        _one_round(x, idx, w, g, inp.num_experts, kwargs)  # warm-up: compiles, communicators
        return _one_round(x, idx, w, g, inp.num_experts, kwargs)


def _want(mode: str) -> dict[str, int]:
    syncs = 0 if mode == "capacity" else 1
    return dict(dispatch=syncs, combine=0, combine_bwd=0, dispatch_bwd=0)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_syncs_nccl(nccl_world, W, mode, triton):
    spec = _EQUAL_T if mode == "capacity" else _SPEC
    got = nccl_world(W).run(count_syncs_case, spec, mode, triton)
    assert got == [_want(mode)] * W


# ----------------------------------------------------------------------------- CPU
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _record_reads():
    """Wraps ``torch.Tensor``'s value-reading methods; yields the list of (name, storage ptr)."""
    seen: list[tuple[str, int]] = []

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def reading(self, *args, **kwargs):
            seen.append((name, self.untyped_storage().data_ptr()))
            return orig(self, *args, **kwargs)

        return reading

    with contextlib.ExitStack() as stack:
        for name in _READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, wrap(name)))
        yield seen


def host_reads_case(spec: Spec, mode: str) -> dict[str, int]:
    """On gloo: host reads of tensor values in dispatch, and (excluding the handle's CPU split
    tensors) in combine and the backwards. The CPU-only stand-ins of checks that CUDA makes on
    the device (peers' status rows, capacity-mode flags) are patched out."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    E = inp.num_experts
    kwargs = _capacity_kwargs(mode)
    x = inp.xs[r].clone().requires_grad_(True)
    w = inp.ws[r].clone().requires_grad_(True)
    cpu_only = mock.patch.object(_comm, "peer_status", return_value=[0] * W)
    cpu_flags = mock.patch.object(_capacity_ops, "_raise_on_cpu")
    sync = mock.patch.object(_comm, "read_to_host", wraps=_comm.read_to_host)
    with cpu_only, cpu_flags, sync as sync_mock, _rounds(mode):
        with _record_reads() as seen:
            recv_x, handle = moe_ops.dispatch(x, inp.idxs[r], E, **kwargs)
        n_dispatch = len(seen)
        host = {
            t.untyped_storage().data_ptr()
            for t in (
                getattr(handle.layout, "send_splits", None),  # default mode only
                getattr(handle.layout, "recv_splits", None),
                getattr(handle.layout, "token_send_splits", None),
                getattr(handle.layout, "token_recv_splits", None),
                getattr(handle.layout, "round_splits", None),
                handle.tokens_per_expert_host,
            )
            if t is not None and t.numel() > 0
        }
        eo = (recv_x * 2).detach().requires_grad_(True)
        with _record_reads() as seen:
            out = moe_ops.combine(eo, handle, w)
        combine = [n for n, ptr in seen if ptr not in host]
        with _record_reads() as seen:
            g_eo, g_w = torch.autograd.grad(out, (eo, w), torch.ones_like(out))
            (g_x,) = torch.autograd.grad(recv_x, x, g_eo)
        backward = [n for n, ptr in seen if ptr not in host]
    assert g_x.shape == x.shape and g_w.shape == w.shape
    return dict(
        dispatch_reads=n_dispatch,
        read_to_host=sync_mock.call_count,
        combine_reads=len(combine),
        backward_reads=len(backward),
    )


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("mode", _MODES)
def test_host_reads_gloo(gloo_world, W, mode):
    spec = Spec(T=(9,), K=3, E_l=2, H=6, Hp=6, seed=7)
    for got in gloo_world(W).run(host_reads_case, spec, mode):
        if mode != "capacity":
            # dispatch reads the counts it synced for (so the recorder works inside the ops)
            assert got["read_to_host"] == 1 and got["dispatch_reads"] > 0, got
        else:
            assert got["read_to_host"] == 0 and got["dispatch_reads"] == 0, got
        assert got["combine_reads"] == 0 and got["backward_reads"] == 0, got


def test_host_reads_single_rank():
    if under_torchrun():
        pytest.skip("single-process test: not under torchrun")
    spec = Spec(T=(9,), K=3, E_l=2, H=6, Hp=6, seed=7)
    for mode in ("default", "capacity"):
        got = host_reads_case(spec, mode)
        assert got["combine_reads"] == 0 and got["backward_reads"] == 0, (mode, got)
        assert got["read_to_host"] == (1 if mode == "default" else 0), (mode, got)
