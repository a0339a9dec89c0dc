"""The capacity mode captured in a ``torch.cuda.CUDAGraph`` at W > 1 (NCCL), replayed with new
routing.

Every rank builds static inputs, warms up, captures dispatch + experts + combine (forward only,
and forward + backward through ``torch.autograd.grad``) with ``torch.cuda.set_sync_debug_mode(
"error")`` on during the capture, then for several new input sets copies x, topk_idx, the weights
and the output gradient into the static inputs, replays, and compares the static outputs with:

* the same layer run eagerly in capacity mode (bit for bit, forward and gradients);
* with ``capacity="worst-case"`` (nothing dropped): eager default mode (bit for bit forward,
  gradients to rounding) and ``moe_ops.reference`` over every rank's inputs;
* with ``overflow="drop"`` at a small capacity: ``num_dropped`` of the eager run.

The transports that run at W > 1 ("padded", "p2p"; "nvshmem" where this torch has NVSHMEM), with the
Triton kernels and with the plain torch path.

Run (marked ``gpu``; each test skips, saying why, with fewer than W GPUs):

* ``pytest tests/moe_ops/test_cuda_graphs.py -m gpu`` spawns NCCL worlds of 2 and 4 ranks;
* ``torchrun --nproc-per-node 2 -m pytest tests/moe_ops/test_cuda_graphs.py -p no:cacheprovider``
  (or ``--nproc-per-node 4``) runs them in the launched processes; tests for another W skip.

On the CPU the same case body runs on a gloo world with the graph replaced by an eager re-run
(``_EagerReplay``): that checks the case's own logic and the capacity path at W > 1, not capture.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_ops
from moe_ops import _comm
from moe_ops.reference import reference_combine, reference_dispatch
from tests._dist import device
from tests.moe_ops._cases import (
    Spec,
    _bwd_tol,
    _sum_tol,
    make_inputs,
    rank_and_world,
    triton_kernels,
)

f32, bf16 = torch.float32, torch.bfloat16


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    T: int = 48  # tokens per rank, the same on every rank (worst-case capacity needs it)
    K: int = 4
    E_l: int = 3
    H: int = 32
    dtype: torch.dtype = bf16
    capacity: str = "worst-case"  # or "drop": capacity T * K // 2 with overflow="drop"
    transport: str = "padded"
    triton: bool = True
    backward: bool = True
    seeds: tuple[int, ...] = (11, 12, 13)  # one replay per seed, new routing each time
    capture_seed: int = 10
    sum_per_rank: bool = False  # then the default mode and the reference agree within rounding


def _scales(W: int, E_l: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """``[W, E_l + 1, H]``: rank r's experts scale their rows by ``scales[r, e]`` (row ``E_l`` is
    for capacity mode's padding rows, never read back); multiples of 1/4, exact in bf16."""
    return ((torch.arange(W * (E_l + 1) * H) % 7 + 2) / 4).view(W, E_l + 1, H).to(dtype)


def _experts(recv_x: torch.Tensor, tokens_per_expert: torch.Tensor, scale: torch.Tensor):
    """Elementwise stand-in experts: ``row * scale[its expert] + 0.5``. Capture-safe (sizes from
    shapes only) and rounds the same on CPU and GPU (products of bf16 values are exact in f32)."""
    rows = recv_x.shape[0]
    pad = (rows - tokens_per_expert.sum()).view(1)  # capacity mode's padding rows; 0 otherwise
    group = torch.repeat_interleave(
        torch.arange(scale.shape[0], device=recv_x.device),
        torch.cat([tokens_per_expert, pad]),
        output_size=rows,
    )
    return recv_x * scale.index_select(0, group) + 0.5


