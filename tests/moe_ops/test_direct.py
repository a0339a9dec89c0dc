"""``moe_ops.dispatch`` and ``moe_ops.combine`` in plain eager code run the ops' implementations
directly (``moe_ops._autograd.Direct``), without the dispatcher; whatever needs the dispatcher
(tracing, fake or meta tensors, subclasses, torch function or dispatch modes, functorch) goes
through the registered ops. Both ways give the same outputs and gradients, bit for bit, in both
modes, at W = 1 and on a gloo world of 2.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import moe_ops
from moe_ops import _autograd, _capacity_ops, _ops
from tests.moe_ops._cases import Spec, make_inputs, rank_and_world

_SPEC = Spec(T=(7,), K=3, E_l=2, H=6, Hp=6, seed=11)  # capacity "worst-case": same T
_OPS = (
    _ops.dispatch_op,
    _ops.combine_op,
    _ops.combine_backward_op,
    _capacity_ops.dispatch_fixed_op,
    _capacity_ops.combine_fixed_op,
    _capacity_ops.combine_fixed_backward_op,
)


class _Passthrough(TorchFunctionMode):
    """A torch function mode that changes nothing: the ops must go through the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_op_calls():
    """Counts calls of the registered custom ops (``CustomOpDef.__call__``)."""
    calls = []
    cls = type(_ops.dispatch_op)
    real = cls.__call__

    def counting(self, *args, **kwargs):
        if any(self is op for op in _OPS):
            calls.append(self)
        return real(self, *args, **kwargs)

    with mock.patch.object(cls, "__call__", counting):
        yield calls


def _round(mode: str, through_ops: bool) -> tuple[list[torch.Tensor], int, int]:
    """Forward and backward in plain eager code, or with every call sent through the
    dispatcher; returns the results and the op calls of the forward and of the backward."""
    r, W = rank_and_world()
    inp = make_inputs(_SPEC, W)
    x = inp.xs[r].clone().requires_grad_(True)
    w = inp.ws[r].clone().requires_grad_(True)
    kwargs = {} if mode == "default" else dict(capacity="worst-case")
    g = torch.randn((x.shape[0], _SPEC.H), generator=torch.Generator().manual_seed(r))
    forced = (
        functools.partial(mock.patch.object, _autograd, "_direct_ok", return_value=False)
        if through_ops
        else contextlib.nullcontext
    )
    with _count_op_calls() as calls:
        with forced():
            recv_x, handle = moe_ops.dispatch(x, inp.idxs[r], inp.num_experts, **kwargs)
            out = moe_ops.combine(recv_x * 2 + 0.5, handle, w)  # capacity mode: padding rows too
        n_forward = len(calls)
        with forced():
            gx, gw = torch.autograd.grad(out, (x, w), g)
        n_backward = len(calls) - n_forward
    return [recv_x.detach(), out.detach(), gx, gw, handle.tokens_per_expert], n_forward, n_backward


def direct_matches_ops_case(mode: str) -> None:
    direct, *n_direct = _round(mode, through_ops=False)
    via_ops, *n_ops = _round(mode, through_ops=True)
    assert n_direct == [0, 0], f"eager calls went through the dispatcher: {n_direct}"
    # forward: dispatch, combine; backward: combine's backward, and combine for dispatch's
    assert n_ops == [2, 2], f"through the dispatcher expected 2 + 2 op calls, got {n_ops}"
    for a, b in zip(direct, via_ops, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["default", "capacity"])
def test_direct_matches_ops_single_rank(mode):
    direct_matches_ops_case(mode)


@pytest.mark.parametrize("mode", ["default", "capacity"])
def test_direct_matches_ops_two_ranks(gloo_world, mode):
    gloo_world(2).run(direct_matches_ops_case, mode)


def test_without_grad_the_implementation_runs_bare():
    """No input needs a gradient: no autograd.Function either (nothing to record)."""
    x, idx = torch.randn(5, 4), torch.tensor([[0, 1], [1, -1], [0, 0], [1, 1], [-1, -1]])
    with mock.patch.object(_ops.DIRECT.dispatch.function, "apply") as apply:
        recv_x, _ = moe_ops.dispatch(x, idx, 2)
    apply.assert_not_called()
    assert recv_x.shape == (7, 4) and not recv_x.requires_grad
    recv_x, _ = moe_ops.dispatch(x.requires_grad_(True), idx, 2)
    assert recv_x.grad_fn is not None and "dispatch" in type(recv_x.grad_fn).__name__


def test_a_torch_function_mode_sends_calls_through_the_dispatcher():
    x, idx = torch.randn(5, 4), torch.tensor([[0, 1], [1, -1], [0, 0], [1, 1], [-1, -1]])
    with _count_op_calls() as calls, _Passthrough():
        recv_x, handle = moe_ops.dispatch(x, idx, 2)
        moe_ops.combine(recv_x, handle)
    assert calls == [_ops.dispatch_op, _ops.combine_op]


def test_what_needs_the_dispatcher():
    plain = (torch.randn(3, 2), 4, "name")
    assert _autograd._direct_ok(plain)
    assert not _autograd._direct_ok((torch.empty(3, 2, device="meta"),))
    with FakeTensorMode() as fake:
        assert not _autograd._direct_ok((fake.from_tensor(torch.randn(3, 2)),))
    with _Passthrough():
        assert not _autograd._direct_ok(plain)
    assert not torch.func.vmap(lambda t: torch.tensor(_autograd._direct_ok((t,))))(plain[0]).any()
    compiled = torch.compile(lambda t: t + int(_autograd._direct_ok((t,))), backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.zeros(2))
