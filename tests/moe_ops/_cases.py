"""Case bodies that run on every rank of a world (see ``tests/_dist.py``), and their inputs.

Every rank builds every rank's inputs from the same seed, runs the ops on its own share and
checks its results against ``moe_ops.reference`` computed over all ranks, so a case needs no
communication beyond the ops under test. Cases return nothing of interest unless noted; a failed
check raises on the rank that saw it. Shape letters as in ``moe_ops._layout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import moe_ops
from moe_ops import _comm
from moe_ops._layout import acc_dtype
from moe_ops.reference import reference_combine, reference_dispatch
from tests._dist import device

ROUTINGS = ("random", "to_rank0", "to_last", "skip_rank1", "rank0_silent", "all_unused", "skewed")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One routing problem over W ranks. ``T`` gives tokens per rank (cycled over the ranks)."""

    T: tuple[int, ...] = (6, 3, 0, 5)
    K: int = 2
    E_l: int = 2
    H: int = 5
    Hp: int = 5
    dtype: torch.dtype = torch.float32
    w_dtype: torch.dtype | None = None
    routing: str = "random"
    weights: bool = True
    one_d: bool = False
    unused: float = 0.2  # chance that a slot is -1
    seed: int = 0


@dataclasses.dataclass
class Inputs:
    xs: list[torch.Tensor]  # [T_r, H] per rank
    idxs: list[torch.Tensor]  # [T_r, K] (or [T_r] when one_d) int64 per rank
    ws: list[torch.Tensor] | None  # [T_r, K] (or [T_r]) per rank
    num_experts: int


def rank_and_world() -> tuple[int, int]:
    """(rank, W) in the default group, or (0, 1) when ``torch.distributed`` is not initialized."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ids(spec: Spec, W: int, r: int, T: int, g: torch.Generator) -> torch.Tensor:
    E_l, K = spec.E_l, spec.K
    E = E_l * W
    shape = (T, K)
    if spec.routing == "to_rank0":
        ids = torch.randint(0, E_l, shape, generator=g)
    elif spec.routing == "to_last":
        ids = torch.randint(E - E_l, E, shape, generator=g)
    elif spec.routing == "skip_rank1" and W > 1:
        ids = torch.randint(0, E - E_l, shape, generator=g)
        ids = torch.where(ids >= E_l, ids + E_l, ids)  # never an expert of rank 1
    elif spec.routing == "skewed" and T > 0:
        probs = torch.tensor([2.0**-e for e in range(E)])
        ids = torch.multinomial(probs, T * K, replacement=True, generator=g).view(shape)
    else:
        ids = torch.randint(0, E, shape, generator=g)
    unused = torch.rand(shape, generator=g) < spec.unused
    if spec.routing == "all_unused" or (spec.routing == "rank0_silent" and r == 0):
        unused = torch.ones(shape, dtype=torch.bool)
    return torch.where(unused, -1, ids)


def make_inputs(spec: Spec, W: int) -> Inputs:
    """Every rank's inputs, on the CPU, identical on every rank that calls this with ``spec``."""
    g = torch.Generator().manual_seed(spec.seed * 1000 + W)
    xs, idxs, ws = [], [], []
    for r in range(W):
        T = spec.T[r % len(spec.T)]
        xs.append(torch.randn((T, spec.H), generator=g, dtype=torch.float64).to(spec.dtype))
        ids = _ids(spec, W, r, T, g)
        w = torch.rand((T, spec.K), generator=g, dtype=torch.float64).to(spec.w_dtype or spec.dtype)
        if spec.one_d:
            ids, w = ids[:, 0], w[:, 0]
        idxs.append(ids)
        ws.append(w)
    return Inputs(xs, idxs, ws if spec.weights else None, spec.E_l * W)