def _capacity_args(gs: GraphSpec) -> dict:
    if gs.capacity == "worst-case":
        return dict(capacity="worst-case", overflow="error")
    return dict(capacity=gs.T * gs.K // 2, overflow="drop")


def _layer(x, idx, w, E, scale, kwargs):
    recv_x, handle = moe_ops.dispatch(x, idx, E, **kwargs)
    out = moe_ops.combine(_experts(recv_x, handle.tokens_per_expert, scale), handle, w)
    return out, recv_x, handle


class _EagerReplay:
    """The CPU stand-in for a CUDA graph: ``replay()`` runs ``fn`` again and copies its results
    into the tensors the first run returned (as a graph replay overwrites its static outputs)."""

    def __init__(self, fn):
        self.fn = fn
        self.out = fn()

    def replay(self) -> None:
        new = self.fn()
        with torch.no_grad():
            for static, fresh in zip(self.out, new, strict=True):
                static.copy_(fresh)


def _capture(fn, dev: torch.device):
    """``(graph, static outputs)``: warm-up on a side stream (Triton compiles, NCCL
    communicators, symmetric buffers), then one capture with sync debug mode "error"."""
    if dev.type != "cuda":
        stand_in = _EagerReplay(fn)
        return stand_in, stand_in.out
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return graph, out


def _inputs(gs: GraphSpec, W: int, seed: int):
    spec = Spec(T=(gs.T,), K=gs.K, E_l=gs.E_l, H=gs.H, Hp=gs.H, dtype=gs.dtype, seed=seed)
    inp = make_inputs(spec, W)
    g = torch.Generator().manual_seed(seed + 1000)
    grads = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(gs.dtype) for x in inp.xs]
    return inp, grads


def graph_case(gs: GraphSpec) -> list[int]:
    """Capture, replay with new routing, compare (see the module docstring). Returns this rank's
    ``num_dropped`` per replay."""
    r, W = rank_and_world()
    dev = device()
    E = gs.E_l * W
    kwargs = dict(_capacity_args(gs), transport=gs.transport, sum_per_rank=gs.sum_per_rank)
    scales = _scales(W, gs.E_l, gs.H, gs.dtype)
    scale = scales[r].to(dev)
    worst = gs.capacity == "worst-case"
    with triton_kernels(gs.triton):
        inp, grads = _inputs(gs, W, gs.capture_seed)
        x_s = inp.xs[r].to(dev, copy=True).requires_grad_(gs.backward)
        idx_s = inp.idxs[r].to(dev, copy=True)
        w_s = inp.ws[r].to(dev, copy=True).requires_grad_(gs.backward)
        g_s = grads[r].to(dev, copy=True)

        def step():
            out, recv_x, handle = _layer(x_s, idx_s, w_s, E, scale, kwargs)
            res = (out, recv_x, handle.tokens_per_expert, handle.num_dropped)
            if gs.backward:
                res += torch.autograd.grad(out, (x_s, w_s), g_s)
            return res

        graph, static = _capture(step, dev)
        dropped = []
        for seed in gs.seeds:
            inp, grads = _inputs(gs, W, seed)
            with torch.no_grad():
                x_s.copy_(inp.xs[r])
                idx_s.copy_(inp.idxs[r])
                w_s.copy_(inp.ws[r])
                g_s.copy_(grads[r])
            graph.replay()
            got = [t.detach().cpu() for t in static]
            out_g, recv_g, tpe_g, nd_g = got[:4]

            # the same layer, eager, capacity mode, on fresh tensors
            x = inp.xs[r].to(dev, copy=True).requires_grad_(gs.backward)
            w = inp.ws[r].to(dev, copy=True).requires_grad_(gs.backward)
            out_e, recv_e, h_e = _layer(x, inp.idxs[r].to(dev), w, E, scale, kwargs)
            assert torch.equal(out_g, out_e.detach().cpu()), f"replay {seed}: out differs"
            assert torch.equal(recv_g, recv_e.detach().cpu()), f"replay {seed}: recv_x differs"
            assert torch.equal(tpe_g, h_e.tokens_per_expert.cpu())
            assert torch.equal(nd_g, h_e.num_dropped.cpu())
            if gs.backward:
                gx_e, gw_e = torch.autograd.grad(out_e, (x, w), grads[r].to(dev))
                assert torch.equal(got[4], gx_e.cpu()), f"replay {seed}: x grad differs"
                assert torch.equal(got[5], gw_e.cpu()), f"replay {seed}: w grad differs"
            dropped.append(int(nd_g))
            if not worst:
                continue

            # nothing dropped: eager default mode and the reference agree
            assert int(nd_g) == 0
            x_d = inp.xs[r].to(dev, copy=True).requires_grad_(gs.backward)
            w_d = inp.ws[r].to(dev, copy=True).requires_grad_(gs.backward)
            with triton_kernels(gs.triton):
                default = dict(sum_per_rank=gs.sum_per_rank)
                out_d, recv_d, h_d = _layer(x_d, inp.idxs[r].to(dev), w_d, E, scale, default)
            R = recv_d.shape[0]
            same_sum = _same_sum(gs)
            same_sum(out_g, out_d.detach().cpu(), f"replay {seed}: != default mode")
            assert torch.equal(recv_g[:R], recv_d.detach().cpu()) and not recv_g[R:].any()
            assert torch.equal(tpe_g, h_d.tokens_per_expert_host)

            ref_xs = [t.clone().requires_grad_(True) for t in inp.xs]
            ref_ws = [t.clone().requires_grad_(True) for t in inp.ws]
            ref_disp = reference_dispatch(ref_xs, inp.idxs, E)
            ref_eo = [_experts(rx, tpe, scales[s]) for s, (rx, tpe) in enumerate(ref_disp)]
            ref_out = reference_combine(ref_eo, inp.idxs, E, ref_ws)
            assert torch.equal(tpe_g, ref_disp[r][1])
            same_sum(out_g, ref_out[r].detach(), f"replay {seed}: != reference")
            if gs.backward:
                with triton_kernels(gs.triton):
                    gx_d, gw_d = torch.autograd.grad(out_d, (x_d, w_d), grads[r].to(dev))
                tol = _sum_tol(gs.dtype) if gs.sum_per_rank else _bwd_tol(gs.dtype)
                torch.testing.assert_close(got[4], gx_d.cpu(), **tol)
                torch.testing.assert_close(got[5], gw_d.cpu(), **tol)
                live = [(o, g) for o, g in zip(ref_out, grads, strict=True) if o.requires_grad]
                if live:
                    torch.autograd.backward([o for o, _ in live], [g for _, g in live])
                ref_gx = ref_xs[r].grad if ref_xs[r].grad is not None else 0 * ref_xs[r]
                ref_gw = ref_ws[r].grad if ref_ws[r].grad is not None else 0 * ref_ws[r]
                torch.testing.assert_close(got[4], ref_gx.detach(), **tol)
                torch.testing.assert_close(got[5], ref_gw.detach(), **tol)
        del graph, static
    return dropped


