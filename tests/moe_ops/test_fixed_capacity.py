"""Capacity mode (``moe_ops.dispatch(..., capacity=..., overflow=...)``): fixed shapes, no sync.

Checked against ``moe_ops.reference``: when nothing overflows, the first R rows of ``recv_x``,
``tokens_per_expert`` and combine's output equal the default mode's bit for bit and the padding
rows are zero; with ``overflow="drop"`` the result equals the reference run with the dropped
slots set to -1 (they add 0), and ``handle.num_dropped`` counts them; with ``overflow="error"``
every rank raises. Fake kernels give static shapes; torch.compile works with ``fullgraph=True``;
no device -> host read happens (CPU: counted; CUDA: ``torch.cuda.set_sync_debug_mode("error")``).
GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch

import moe_ops
from moe_ops import _capacity_ops, _comm
from moe_ops.reference import reference_dispatch
from tests.moe_ops._cases import Spec, exact_capacity, fixed_case, make_inputs, rank_and_world

f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64

SPECS = {
    "k2-f32": Spec(T=(7,), K=2, dtype=f32),
    "k1-1d-bf16": Spec(K=1, one_d=True, dtype=bf16, seed=1),
    "k4-f64-Hp7": Spec(T=(6, 6), K=4, dtype=f64, Hp=7, seed=2),
    "to_rank0-bf16": Spec(T=(5, 5), K=2, routing="to_rank0", dtype=bf16, seed=3),
    "skewed-El3-noweights": Spec(T=(8, 8), K=3, E_l=3, routing="skewed", weights=False, seed=4),
    "all_unused": Spec(T=(4, 4), K=2, routing="all_unused"),
    "T0": Spec(T=(0,), K=2),
}


# ----------------------------------------------------------------------------- no overflow
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("cap", ["worst-case", "exact", "exact+3"])
def test_matches_reference_single_rank(name, cap):
    spec = SPECS[name]
    capacity = {"worst-case": "worst-case", "exact": exact_capacity(spec, 1)}.get(cap)
    capacity = capacity if capacity is not None else exact_capacity(spec, 1) + 3
    assert fixed_case(spec, capacity, drop=False) == 0


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("name", ["k2-f32", "k4-f64-Hp7", "to_rank0-bf16", "skewed-El3-noweights"])
def test_matches_reference_gloo(gloo_world, W, name, sum_per_rank):
    spec = SPECS[name]
    for capacity in ("worst-case", exact_capacity(spec, W)):
        dropped = gloo_world(W).run(fixed_case, spec, capacity, False, None, sum_per_rank)
        assert dropped == [0] * W


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_uneven_tokens_gloo(gloo_world, sum_per_rank):
    """Ranks with different T work when the capacity is at most T * K (with sum_per_rank: at
    most T) everywhere."""
    spec = Spec(T=(9, 4), K=2, seed=6)
    capacity = min(exact_capacity(spec, 2), 4 if sum_per_rank else 8)
    gloo_world(2).run(fixed_case, spec, capacity, True, None, sum_per_rank)


# ----------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("capacity", [0, 1, 5, 9])
def test_drop_single_rank(capacity):
    spec = Spec(T=(6,), K=3, E_l=3, seed=8, unused=0.1)
    dropped = fixed_case(spec, capacity, drop=True)
    n_valid = int((make_inputs(spec, 1).idxs[0] >= 0).sum())
    assert dropped == max(n_valid - capacity, 0) and dropped > 0


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
@pytest.mark.parametrize("capacity", [1, 4, 7])
def test_drop_gloo(gloo_world, capacity, sum_per_rank):
    spec = Spec(T=(6, 6), K=2, routing="to_rank0", seed=9, unused=0.0)
    dropped = gloo_world(2).run(fixed_case, spec, capacity, True, None, sum_per_rank)
    assert sum(dropped) == 2 * 6 * 2 - capacity  # rank 0 receives every pair, keeps C


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_drop_every_pair_of_a_rank_gloo(gloo_world, sum_per_rank):
    """Rank 0's pairs come after rank 1's for none of the experts: with C = 0 all are dropped."""
    spec = Spec(T=(4, 4), K=2, seed=10, unused=0.0)
    assert gloo_world(2).run(fixed_case, spec, 0, True, None, sum_per_rank) == [8, 8]


@pytest.mark.parametrize("capacity", [3, 11, "worst-case"])
def test_sum_per_rank_drop_three_ranks(gloo_world, capacity):
    """Per-rank sums with pairs dropped mid-chunk on three ranks, K = 4 (tokens with kept and
    dropped slots on one rank)."""
    spec = Spec(T=(7, 7, 7), K=4, E_l=2, routing="skewed", seed=12, unused=0.1)
    gloo_world(3).run(fixed_case, spec, capacity, True, None, True)


def overflow_error_case(capacity: int) -> str:
    r, W = rank_and_world()
    spec = Spec(T=(6, 6, 6), K=2, routing="to_rank0", seed=9, unused=0.0)
    inp = make_inputs(spec, W)
    with pytest.raises(ValueError) as info:
        moe_ops.dispatch(inp.xs[r], inp.idxs[r], inp.num_experts, capacity=capacity)
    need = [12 * W] + [0] * (W - 1)
    assert f"capacity={capacity}" in str(info.value) and str(need) in str(info.value)
    recv_x, handle = moe_ops.dispatch(inp.xs[r], inp.idxs[r], inp.num_experts, capacity=12 * W)
    want = reference_dispatch(inp.xs, inp.idxs, inp.num_experts)[r][0]
    assert torch.equal(recv_x[: want.shape[0]], want)
    return str(info.value)


def test_overflow_error_single_rank():
    msg = overflow_error_case(5)
    assert "overflow='drop'" in msg and "'worst-case'" in msg


def test_overflow_error_gloo(gloo_world):
    """Only rank 0 overflows; every rank raises the same error, then the group works."""
    msgs = gloo_world(2).run(overflow_error_case, 23)
    assert msgs[0] == msgs[1]


def bad_id_case(bad_rank: int, sum_per_rank: bool = False) -> None:
    r, W = rank_and_world()
    spec = Spec(T=(5, 5), K=2, seed=3)
    inp = make_inputs(spec, W)
    idx = inp.idxs[r].clone()
    if r == bad_rank:
        idx[0, 0] = inp.num_experts
        exc, frag = ValueError, "topk_idx values must be expert ids"
    else:
        exc, frag = moe_ops.PeerInputError, f"rank(s) [{bad_rank}]"
    with pytest.raises(exc, match=re.escape(frag)):
        moe_ops.dispatch(
            inp.xs[r],
            idx,
            inp.num_experts,
            capacity="worst-case",
            overflow="drop",
            sum_per_rank=sum_per_rank,
        )


def test_bad_ids_single_rank():
    bad_id_case(0)


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
def test_bad_ids_gloo(gloo_world, sum_per_rank):
    """The bad rank flags itself (and does not sum per rank); its peers raise ``PeerInputError``,
    not the disagreement on ``sum_per_rank``."""
    gloo_world(2).run(bad_id_case, 1, sum_per_rank)


def unequal_chunks_case() -> None:
    r, W = rank_and_world()
    inp = make_inputs(Spec(T=(5, 3), K=2), W)
    with pytest.raises(ValueError, match="same number of tokens"):
        moe_ops.dispatch(inp.xs[r], inp.idxs[r], inp.num_experts, capacity="worst-case")


def test_unequal_tokens_with_large_capacity_gloo(gloo_world):
    gloo_world(2).run(unequal_chunks_case)


@pytest.mark.parametrize(
    "kwargs, exc, frag",
    [
        (dict(capacity=-1), ValueError, "capacity must be >= 0"),
        (dict(capacity=2.5), TypeError, "capacity must be None, an int or 'worst-case'"),
        (dict(capacity="max"), TypeError, "capacity must be None, an int or 'worst-case'"),
        (dict(capacity=4, overflow="clip"), ValueError, "overflow must be 'error' or 'drop'"),
        (dict(overflow="drop"), ValueError, "overflow is a capacity-mode option"),
    ],
)
def test_bad_arguments(kwargs, exc, frag):
    with pytest.raises(exc, match=frag):
        moe_ops.dispatch(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int64), 4, **kwargs)


# ----------------------------------------------------------------------------- host syncs
class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts Tensor -> Python value reads (``item``, ``tolist``, ``bool``, ``int``...)."""

    _READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self._READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def count_host_reads(
    spec: Spec, capacity, overflow: str, sum_per_rank: bool = False
) -> dict[str, int]:
    """Reads of device values to the host in capacity-mode dispatch + combine + backward.

    ``_capacity_ops._raise_on_cpu`` is replaced by a no-op: it is the CPU stand-in of the CUDA
    path's device-side assertions (on the CPU there is no device to sync with)."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    x = inp.xs[r].clone().requires_grad_(True)
    w = inp.ws[r].clone().requires_grad_(True)
    sync = mock.patch.object(_comm, "read_to_host", wraps=_comm.read_to_host)
    cpu_checks = mock.patch.object(_capacity_ops, "_raise_on_cpu")
    reads = _HostReads()
    with sync as sync_mock, cpu_checks as checks_mock, reads:
        recv_x, handle = moe_ops.dispatch(
            x,
            inp.idxs[r],
            inp.num_experts,
            capacity=capacity,
            overflow=overflow,
            sum_per_rank=sum_per_rank,
        )
        assert handle.layout.sums_per_rank == (sum_per_rank and W > 1)
        out = moe_ops.combine(recv_x * 2, handle, w)
        out.sum().backward()
    assert x.grad is not None and w.grad is not None
    return dict(
        read_to_host=sync_mock.call_count, reads=len(reads.reads), checks=checks_mock.call_count
    )


_COUNT_SPEC = Spec(T=(8, 8), K=3, E_l=2, H=6, Hp=6, seed=11)


@pytest.mark.parametrize("overflow", ["error", "drop"])
def test_no_host_reads_single_rank(overflow):
    counts = count_host_reads(_COUNT_SPEC, "worst-case", overflow)
    assert counts == dict(read_to_host=0, reads=0, checks=1)


@pytest.mark.parametrize("sum_per_rank", [False, True], ids=["slot_order", "sum_per_rank"])
@pytest.mark.parametrize("overflow", ["error", "drop"])
def test_no_host_reads_gloo(gloo_world, overflow, sum_per_rank):
    for counts in gloo_world(2).run(count_host_reads, _COUNT_SPEC, 20, overflow, sum_per_rank):
        assert counts == dict(read_to_host=0, reads=0, checks=1)


def test_default_mode_reads_once():
    """The counter sees the default mode's one sync (so zero above means something)."""
    r, W = rank_and_world()
    inp = make_inputs(_COUNT_SPEC, 1)
    with mock.patch.object(_comm, "read_to_host", wraps=_comm.read_to_host) as m:
        moe_ops.dispatch(inp.xs[0], inp.idxs[0], inp.num_experts)
    assert m.call_count == 1