def expert_fn(recv_x: torch.Tensor, tokens_per_expert: torch.Tensor, Hp: int) -> torch.Tensor:
    """A stand-in for the local experts, ``H -> H'``: elementwise, so bitwise reproducible."""
    scale = torch.arange(1, tokens_per_expert.numel() + 1, device=recv_x.device, dtype=recv_x.dtype)
    scale_R = torch.repeat_interleave(
        scale / 4, tokens_per_expert.to(recv_x.device), output_size=recv_x.shape[0]
    )
    reps = -(-Hp // max(recv_x.shape[1], 1))
    wide = torch.cat([recv_x.flip(1) if i % 2 else recv_x for i in range(reps)], 1)[:, :Hp]
    return wide * scale_R[:, None] + 0.5


def _bwd_tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def dispatch_combine_equal_prefilled(spec: Spec) -> None:
    """:func:`dispatch_combine_equal` with dispatch taking its CUDA path on any device: the send
    buffers filled before the count read, sized for every row that could be sent (on the CPU they
    are otherwise filled after it, at their exact size)."""
    calls = []

    def read(t, meanwhile=None):
        calls.append(meanwhile)
        return t.cpu(), None if meanwhile is None else meanwhile()

    with mock.patch.object(_comm, "read_to_host", read):
        dispatch_combine_equal(spec)
    assert calls and all(m is not None for m in calls), "dispatch queued no fill before the read"


def dispatch_combine_equal(spec: Spec, group_ranks: list[int] | None = None) -> None:
    """Forward bit for bit against the reference, backward against autograd through it."""
    if group_ranks is None:
        group, (r, W) = None, rank_and_world()
    else:  # every rank must take part in creating the group
        group = dist.new_group(group_ranks)
        if dist.get_rank() not in group_ranks:
            return
        W, r = group.size(), dist.get_rank(group)
    inp = make_inputs(spec, W)
    dev = device()
    E = inp.num_experts

    x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
    w = None if inp.ws is None else inp.ws[r].to(dev, copy=True).requires_grad_(True)
    recv_x, handle = moe_ops.dispatch(x, inp.idxs[r].to(dev), E, group=group)
    expert_out = expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
    out = moe_ops.combine(expert_out, handle, w, group=group)

    ref_xs = [t.clone().requires_grad_(True) for t in inp.xs]
    ref_ws = None if inp.ws is None else [t.clone().requires_grad_(True) for t in inp.ws]
    ref_disp = reference_dispatch(ref_xs, inp.idxs, E)
    ref_eo = [expert_fn(rx, tpe, spec.Hp) for rx, tpe in ref_disp]
    ref_out = reference_combine(ref_eo, inp.idxs, E, ref_ws)

    assert recv_x.dtype == spec.dtype and out.dtype == spec.dtype
    assert handle.tokens_per_expert.device == dev and handle.tokens_per_expert.dtype == torch.int64
    assert torch.equal(handle.tokens_per_expert.cpu(), ref_disp[r][1])
    host = handle.tokens_per_expert_host
    assert host.device.type == "cpu" and torch.equal(host, ref_disp[r][1])
    assert torch.equal(recv_x.detach().cpu(), ref_disp[r][0].detach())
    assert torch.equal(expert_out.detach().cpu(), ref_eo[r].detach())
    assert out.shape == (inp.xs[r].shape[0], spec.Hp)
    assert torch.equal(out.detach().cpu(), ref_out[r].detach())

    g = torch.Generator().manual_seed(spec.seed + 17)
    grads_out = [
        torch.randn(o.shape, generator=g, dtype=torch.float64).to(spec.dtype) for o in ref_out
    ]
    out.backward(grads_out[r].to(dev))
    live = [o for o in ref_out if o.requires_grad]
    if live:
        grads = [go for o, go in zip(ref_out, grads_out, strict=True) if o.requires_grad]
        torch.autograd.backward(live, grads)
    ref_gx = ref_xs[r].grad if ref_xs[r].grad is not None else torch.zeros_like(ref_xs[r])
    torch.testing.assert_close(x.grad.cpu(), ref_gx, **_bwd_tol(spec.dtype))
    if w is not None:
        ref_gw = ref_ws[r].grad if ref_ws[r].grad is not None else torch.zeros_like(ref_ws[r])
        torch.testing.assert_close(w.grad.cpu(), ref_gw, **_bwd_tol(spec.dtype))


def round_trip(spec: Spec) -> None:
    """``combine(recv_x, handle, w)[t] == sum_k w[t, k] * x[t]`` over valid slots, bit for bit."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    x, idx = inp.xs[r].to(dev), inp.idxs[r].to(dev)
    w = None if inp.ws is None else inp.ws[r].to(dev)
    recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
    out = moe_ops.combine(recv_x, handle, w)

    idx_TK = idx[:, None] if idx.dim() == 1 else idx
    w_TK = None if w is None else (w[:, None] if w.dim() == 1 else w)
    adt = acc_dtype(x.dtype)
    want = torch.zeros(x.shape, dtype=adt, device=dev)
    for k in range(idx_TK.shape[1]):
        term = x.to(adt) if w_TK is None else x.to(adt) * w_TK[:, k, None].to(adt)
        want += torch.where(idx_TK[:, k, None] >= 0, term, 0)
    assert torch.equal(out, want.to(x.dtype))


def routing_property(
    idx_lists: list[list[list[int]]], E_l: int, H: int, seed: int, sum_per_rank: bool = False
) -> None:
    """Hypothesis-drawn routing (``idx_lists[r][t]`` = the K ids of token t on rank r); with
    ``sum_per_rank``, in float64 and equal to the reference up to rounding."""
    r, W = rank_and_world()
    K = len(next((row for rows in idx_lists for row in rows), [0]))
    idxs = [torch.tensor(rows, dtype=torch.int64).view(len(rows), K) for rows in idx_lists]
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if sum_per_rank else torch.float32
    xs = [torch.randn((i.shape[0], H), generator=g, dtype=dtype) for i in idxs]
    ws = [torch.rand(i.shape, generator=g, dtype=dtype) for i in idxs]
    E = E_l * W
    recv_x, handle = moe_ops.dispatch(xs[r], idxs[r], E, sum_per_rank=sum_per_rank)
    ref = reference_dispatch(xs, idxs, E)
    assert torch.equal(recv_x, ref[r][0]) and torch.equal(handle.tokens_per_expert, ref[r][1])
    eo = [rx * 3 - 1 for rx, _ in ref]
    out = moe_ops.combine(recv_x * 3 - 1, handle, ws[r])
    want = reference_combine(eo, idxs, E, ws)[r]
    if sum_per_rank:
        torch.testing.assert_close(out, want, **_sum_tol(dtype))
    else:
        assert torch.equal(out, want)


def gradcheck_case(which: str, seed: int, checked_rank: int = 0) -> None:
    """``torch.autograd.gradcheck`` in float64 through the real collectives of this world.

    gradcheck perturbs inputs and probes outputs on every rank at once, so a rank's numerical
    Jacobian would also see its peers' perturbations: only ``checked_rank`` is checked, the
    others take part with constant inputs and zeroed outputs. gradcheck calls the function once
    per input element and backward once per output element, so every rank needs the same shapes:
    rank r routes like rank 0 shifted by r ranks, which gives every rank the same T and R.
    """
    r, W = rank_and_world()
    T, K, E_l, H = 4, 2, 2, 3
    E = E_l * W
    g = torch.Generator().manual_seed(seed)
    base = _ids(Spec(K=K, E_l=E_l), W, 0, T, g)
    idx = torch.where(base >= 0, (base + r * E_l) % E, -1)
    g.manual_seed(seed * 100 + r)
    dev = device()
    idx = idx.to(dev)
    x = torch.randn((T, H), generator=g, dtype=torch.float64).to(dev)
    w = torch.rand((T, K), generator=g, dtype=torch.float64).to(dev)
    if which == "dispatch":
        fn, args = (lambda x_: moe_ops.dispatch(x_, idx, E)[0]), (x,)
    elif which == "combine":
        recv_x, handle = moe_ops.dispatch(x, idx, E)
        fn, args = (lambda eo, w_: moe_ops.combine(eo, handle, w_)), (recv_x * 2, w)
    else:

        def fn(x_, w_):
            recv_x, handle = moe_ops.dispatch(x_, idx, E)
            return moe_ops.combine(torch.tanh(recv_x) * 1.5, handle, w_)

        args = (x, w)
    assert moe_ops.dispatch(x, idx, E)[0].shape[0] > 0
    checked = fn
    if r != checked_rank:

        def checked(*inputs):
            return fn(*(a + 0 * i for a, i in zip(args, inputs, strict=True))) * 0

    inputs = tuple(a.detach().clone().requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(checked, inputs, eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- counts
def expected_calls(W: int, K: int) -> dict[str, int]:
    """What :func:`count_calls` must find: one host sync per dispatch; at W > 1 the count
    exchange, then the rows in one exchange (with K > W once per (token, rank), their slots in
    the same rows), one exchange back in combine, and two in the backward; no collective at
    W = 1."""
    if W == 1:
        return dict(dispatch_a2a=0, dispatch_sync=1, fwd_a2a=0, fwd_sync=1, bwd_a2a=0, bwd_sync=0)
    return dict(
        dispatch_a2a=2,
        dispatch_sync=1,
        fwd_a2a=3,
        fwd_sync=1,
        bwd_a2a=2,
        bwd_sync=0,
    )


def count_calls(spec: Spec) -> dict[str, int]:
    """Collectives and host syncs of forward dispatch+combine and of the backward on this rank."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
    w = inp.ws[r].to(dev, copy=True).requires_grad_(True)
    idx = inp.idxs[r].to(dev)
    a2a = mock.patch.object(_comm, "all_to_all", wraps=_comm.all_to_all)
    sync = mock.patch.object(_comm, "read_to_host", wraps=_comm.read_to_host)
    counts = {}
    with a2a as a2a_mock, sync as sync_mock:
        recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
        counts["dispatch_a2a"], counts["dispatch_sync"] = a2a_mock.call_count, sync_mock.call_count
        out = moe_ops.combine(recv_x * 2, handle, w)
        counts["fwd_a2a"], counts["fwd_sync"] = a2a_mock.call_count, sync_mock.call_count
        out.sum().backward()
        counts["bwd_a2a"] = a2a_mock.call_count - counts["fwd_a2a"]
        counts["bwd_sync"] = sync_mock.call_count - counts["fwd_sync"]
    assert x.grad is not None and w.grad is not None
    return counts


class _NumelRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, numel) of every tensor a non-view aten op returns, including inside our ops."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "moe_ops":  # run the op's Python body so its aten ops show up here
            with self:
                body = torch._library.custom_ops.OPDEFS[func._name]._init_fn
                return body(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.numel()))
        return out