def _same_sum(gs: GraphSpec):
    """How combine's output compares with the default mode's and the reference's: bit for bit,
    or within the rounding of the per-rank partial sums with ``sum_per_rank``."""

    def check(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
        if gs.sum_per_rank:
            torch.testing.assert_close(got, want, **_sum_tol(gs.dtype), msg=msg)
        else:
            assert torch.equal(got, want), msg

    return check


def _check_dropped(gs: GraphSpec, dropped: list[list[int]]) -> None:
    if gs.capacity == "worst-case":
        assert all(d == 0 for per_rank in dropped for d in per_rank)
    else:  # at C = T * K / 2 some rank overflows in each replay (about T * K valid pairs each)
        assert all(sum(per_replay) > 0 for per_replay in zip(*dropped, strict=True)), dropped


# ----------------------------------------------------------------------------- GPU (NCCL)
@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("transport", ["padded", "p2p", "nvshmem"])
@pytest.mark.parametrize("capacity", ["worst-case", "drop"])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_capture_and_replay_nccl(nccl_world, W, transport, capacity, triton, backward):
    world = nccl_world(W, "nvshmem" if transport == "nvshmem" else "")
    if transport == "nvshmem" and not _comm.nvshmem_available():
        pytest.skip("this PyTorch build has no usable NVSHMEM")
    gs = GraphSpec(capacity=capacity, transport=transport, triton=triton, backward=backward)
    _check_dropped(gs, world.run(graph_case, gs, timeout=300))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("capacity", ["worst-case", "drop"])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("transport", ["padded", "p2p"])
def test_capture_sum_per_rank_nccl(nccl_world, W, capacity, triton, transport):
    """``sum_per_rank`` (token rows, per-rank sums) captured, forward and backward."""
    gs = GraphSpec(capacity=capacity, triton=triton, sum_per_rank=True, transport=transport)
    _check_dropped(gs, nccl_world(W).run(graph_case, gs, timeout=300))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
def test_capture_f32_wide_nccl(nccl_world, W):
    """float32, more tokens and wider rows than the grid above (several Triton programs)."""
    gs = GraphSpec(T=300, K=2, E_l=4, H=160, dtype=f32, seeds=(21, 22))
    _check_dropped(gs, nccl_world(W).run(graph_case, gs, timeout=300))


# ----------------------------------------------------------------------------- CPU (gloo)
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("capacity", ["worst-case", "drop"])
@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_case_logic_gloo(gloo_world, W, capacity, sum_per_rank):
    """The case body on the CPU, the graph replaced by an eager re-run (no capture here)."""
    gs = GraphSpec(
        T=12, K=3, E_l=2, H=8, capacity=capacity, seeds=(1, 2), sum_per_rank=sum_per_rank
    )
    _check_dropped(gs, gloo_world(W).run(graph_case, gs, timeout=120))