# ----------------------------------------------------------------------------- graphs
def _layer(x, idx, w, E, capacity, overflow="drop"):
    recv_x, handle = moe_ops.dispatch(x, idx, E, capacity=capacity, overflow=overflow)
    y = torch.tanh(recv_x) * (1 + torch.arange(recv_x.shape[0], dtype=x.dtype) / 8)[:, None]
    return moe_ops.combine(y, handle, w), handle.tokens_per_expert, handle.num_dropped


def test_fake_shapes_are_static():
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    T, K, E, H = 10, 2, 8, 16
    x, idx, w = torch.randn(T, H), torch.randint(0, E, (T, K)), torch.rand(T, K)
    gm = make_fx(lambda *a: _layer(*a, E, "worst-case"), tracing_mode="symbolic")(x, idx, w)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "moe_ops.dispatch_fixed.default" in ops and "moe_ops.combine_fixed.default" in ops
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for t in val if isinstance(val, (tuple, list)) else [val]:
            if isinstance(t, torch.Tensor):
                assert not free_unbacked_symbols(t.shape), (node, t.shape)
    disp = next(n for n in gm.graph.nodes if n.target == torch.ops.moe_ops.dispatch_fixed.default)
    T_sym, K_sym = [n for n in gm.graph.nodes if n.op == "placeholder"][1].meta["val"].shape
    assert str(disp.meta["val"][0].shape[0]) == str(T_sym * K_sym)  # worst case: T * K rows