def largest_intermediates(spec: Spec) -> dict:
    """Largest aten outputs of dispatch, combine and backward, and this rank's N, R, T*K."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    x = inp.xs[r].requires_grad_(True)
    w = inp.ws[r].requires_grad_(True)
    idx = inp.idxs[r]
    rec = _NumelRecorder()
    with rec:
        recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
        eo = recv_x.detach().requires_grad_(True)
        out = moe_ops.combine(eo, handle, w)
        out.backward(torch.ones_like(out))
    big = max(rec.seen, key=lambda s: s[1])
    return dict(
        big=big,
        calls=len(rec.seen),
        N=int(handle.layout.send_splits.sum()),
        R=recv_x.shape[0],
        TK=idx.numel(),
        H=spec.H,
    )


_ZERO_FILLS = ("aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.zero_", "aten.fill_")


def zero_fills(spec: Spec) -> dict:
    """Zero-filled tensors (op, numel) made during dispatch, combine and their backward on this
    rank, with the payload's size ``N * H``: a gradient that autograd fills with zeros for an
    output no loss reads (combine's ``returned_rows``) would show up here."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    x = inp.xs[r].requires_grad_(True)
    w = inp.ws[r].requires_grad_(True)
    rec = _NumelRecorder()
    with rec:
        recv_x, handle = moe_ops.dispatch(x, inp.idxs[r], inp.num_experts)
        out = moe_ops.combine(recv_x * 2, handle, w)
        out.backward(torch.ones_like(out))
    fills = [(op, n) for op, n in rec.seen if op.split(".")[:2] in _ZERO_FILL_NAMES]
    return dict(fills=fills, payload=int(handle.layout.send_splits.sum()) * spec.H)


_ZERO_FILL_NAMES = [name.split(".") for name in _ZERO_FILLS]


# ----------------------------------------------------------------------------- bad input
def _good(W: int, seed: int = 3) -> tuple[Inputs, Spec]:
    spec = Spec(T=(5, 4, 3, 6), K=2, E_l=2, H=4, Hp=4, seed=seed)
    return make_inputs(spec, W), spec


def _bad_dispatch_input(kind: str, x, idx, E):
    """(x, topk_idx, expected exception type, message fragments) for one kind of bad input."""
    if kind == "id_too_big":
        idx = idx.clone()
        idx[0, 0] = E + 3
        return x, idx, ValueError, ["topk_idx", f"[0, {E})", "-1", f"[{E + 3}]"]
    if kind == "id_below_minus1":
        idx = idx.clone()
        idx[-1, -1] = -2
        return x, idx, ValueError, ["topk_idx", f"[0, {E})", "[-2]"]
    if kind == "float_ids":
        return x, idx.float(), TypeError, ["topk_idx", "integer", "torch.float32"]
    if kind == "x_3d":
        return x[None], idx, ValueError, ["x", "2-D [T, H]", str(tuple(x[None].shape))]
    if kind == "idx_3d":
        return x, idx[None], ValueError, ["topk_idx", "[T, K]", str(tuple(idx[None].shape))]
    if kind == "T_mismatch":
        return (
            x[:-1],
            idx,
            ValueError,
            ["topk_idx", f"{idx.shape[0]} rows", f"x has {x.shape[0] - 1} tokens"],
        )
    if kind == "int_x":
        return x.long(), idx, TypeError, ["x", "floating point", "torch.int64"]
    if kind == "meta_idx":
        return (
            x,
            idx.to("meta"),
            ValueError,
            ["topk_idx is on meta", f"x is on {x.device}", "same device"],
        )
    if kind == "meta_x":
        return (
            x.to("meta"),
            idx,
            ValueError,
            [f"topk_idx is on {idx.device}", "x is on meta", "same device"],
        )
    raise AssertionError(kind)


DISPATCH_BAD_KINDS = (
    "id_too_big",
    "id_below_minus1",
    "float_ids",
    "x_3d",
    "idx_3d",
    "T_mismatch",
    "int_x",
    "meta_idx",
    "meta_x",
)
COMBINE_BAD_KINDS = (
    "rows_too_many",
    "rows_too_few",
    "w_shape",
    "w_int",
    "w_meta",
    "eo_meta",
    "eo_int",
)


def _check_message(exc: BaseException, fragments: list[str]) -> None:
    msg = str(exc)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


def _next_call_works(inp: Inputs, spec: Spec, r: int) -> None:
    dev = device()
    recv_x, handle = moe_ops.dispatch(inp.xs[r].to(dev), inp.idxs[r].to(dev), inp.num_experts)
    ref = reference_dispatch(inp.xs, inp.idxs, inp.num_experts)
    assert torch.equal(recv_x.cpu(), ref[r][0])
    out = moe_ops.combine(recv_x * 2, handle, inp.ws[r].to(dev))
    want = reference_combine([rx * 2 for rx, _ in ref], inp.idxs, inp.num_experts, inp.ws)[r]
    assert torch.equal(out.cpu(), want)


def one_bad_rank_dispatch(bad_rank: int, kind: str) -> str:
    """Only ``bad_rank`` passes bad input to dispatch: every rank raises, then the group works."""
    r, W = rank_and_world()
    inp, spec = _good(W)
    x, idx, E = inp.xs[r].to(device()), inp.idxs[r].to(device()), inp.num_experts
    if r == bad_rank:
        x, idx, exc_type, fragments = _bad_dispatch_input(kind, x, idx, E)
    else:
        exc_type, fragments = moe_ops.PeerInputError, [f"rank(s) [{bad_rank}]", "dispatch"]
    with pytest.raises(exc_type) as info:
        moe_ops.dispatch(x, idx, E)
    assert not isinstance(info.value, RuntimeError)
    _check_message(info.value, fragments)
    _next_call_works(inp, spec, r)
    return type(info.value).__name__


def _bad_combine_input(kind: str, recv_x, w):
    R = recv_x.shape[0]
    if kind == "rows_too_many":
        return (
            torch.cat([recv_x, recv_x[:1] * 0 + 1]),
            w,
            ValueError,
            ["expert_out", f"R={R}", f"got {R + 1} rows"],
        )
    if kind == "rows_too_few":
        return recv_x[1:], w, ValueError, ["expert_out", f"R={R}", f"got {R - 1} rows"]
    if kind == "w_shape":
        return (
            recv_x,
            w[:, :1],
            ValueError,
            ["topk_weights", f"{list(w.shape)}", f"got {list(w[:, :1].shape)}"],
        )
    if kind == "w_int":
        return recv_x, w.long(), TypeError, ["topk_weights", "floating point", "torch.int64"]
    if kind == "w_meta":
        return recv_x, w.to("meta"), ValueError, ["topk_weights is on meta", "cpu", "same device"]
    if kind == "eo_meta":
        return recv_x.to("meta"), w, ValueError, ["expert_out is on meta", "cpu", "same device"]
    if kind == "eo_int":
        return recv_x.long(), w, TypeError, ["expert_out", "floating point", "torch.int64"]
    raise AssertionError(kind)


def one_bad_rank_combine(bad_rank: int, kind: str, sum_per_rank: bool = False) -> str:
    """Only ``bad_rank`` passes bad input to combine: every rank raises (CPU), then it works.
    With ``sum_per_rank`` the slots (K = W + 2) are summed per rank."""
    r, W = rank_and_world()
    inp, spec = _good(W, seed=4)
    if sum_per_rank:
        spec = dataclasses.replace(spec, K=W + 2)
        inp = make_inputs(spec, W)
    E = inp.num_experts
    recv_x, handle = moe_ops.dispatch(inp.xs[r], inp.idxs[r], E, sum_per_rank=sum_per_rank)
    assert recv_x.shape[0] > 1
    eo, w = recv_x, inp.ws[r]
    if r == bad_rank:
        eo, w, exc_type, fragments = _bad_combine_input(kind, recv_x, w)
    else:
        exc_type, fragments = moe_ops.PeerInputError, [f"rank(s) [{bad_rank}]", "combine"]
    with pytest.raises(exc_type) as info:
        moe_ops.combine(eo, handle, w)
    assert not isinstance(info.value, RuntimeError)
    _check_message(info.value, fragments)
    out = moe_ops.combine(recv_x, handle, inp.ws[r])
    ref = reference_dispatch(inp.xs, inp.idxs, inp.num_experts)
    want = reference_combine([rx for rx, _ in ref], inp.idxs, inp.num_experts, inp.ws)[r]
    if sum_per_rank:
        torch.testing.assert_close(out, want, **_sum_tol(spec.dtype))
    else:
        assert torch.equal(out, want)
    _next_call_works(inp, spec, r)
    return type(info.value).__name__


def handle_from_other_group() -> None:
    """combine(..., group=g) with a handle from dispatch on another group raises on every rank."""
    r, W = rank_and_world()
    inp, spec = _good(W)
    other = dist.new_group(list(range(W)))
    recv_x, handle = moe_ops.dispatch(inp.xs[r], inp.idxs[r], inp.num_experts)
    with pytest.raises(ValueError) as info:
        moe_ops.combine(recv_x, handle, inp.ws[r], group=other)
    _check_message(
        info.value,
        [
            "handle",
            repr(handle.group_name),
            repr(other.group_name),
            "pass the group that dispatch used",
        ],
    )
    pair = dist.new_group([0, 1])
    if r in (0, 1):
        small = make_inputs(Spec(T=(3, 2), K=1, E_l=2, H=4, Hp=4), 2)
        recv_s, handle_s = moe_ops.dispatch(small.xs[r], small.idxs[r], 4, group=pair)
        with pytest.raises(ValueError) as info:
            moe_ops.combine(recv_s, handle_s)
        _check_message(
            info.value,
            [
                f"({2} ranks)",
                f"({W} ranks)",
                repr(pair.group_name),
                "pass the group that dispatch used",
            ],
        )
    _next_call_works(inp, spec, r)


def handle_from_other_world(world_size: int) -> None:
    """A handle whose recorded world does not match its group's size raises on every rank."""
    r, W = rank_and_world()
    inp, spec = _good(W)
    recv_x, handle = moe_ops.dispatch(inp.xs[r], inp.idxs[r], inp.num_experts)
    forged = dataclasses.replace(handle, world_size=world_size)
    with pytest.raises(ValueError) as info:
        moe_ops.combine(recv_x, forged, inp.ws[r])
    _check_message(info.value, [f"{W} ranks", f"({world_size} ranks)"])
    _next_call_works(inp, spec, r)


def num_experts_not_divisible() -> None:
    W = dist.get_world_size()
    x, idx = torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError) as info:
        moe_ops.dispatch(x, idx, W + 1)
    _check_message(info.value, ["num_experts", f"group size {W}", f"got {W + 1}"])


def one_bad_rank_combine_nan(bad_rank: int) -> None:
    """On CUDA a bad combine input raises on its rank only; peers get NaN for its rows, no hang."""
    r, W = rank_and_world()
    inp, spec = _good(W, seed=6)  # at W = 2 each rank has tokens with and without a bad-rank pair
    dev = device()
    recv_x, handle = moe_ops.dispatch(inp.xs[r].to(dev), inp.idxs[r].to(dev), inp.num_experts)
    w = inp.ws[r].to(dev)
    if r == bad_rank:
        with pytest.raises(ValueError, match="expert_out"):
            moe_ops.combine(recv_x[1:], handle, w)
    else:
        out = moe_ops.combine(recv_x, handle, w).cpu()
        E_l = inp.num_experts // W
        from_bad = ((inp.idxs[r] // E_l == bad_rank) & (inp.idxs[r] >= 0)).any(1)
        assert from_bad.any() and (~from_bad).any()
        assert out[from_bad].isnan().all() and not out[~from_bad].isnan().any()
    _next_call_works(inp, spec, r)


# ----------------------------------------------------------------------------- capacity mode
def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 1 else t


def _dropped_ids(idxs: list[torch.Tensor], E: int, capacity: int) -> list[torch.Tensor]:
    """Every rank's topk_idx with the pairs that do not fit set to -1, written from the contract:
    receiver d takes its pairs by local expert, then source rank, token, slot; positions >= C
    do not fit."""
    W = len(idxs)
    E_l = E // W
    out = [_as_2d(i).clone() for i in idxs]
    for d in range(W):
        pos = 0
        for e in range(d * E_l, (d + 1) * E_l):
            for s, idx in enumerate(idxs):
                for t, k in torch.nonzero(_as_2d(idx) == e).tolist():
                    if pos >= capacity:
                        out[s][t, k] = -1
                    pos += 1
    return [o.view(i.shape) for o, i in zip(out, idxs, strict=True)]


def _padded_expert_fn(recv_x, tokens_per_expert, Hp):
    """``expert_fn`` over all C rows: the padding rows form one more group (never read back)."""
    pad = (recv_x.shape[0] - tokens_per_expert.sum()).view(1)
    return expert_fn(recv_x, torch.cat([tokens_per_expert, pad]), Hp)


def fixed_case(
    spec: Spec, capacity, drop: bool, transport: str | None = None, sum_per_rank: bool = False
) -> int:
    """Capacity-mode dispatch + experts + combine + backward against the reference (with the
    dropped pairs removed): dispatch and (without ``sum_per_rank``) combine bit for bit. Returns
    this rank's ``num_dropped``."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    E = inp.num_experts
    T = inp.xs[r].shape[0]
    K = spec.K
    C = W * T * K if capacity == "worst-case" else capacity
    kept_idxs = _dropped_ids(inp.idxs, E, C)
    want_dropped = int(((_as_2d(inp.idxs[r]) >= 0) & (_as_2d(kept_idxs[r]) < 0)).sum())

    x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
    w = None if inp.ws is None else inp.ws[r].to(dev, copy=True).requires_grad_(True)
    overflow = "drop" if drop else "error"
    recv_x, handle = moe_ops.dispatch(
        x,
        inp.idxs[r].to(dev),
        E,
        capacity=capacity,
        overflow=overflow,
        transport=transport,
        sum_per_rank=sum_per_rank,
    )
    assert handle.transport == (transport or ("local" if W == 1 else "padded"))
    per_rank = handle.layout.sums_per_rank
    assert per_rank == (sum_per_rank and W > 1 and K > 1 and handle.transport in ("padded", "p2p"))
    expert_out = _padded_expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
    out = moe_ops.combine(expert_out, handle, w)

    ref_xs = [t.clone().requires_grad_(True) for t in inp.xs]
    ref_ws = None if inp.ws is None else [t.clone().requires_grad_(True) for t in inp.ws]
    ref_disp = reference_dispatch(ref_xs, kept_idxs, E)
    ref_eo = [expert_fn(rx, tpe, spec.Hp) for rx, tpe in ref_disp]
    ref_out = reference_combine(ref_eo, kept_idxs, E, ref_ws)

    R = ref_disp[r][0].shape[0]
    assert recv_x.shape == (C, spec.H) and handle.capacity == C
    assert handle.num_dropped.device == dev and int(handle.num_dropped) == want_dropped
    assert torch.equal(handle.tokens_per_expert.cpu(), ref_disp[r][1])
    assert torch.equal(recv_x[:R].detach().cpu(), ref_disp[r][0].detach())
    assert not recv_x[R:].any()
    assert out.shape == (T, spec.Hp)
    if per_rank:
        torch.testing.assert_close(out.detach().cpu(), ref_out[r].detach(), **_sum_tol(spec.dtype))
    else:
        assert torch.equal(out.detach().cpu(), ref_out[r].detach())

    g = torch.Generator().manual_seed(spec.seed + 17)
    grads_out = [
        torch.randn(o.shape, generator=g, dtype=torch.float64).to(spec.dtype) for o in ref_out
    ]
    out.backward(grads_out[r].to(dev))
    live = [(o, go) for o, go in zip(ref_out, grads_out, strict=True) if o.requires_grad]
    if live:
        torch.autograd.backward([o for o, _ in live], [go for _, go in live])
    tol = _sum_tol(spec.dtype) if per_rank else _bwd_tol(spec.dtype)
    ref_gx = ref_xs[r].grad if ref_xs[r].grad is not None else torch.zeros_like(ref_xs[r])
    torch.testing.assert_close(x.grad.cpu(), ref_gx, **tol)
    if w is not None:
        ref_gw = ref_ws[r].grad if ref_ws[r].grad is not None else torch.zeros_like(ref_ws[r])
        torch.testing.assert_close(w.grad.cpu(), ref_gw, **tol)
    return want_dropped


def exact_capacity(spec: Spec, W: int) -> int:
    """The largest number of rows any rank receives: the smallest capacity that drops nothing."""
    inp = make_inputs(spec, W)
    return max(rx.shape[0] for rx, _ in reference_dispatch(inp.xs, inp.idxs, inp.num_experts))


# ----------------------------------------------------------------------------- CUDA settings
def triton_kernels(on: bool):
    """A test's ``triton`` parameter as a kernel choice: with ``on=False`` the plain torch kernels
    run on CUDA too; nothing changes with ``on=True`` or without CUDA."""
    return moe_ops.use_kernels("auto" if on else "torch")


def with_kernels(on: bool, fn, *args, **kwargs):
    """``fn(*args)`` under :func:`triton_kernels` ``(on)``."""
    with triton_kernels(on):
        return fn(*args, **kwargs)


_SYNC_WARNING = "called a synchronizing CUDA operation"


def cuda_syncs(fn) -> tuple[object, list[str]]:
    """``(fn(), where it synchronized)``: the synchronizing CUDA operations ``fn`` made, as
    ``"file:line"`` of the warnings of ``torch.cuda.set_sync_debug_mode("warn")``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [f"{w.filename}:{w.lineno}" for w in caught if _SYNC_WARNING in str(w.message)]


# ----------------------------------------------------------------------------- sum_per_rank
def _sum_tol(dtype: torch.dtype) -> dict:
    """Per-rank sums round each rank's partial sum to the dtype before the sum over ranks."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
        torch.float16: dict(rtol=4e-3, atol=4e-3),
    }[dtype]


def per_rank_sums(spec: Spec, capacity=None) -> dict:
    """dispatch(sum_per_rank=True) + combine against the reference, forward and backward, and
    the rows each exchange moved (``[rows sent, rows received, width]`` per all-to-all, in call
    order). With ``capacity``: the capacity mode, at a capacity that drops nothing."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    E = inp.num_experts
    x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
    w = None if inp.ws is None else inp.ws[r].to(dev, copy=True).requires_grad_(True)
    moved = []

    def a2a(out, inp_, out_splits, in_splits, group, async_op=False):
        moved.append([inp_.shape[0], out.shape[0], inp_.shape[1]])
        return real(out, inp_, out_splits, in_splits, group, async_op)

    real = _comm.all_to_all
    with mock.patch.object(_comm, "all_to_all", a2a):
        recv_x, handle = moe_ops.dispatch(
            x, inp.idxs[r].to(dev), E, capacity=capacity, sum_per_rank=True
        )
        n_dispatch = len(moved)
        if capacity is None:
            expert_out = expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
        else:
            expert_out = _padded_expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
        out = moe_ops.combine(expert_out, handle, w)
        n_combine = len(moved) - n_dispatch
        g = torch.Generator().manual_seed(spec.seed + 17)
        grads_out = [
            torch.randn((t.shape[0], spec.Hp), generator=g, dtype=torch.float64).to(spec.dtype)
            for t in inp.xs
        ]
        out.backward(grads_out[r].to(dev))
    n_backward = len(moved) - n_dispatch - n_combine

    ref_xs = [t.clone().requires_grad_(True) for t in inp.xs]
    ref_ws = None if inp.ws is None else [t.clone().requires_grad_(True) for t in inp.ws]
    ref_disp = reference_dispatch(ref_xs, inp.idxs, E)
    ref_eo = [expert_fn(rx, tpe, spec.Hp) for rx, tpe in ref_disp]
    ref_out = reference_combine(ref_eo, inp.idxs, E, ref_ws)
    R = ref_disp[r][0].shape[0]
    assert torch.equal(recv_x[:R].detach().cpu(), ref_disp[r][0].detach())
    assert not recv_x[R:].any()  # the capacity mode's padding
    assert out.dtype == spec.dtype and out.shape == (inp.xs[r].shape[0], spec.Hp)
    torch.testing.assert_close(out.detach().cpu(), ref_out[r].detach(), **_sum_tol(spec.dtype))
    live = [(o, go) for o, go in zip(ref_out, grads_out, strict=True) if o.requires_grad]
    if live:
        torch.autograd.backward([o for o, _ in live], [go for _, go in live])
    ref_gx = ref_xs[r].grad if ref_xs[r].grad is not None else torch.zeros_like(ref_xs[r])
    torch.testing.assert_close(x.grad.cpu(), ref_gx, **_sum_tol(spec.dtype))
    if w is not None:
        ref_gw = ref_ws[r].grad if ref_ws[r].grad is not None else torch.zeros_like(ref_ws[r])
        torch.testing.assert_close(w.grad.cpu(), ref_gw, **_sum_tol(spec.dtype))
    res = dict(moved=moved, calls=(n_dispatch, n_combine, n_backward))
    if capacity is None:
        res["token_rows"] = int(handle.layout.token_send_splits.sum()) if W > 1 else 0
        res["pairs"] = int(handle.layout.send_splits.sum())
    return res


@contextlib.contextmanager
def watch_buffers(calls: list[tuple[object, str]], patience: float = 2.0):
    """Within the block, each of ``calls`` (``(owner, name)`` pairs, patched) records how many
    buffers an earlier watched call returned (the first tensor of a tuple) are still alive, its
    own inputs not counted; yields that list."""
    import time
    import weakref

    alive, outputs = [], []

    def watched(real):
        def call(*args, **kwargs):
            inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}

            def others():
                return [ref for ref in outputs if ref() is not None and id(ref()) not in inputs]

            # the collective's Work may hold its tensors a moment longer, on the process group's
            # thread: wait for that, but not for a reference this thread keeps
            deadline = time.monotonic() + patience
            while others() and time.monotonic() < deadline:
                time.sleep(0.01)
            alive.append(len(others()))
            out = real(*args, **kwargs)
            outputs.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
            return out

        return call

    with contextlib.ExitStack() as stack:
        for owner, name in calls:
            stack.enter_context(mock.patch.object(owner, name, watched(getattr(owner, name))))
        yield alive


def buffers_alive(spec: Spec, capacity=None) -> list[int]:
    """Forward dispatch(sum_per_rank=True) + combine. Combine sums per rank (``combine_rows``),
    sends the sums (the default mode's ``start_rows_back``), then sums what came back (in
    rounds, for large payloads, once per round). At each of these calls: how many buffers an
    earlier one returned are still alive, the call's own inputs not counted. Each one must be
    freed once used, or the next comes on top of it at the peak."""
    from moe_ops import _kernels

    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    kern = _kernels.for_device(dev)
    x, idx = inp.xs[r].to(dev), inp.idxs[r].to(dev)
    w = None if inp.ws is None else inp.ws[r].to(dev)
    with torch.no_grad():
        recv_x, handle = moe_ops.dispatch(
            x, idx, inp.num_experts, capacity=capacity, sum_per_rank=True
        )
        with watch_buffers([(kern, "combine_rows"), (_comm, "start_rows_back")]) as alive:
            out = moe_ops.combine(recv_x * 2, handle, w)
    assert out.shape == x.shape
    return alive


def in_rounds(fn, *args, **kwargs):
    """``fn(*args)`` with combine summing per rank in rounds whatever the size: W rounds on
    every rank with tokens (``moe_ops._ops._rounds`` patched), one on the others."""
    from moe_ops import _ops

    with mock.patch.object(_ops, "_rounds", lambda T, row_bytes, W: W if T else 1):
        return fn(*args, **kwargs)


def rounds_equal_one_exchange(spec: Spec) -> int:
    """dispatch(sum_per_rank=True) + combine + backward with and without rounds: the same bits.
    Returns the rounds this rank's layout had."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    results = []
    for fn in (lambda f: f(), lambda f: in_rounds(f)):

        def run():
            x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
            w = inp.ws[r].to(dev, copy=True).requires_grad_(True)
            recv_x, handle = moe_ops.dispatch(
                x, inp.idxs[r].to(dev), inp.num_experts, sum_per_rank=True
            )
            out = moe_ops.combine(expert_fn(recv_x, handle.tokens_per_expert, spec.Hp), handle, w)
            g = torch.Generator().manual_seed(spec.seed + r)
            out.backward(torch.randn(out.shape, generator=g).to(out.dtype).to(dev))
            splits = handle.layout.round_splits
            rounds = max(1, int((splits[1, :, 0] >= 0).sum()))
            return out.detach(), x.grad, w.grad, rounds

        results.append(fn(run))
    (a, gxa, gwa, one), (b, gxb, gwb, rounds) = results
    assert one == 1
    assert torch.equal(a, b) and torch.equal(gxa, gxb) and torch.equal(gwa, gwb)
    return rounds


def per_rank_disagree(capacity=None, what: str = "option") -> str:
    """Rank 0 asks for per-rank sums, the others not (``what="option"``), or every rank does
    with a K of its own (``"K"``, capacity mode): every rank raises before any row moves, and
    the next call works."""
    r, W = rank_and_world()
    inp, spec = _good(W, seed=6)
    same_T = {} if capacity is None else dict(T=(6,))  # the capacity mode's symmetric buffers
    inp = make_inputs(dataclasses.replace(spec, K=W + 2, **same_T), W)
    args = (inp.xs[r], inp.idxs[r], inp.num_experts)
    with pytest.raises(ValueError) as info:
        if what == "K":
            idx = inp.idxs[r][:, : 2 + r]
            moe_ops.dispatch(args[0], idx, args[2], capacity=capacity, sum_per_rank=True)
        else:
            moe_ops.dispatch(*args, capacity=capacity, sum_per_rank=r == 0)
    recv_x, handle = moe_ops.dispatch(*args, capacity=capacity, sum_per_rank=True)
    out = moe_ops.combine(recv_x, handle, inp.ws[r])
    assert out.shape == inp.xs[r].shape
    return str(info.value)


def fixed_fake_matches_real(spec: Spec, capacity: int, sum_per_rank: bool) -> None:
    """The capacity-mode ops' fake kernels against the real ones on this rank's inputs: the same
    shapes and dtypes for dispatch, combine and combine's backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_ops import _capacity_ops

    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    group = torch.distributed.group.WORLD
    static = (capacity, group.group_name, W, "padded")
    x, idx, w = inp.xs[r], inp.idxs[r], inp.ws[r]
    args = (x, idx, inp.num_experts, capacity, True, *static[1:], sum_per_rank)
    real_d = _capacity_ops.DispatchOutputs(*torch.ops.moe_ops.dispatch_fixed(*args))
    eo = real_d.recv_x * 2
    real_c = torch.ops.moe_ops.combine_fixed(eo, w, *real_d.layout(), *static)
    g = torch.ones(x.shape[0], eo.shape[1], dtype=eo.dtype)
    real_b = torch.ops.moe_ops._combine_fixed_backward(
        g, *_capacity_ops._for_backward(eo, w, real_c[1], real_d.layout(), static),
        *real_d.layout(), *static,
    )  # fmt: skip
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = lambda t: mode.from_tensor(t)  # noqa: E731
        fargs = (fake(x), fake(idx), *args[2:])
        fake_d = _capacity_ops.DispatchOutputs(*torch.ops.moe_ops.dispatch_fixed(*fargs))
        feo = fake_d.recv_x * 2
        fake_c = torch.ops.moe_ops.combine_fixed(feo, fake(w), *fake_d.layout(), *static)
        fake_b = torch.ops.moe_ops._combine_fixed_backward(
            fake(g),
            *_capacity_ops._for_backward(feo, fake(w), fake_c[1], fake_d.layout(), static),
            *fake_d.layout(), *static,
        )  # fmt: skip
    assert real_d.layout().sums_per_rank == (sum_per_rank and spec.K > 1)
    for name, a, b in zip(
        [*real_d._fields, "out", "returned", "grad_eo", "grad_w"],
        [*real_d, *real_c, *real_b],
        [*fake_d, *fake_c, *fake_b],
        strict=True,
    ):
        assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype), name