def test_fake_shapes_match_real_at_fixed_capacity():
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, K, E, H = 6, 3, 4, 5
    x, idx = torch.randn(T, H), torch.randint(-1, E, (T, K))
    with FakeTensorMode() as mode:
        fx, fidx = mode.from_tensor(x), mode.from_tensor(idx)
        fake = torch.ops.moe_ops.dispatch_fixed(fx, fidx, E, 13, True, "", 1, "local")
    real = torch.ops.moe_ops.dispatch_fixed(x, idx, E, 13, True, "", 1, "local")
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]


def test_opcheck():
    T, K, E, H = 6, 2, 4, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    idx = torch.randint(-1, E, (T, K), generator=g)
    args = (x, idx, E, 9, True, "", 1, "local")
    torch.library.opcheck(torch.ops.moe_ops.dispatch_fixed, args)
    out = _capacity_ops.DispatchOutputs(*torch.ops.moe_ops.dispatch_fixed(*args))
    w = torch.rand(T, K, generator=g, requires_grad=True)
    cargs = (
        out.recv_x.detach().requires_grad_(),
        w,
        *out.layout(),
        9,
        "",
        1,
        "local",
    )
    torch.library.opcheck(torch.ops.moe_ops.combine_fixed, cargs)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_fwd_bwd(dynamic):
    torch._dynamo.reset()
    T, K, E, H = 12, 2, 8, 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    idx = torch.randint(-1, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g, requires_grad=True)

    def layer(x, idx, w):
        return _layer(x, idx, w, E, 12)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out_c, tpe_c, nd_c = compiled(x, idx, w)
    gx_c, gw_c = torch.autograd.grad(out_c.square().sum(), (x, w))
    out_e, tpe_e, nd_e = layer(x, idx, w)
    gx_e, gw_e = torch.autograd.grad(out_e.square().sum(), (x, w))
    assert torch.equal(out_c, out_e) and torch.equal(tpe_c, tpe_e) and torch.equal(nd_c, nd_e)
    assert int(nd_e) > 0  # 12 rows for up to 24 pairs: the test covers dropping too
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gw_c, gw_e)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["k2-f32", "k4-f64-Hp7", "to_rank0-bf16", "skewed-El3-noweights"])
@pytest.mark.parametrize("drop", [False, True])
def test_cuda_matches_reference(name, drop):
    """The Triton path of the capacity mode against the reference (W = 1)."""
    spec = SPECS[name]
    cuda = torch.device("cuda", torch.cuda.current_device())
    with mock.patch("tests.moe_ops._cases.device", lambda: cuda):
        cap = exact_capacity(spec, 1) - (3 if drop else 0)
        fixed_case(spec, max(cap, 0), drop)