# ----------------------------------------------------------------------------- slot-order rounds
PAIR_ROUNDS_BY_RANK = (3, 1, 2, 4)  # rank r's rounds when forced, at most one per token


@contextlib.contextmanager
def forced_pair_rounds(rounds: int):
    """Within the block the slot-order combine gets its rows back in ``rounds`` rounds of this
    rank's tokens (at most one per token) whatever the size, as if ``low_memory=True`` had been
    passed to dispatch."""
    from moe_ops import _ops

    real = _ops._dispatch_group

    def low_memory_group(*args):
        return real(*args[:-1], True)

    with (
        mock.patch.object(_ops, "_pair_rounds", lambda T, K, row_bytes: max(1, min(rounds, T))),
        mock.patch.object(_ops, "_dispatch_group", low_memory_group),
    ):
        yield


def in_pair_rounds(fn, *args, **kwargs):
    """``fn(*args)`` with :func:`forced_pair_rounds`: rank r has ``PAIR_ROUNDS_BY_RANK[r % 4]``
    rounds (a rank with one round still takes part in the others' rounds)."""
    r = rank_and_world()[0]
    with forced_pair_rounds(PAIR_ROUNDS_BY_RANK[r % len(PAIR_ROUNDS_BY_RANK)]):
        return fn(*args, **kwargs)


def rounds_need_low_memory(spec: Spec) -> list[int]:
    """The rounds of a large-enough payload (the size policy patched to 3 rounds) without and
    with ``low_memory=True``."""
    from moe_ops import _ops

    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    got = []
    with mock.patch.object(_ops, "_pair_rounds", lambda T, K, row_bytes: 3):
        for low_memory in (False, True):
            _, handle = moe_ops.dispatch(
                inp.xs[r], inp.idxs[r], inp.num_experts, low_memory=low_memory
            )
            got.append(max(1, int((handle.layout.round_splits[1, :, 0] >= 0).sum())))
    return got


def pair_rounds_equal_one_exchange(spec: Spec) -> dict:
    """Default-mode dispatch + combine + backward, in rounds and in one exchange: the same bits
    (output, both gradients; and the output without grad, when the rows are not kept). Returns
    the rounds of the call, its collectives (dispatch, combine, backward) and whether combine
    kept the rows that came back."""
    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    dev = device()
    a2a = mock.patch.object(_comm, "all_to_all", wraps=_comm.all_to_all)
    results = []
    for fn in (lambda f: f(), lambda f: in_pair_rounds(f)):

        def run():
            x = inp.xs[r].to(dev, copy=True).requires_grad_(True)
            w = None if inp.ws is None else inp.ws[r].to(dev, copy=True).requires_grad_(True)
            idx = inp.idxs[r].to(dev)
            with a2a as calls:
                recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
                n_dispatch = calls.call_count
                eo = expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
                out = moe_ops.combine(eo, handle, w)
                n_combine = calls.call_count - n_dispatch
                g = torch.Generator().manual_seed(spec.seed + r)
                out.backward(torch.randn(out.shape, generator=g).to(out.dtype).to(dev))
                n_backward = calls.call_count - n_dispatch - n_combine
            with torch.no_grad():
                recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
                eo = expert_fn(recv_x, handle.tokens_per_expert, spec.Hp)
                no_grad = moe_ops.combine(eo, handle, w)
            lay = handle.layout
            rounds = max(1, int((lay.round_splits[1, :, 0] >= 0).sum()))
            R = recv_x.shape[0]
            # the shapes the fake kernel gives
            assert tuple(lay.round_splits.shape) == (2, max(W, 8), W)
            assert lay.round_pos.shape in ((0, spec.K), (x.shape[0], spec.K))
            assert lay.round_rows.shape[0] in (0, R + W)
            assert (lay.round_rows.shape[0] > 0) == (rounds > 1)
            grads = (x.grad, None if w is None else w.grad)
            calls = (n_dispatch, n_combine, n_backward)
            return out.detach(), no_grad, grads, rounds, calls

        results.append(fn(run))
    (a, a0, ga, one, calls_one), (b, b0, gb, rounds, calls) = results
    assert one == 1
    assert torch.equal(a, b) and torch.equal(a0, b0) and torch.equal(a, a0)
    for u, v in zip(ga, gb, strict=True):
        assert (u is None and v is None) or torch.equal(u, v)
    ref = reference_dispatch(inp.xs, inp.idxs, inp.num_experts)
    eos = [expert_fn(rx, tpe, spec.Hp) for rx, tpe in ref]
    assert torch.equal(a.cpu(), reference_combine(eos, inp.idxs, inp.num_experts, inp.ws)[r])
    return dict(rounds=rounds, calls_one=calls_one, calls=calls)