def _cuda_inputs(T, K, E, H, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    idx = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, device="cuda", generator=g).softmax(-1).to(dtype)
    return x, idx, w


def _grouped_expert(recv_x, tokens_per_expert, weight_EHH):
    offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
    return torch._grouped_mm(recv_x, weight_EHH, offs=offs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay():
    T, K, E, H = 512, 4, 8, 128
    dtype = torch.bfloat16
    weight = (torch.randn(E, H, H, device="cuda") / H**0.5).to(dtype).transpose(1, 2)
    x_s, idx_s, w_s = _cuda_inputs(T, K, E, H, dtype, 0)

    def layer(x, idx, w):
        recv_x, handle = moe_ops.dispatch(x, idx, E, capacity="worst-case")
        y = _grouped_expert(recv_x, handle.tokens_per_expert, weight)
        return moe_ops.combine(y, handle, w), handle.tokens_per_expert

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            layer(x_s, idx_s, w_s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out_s, tpe_s = layer(x_s, idx_s, w_s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (1, 2, 3):
        x, idx, w = _cuda_inputs(T, K, E, H, dtype, seed)
        x_s.copy_(x), idx_s.copy_(idx), w_s.copy_(w)
        graph.replay()
        out_e, tpe_e = layer(x, idx, w)
        recv_d, h_d = moe_ops.dispatch(x, idx, E)
        out_d = moe_ops.combine(_grouped_expert(recv_d, h_d.tokens_per_expert, weight), h_d, w)
        assert torch.equal(tpe_s, tpe_e) and torch.equal(tpe_s, h_d.tokens_per_expert)
        assert torch.equal(out_s, out_e)
        torch.testing.assert_close(out_s, out_d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overflow", ["error", "drop"])
def test_cuda_no_sync_fwd_bwd(overflow):
    T, K, E, H = 256, 2, 8, 64
    x, idx, w = _cuda_inputs(T, K, E, H, torch.bfloat16, 7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for mode in ("warm-up", "error"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode if mode == "error" else "default")
        try:
            recv_x, handle = moe_ops.dispatch(x, idx, E, capacity=T * K, overflow=overflow)
            out = moe_ops.combine(recv_x * 2, handle, w)
            out.backward(g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(handle.num_dropped) == 0 and x.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("transport", ["padded", "p2p", "nvshmem"])
@pytest.mark.parametrize("drop", [False, True])
def test_nccl_transports(nccl_world, W, transport, drop):
    """The W > 1 transports on GPUs: the padded all_to_all_single (NCCL), p2p (reads from the
    peers' symmetric buffers), and NVSHMEM's all_to_all_vdev_2d / _2d_offset through symmetric
    memory (also run at W = 1)."""
    if transport == "p2p" and W == 1:
        pytest.skip("p2p is a W > 1 transport")
    if transport == "nvshmem" and not _comm.nvshmem_available():
        pytest.skip("this PyTorch build has no usable NVSHMEM")
    if transport == "nvshmem" and W == 1:
        pytest.skip(
            "NVSHMEM symmetric memory needs >= 2 ranks: on one H100 (torch 2.11) "
            "symm_mem.rendezvous raised 'Expected global_ranks.size() > 1 to be true'"
        )
    spec = Spec(T=(300,), K=4, E_l=4, H=64, Hp=32, dtype=bf16, seed=9)
    capacity = exact_capacity(spec, W) - (20 if drop else 0)
    world = nccl_world(W, "nvshmem" if transport == "nvshmem" else "")
    dropped = world.run(fixed_case, spec, capacity, drop, transport)
    assert (sum(dropped) >= 20) if drop else dropped == [0] * W


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("capacity", ["worst-case", "exact-20", 100])
@pytest.mark.parametrize("transport", ["padded", "p2p"])
def test_nccl_sum_per_rank(nccl_world, W, capacity, transport):
    """``sum_per_rank`` with the equal-chunk transports on GPUs (Triton kernels; NCCL or the
    peers' symmetric buffers), with and without dropped pairs, and with C < T (chunks of C
    rows)."""
    spec = Spec(T=(300,), K=8, E_l=4, H=64, Hp=32, dtype=bf16, seed=9)
    if capacity == "exact-20":
        capacity = exact_capacity(spec, W) - 20
    nccl_world(W).run(fixed_case, spec, capacity, True, transport, True)


def test_device_assertion_names_the_checks_it_covers():
    """On CUDA one ``torch._assert_async`` covers every check a dispatch asks for (the plan
    folds them into ``ok[4]``); its message names each of them and fits CUDA's limit (messages
    of 255 characters or more raise instead of asserting)."""
    from moe_ops import _capacity_ops

    for W, drop, transport in [(1, True, "local"), (2, False, "padded"), (4, True, "p2p")]:
        asked = _capacity_ops._asked_checks(W, drop, transport)
        message = _capacity_ops._assert_message(asked)
        assert len(message) < 255
        named = [text in message for text in _capacity_ops._CHECKS]
        assert named == [bool(asked >> i & 1) for i in range(4)]
        assert named[0] and named[1] == (W > 1) and named[3] == (not drop)