def pair_round_buffers_alive(spec: Spec) -> list[int]:
    """Forward dispatch + combine in slot order, in rounds, without grad: at each gather of a
    round's rows and each start of its exchange, how many buffers an earlier call returned are
    still alive (the call's own inputs not counted)."""
    from moe_ops import _kernels

    r, W = rank_and_world()
    inp = make_inputs(spec, W)
    kern = _kernels.for_device(device())
    x, idx, w = inp.xs[r], inp.idxs[r], inp.ws[r]
    with torch.no_grad():
        recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
        eo = recv_x * 2
        calls = [(kern, "gather_rows"), (_comm, "start_rows_back")]
        with watch_buffers(calls, patience=0.3) as alive:
            out = moe_ops.combine(eo, handle, w)
    assert out.shape == x.shape
    return alive


def rows_not_kept_for_weight_grad() -> str:
    """combine run directly with ``keep_rows=False`` while the weights need a gradient: the
    backward raises (it would otherwise be zero); the API keeps the rows then."""
    r, W = rank_and_world()
    inp, spec = _good(W)
    x, idx = inp.xs[r], inp.idxs[r]
    w = inp.ws[r].clone().requires_grad_(True)
    recv_x, handle = moe_ops.dispatch(x, idx, inp.num_experts)
    group = dist.group.WORLD
    args = (*handle.layout, group.group_name, W)
    out, kept = torch.ops.moe_ops.combine(recv_x * 2, w, *args, False, False)
    assert kept.shape[0] == 0
    with pytest.raises(RuntimeError) as info:
        out.sum().backward()
    out, kept = torch.ops.moe_ops.combine(recv_x * 2, w, *args)  # keep_rows=True by default
    assert kept.shape[0] == handle.layout.send_pair_idx.shape[0] + W
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    return str(info.value)
