"""What the default mode (``moe_ops._ops``) and the capacity mode (``moe_ops._capacity_ops``)
share: the autograd formulas, the combine tail and the weight gradient.

Both modes have three ops of the same shape: ``dispatch``, ``combine`` and combine's backward.
Their combine takes ``(expert_out, topk_weights, *layout, *static, unweighted=False)`` (with
``unweighted`` every rank passes no weights, so none need travel) and returns
``(out, returned_rows)``; their combine backward takes ``(grad_out, returned_rows or None,
topk_weights, *layout, *static)`` and returns ``(grad_expert_out, grad_topk_weights)``. ``layout``
is the mode's tuple of tensors that dispatch computed (its first is ``pair_pos``), ``static`` the
mode's ints and strings (group, world size, ...). A :class:`Mode` says how to find them, and
:func:`register` gives both ops their autograd:

* dispatch's backward is the mode's combine without weights, called with ``unweighted=True``
  (every rank passes None there, so a combine that sums per rank need not send the ones);
* combine's backward is the mode's combine-backward op. It needs the rows that came back to this
  rank (``returned_rows``) for the weight gradient, or ``expert_out`` itself when no row moved.

Each backward runs with the kernel choice (``moe_ops.use_kernels``) its forward ran with.

:func:`register` also returns the mode's :class:`Direct` calls, which the Python API (and the
backward formulas, for combine and combine's backward) use: in plain eager code they run the
ops' implementations straight away (through a ``torch.autograd.Function`` with the same
formulas when a gradient is wanted), without the dispatcher's trip through the custom op's
autograd and backend wrappers, which cost 55-165 us of host time per call on the hosts
measured (docs/notes_gpu.md). Anything the dispatcher is needed for (torch.compile tracing,
fake or meta tensors, tensor subclasses, torch function or dispatch modes, functorch
transforms) goes through the registered op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moe_ops import _kernels
from moe_ops._layout import acc_dtype


@dataclasses.dataclass(frozen=True)
class Mode:
    """How one mode's ops fit the shared formulas.

    combine, combine_backward: the mode's ops (see the module docstring).
    num_layout: how many layout tensors combine takes after ``topk_weights``.
    num_static: how many non-tensor arguments combine takes after the layout (then, optionally,
        ``unweighted``: see :func:`register`).
    dispatch_layout: dispatch's outputs -> the layout tensors, in combine's order.
    dispatch_static: dispatch's inputs -> combine's non-tensor arguments after the layout.
    for_backward: ``(expert_out, topk_weights, returned_rows, layout, static)`` -> what combine
        saves for its backward, ``(rows, weights)``: the mode's combine backward takes them as
        its ``returned_rows`` (when the weight gradient is wanted) and ``topk_weights``. Mostly
        ``(returned_rows, topk_weights)``; ``expert_out`` when no row left this rank.
    """

    combine: Any
    combine_backward: Any
    num_layout: int
    num_static: int
    dispatch_layout: Callable[[tuple], tuple]
    dispatch_static: Callable[[tuple], tuple]
    for_backward: Callable[[Tensor, Tensor | None, Tensor, tuple, tuple], tuple]


@dataclasses.dataclass(frozen=True)
class _DirectOp:
    """One op called directly where nothing needs the dispatcher (see the module docstring)."""

    op: Any  # the registered custom op
    impl: Callable  # its implementation
    # the implementation with the op's autograd; None for an op without autograd (combine's
    # backward), which goes through the dispatcher when a gradient is wanted
    function: type[torch.autograd.Function] | None
    name: str  # what profiler traces call it, as they call the op

    def __call__(self, *args):
        if not _direct_ok(args):
            return self.op(*args)
        wants_grad = torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args
        )
        if wants_grad and self.function is None:
            return self.op(*args)
        run = self.function.apply if wants_grad else self.impl
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(self.name):
                return run(*args)
        return run(*args)


_PLAIN = (Tensor, torch.nn.Parameter)


def _direct_ok(args: tuple) -> bool:
    """True in plain eager code: not tracing, no torch function or dispatch mode, no functorch
    transform, and only plain tensors on real devices."""
    if (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    return all(type(a) in _PLAIN and not a.is_meta for a in args if isinstance(a, Tensor))


@dataclasses.dataclass(frozen=True)
class Direct:
    """A mode's dispatch and combine as the Python API calls them: ``dispatch(*inputs)`` and
    ``combine(*inputs)`` take the ops' arguments and return their outputs."""

    dispatch: _DirectOp
    combine: _DirectOp


def _function(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """The op's autograd as a ``torch.autograd.Function`` whose forward takes ``ctx`` and runs
    ``setup_context`` itself: a Function with a separate ``setup_context`` binds its arguments
    to forward's signature (``inspect.signature``) on every ``apply``: in a CPU microbenchmark
    (5 inputs, 15 outputs, an implementation of 18 us) ``apply`` took 73 us that way and 36 us
    this way. ``setup_context`` sees the inputs as passed; the shared formulas index only the
    arguments every caller passes."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(
        name.split("::")[-1],
        (torch.autograd.Function,),
        dict(forward=staticmethod(forward), backward=staticmethod(backward)),
    )


def register(
    dispatch_op: Any,
    mode: Mode,
    dispatch_impl: Callable,
    combine_impl: Callable,
    combine_backward_impl: Callable,
) -> Direct:
    """Register the autograd formulas of ``dispatch_op`` and ``mode.combine`` (whose
    implementations are ``dispatch_impl``, ``combine_impl``, and ``combine_backward_impl`` for
    ``mode.combine_backward``); returns their direct calls. The backward formulas call combine
    and combine's backward the same way, directly where nothing needs the dispatcher."""

    def dispatch_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*mode.dispatch_layout(output))
        ctx.set_materialize_grads(False)
        ctx.static = mode.dispatch_static(inputs)
        ctx.num_inputs = len(inputs)
        ctx.kernels = _kernels.current()

    def dispatch_backward(ctx, grad_recv_x, *_):
        if grad_recv_x is None:  # recv_x took no part in the loss
            return (None,) * ctx.num_inputs
        with _kernels.use_kernels(ctx.kernels):
            args = (grad_recv_x, None, *ctx.saved_tensors, *ctx.static)
            grad_x, _ = direct.combine(*args, True)  # unweighted on every rank
        return (grad_x,) + (None,) * (ctx.num_inputs - 1)

    def combine_setup_context(ctx, inputs, output):
        expert_out, topk_weights = inputs[:2]
        layout = inputs[2 : 2 + mode.num_layout]
        static = inputs[2 + mode.num_layout : 2 + mode.num_layout + mode.num_static]
        rows, weights = mode.for_backward(expert_out, topk_weights, output[1], layout, static)
        ctx.save_for_backward(rows, weights, *layout)
        # ``returned_rows`` never gets a gradient: without these, autograd (eager, or the
        # compiled backward's tangents) would fill a zero gradient as large as the payload for it
        # on every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.static = static
        ctx.num_inputs = len(inputs)
        ctx.kernels = _kernels.current()

    def combine_backward(ctx, grad_out, _grad_returned):
        rows, weights, *layout = ctx.saved_tensors
        if grad_out is None:  # out took no part in the loss
            return (None,) * ctx.num_inputs
        want_w = weights is not None and ctx.needs_input_grad[1]
        if want_w and rows is None:
            raise RuntimeError(
                "moe_ops.combine: the gradient of topk_weights needs the rows that came back, "
                "which combine ran without (keep_rows=False); moe_ops.combine keeps them when "
                "topk_weights requires grad"
            )
        with _kernels.use_kernels(ctx.kernels):
            grad_expert_out, grad_w = direct_combine_backward(
                grad_out, rows if want_w else None, weights, *layout, *ctx.static
            )
        return (grad_expert_out, grad_w if want_w else None) + (None,) * (ctx.num_inputs - 2)

    dispatch_op.register_autograd(dispatch_backward, setup_context=dispatch_setup_context)
    mode.combine.register_autograd(combine_backward, setup_context=combine_setup_context)

    def direct_op(op, impl, setup_context=None, backward=None) -> _DirectOp:
        name = op._qualname  # "moe_ops::dispatch"...: a profiler trace names the call the same
        fn = None if backward is None else _function(name, impl, setup_context, backward)
        return _DirectOp(op, impl, fn, name)

    direct = Direct(
        dispatch=direct_op(dispatch_op, dispatch_impl, dispatch_setup_context, dispatch_backward),
        combine=direct_op(mode.combine, combine_impl, combine_setup_context, combine_backward),
    )
    direct_combine_backward = direct_op(mode.combine_backward, combine_backward_impl)
    return direct


def combine_tail(
    kern,
    rows_M: Tensor,
    expert_out: Tensor,
    pair_pos_TK: Tensor,
    topk_weights: Tensor | None,
    keep: bool,
) -> tuple[Tensor, Tensor]:
    """combine's outputs from the rows back on this rank: ``out[T, H']``, the weighted sum over
    slots, and ``returned_rows``: the rows themselves with ``keep``, else ``[0, H']`` (no weight
    gradient wanted, or ``rows_M`` is ``expert_out``, which the backward then saves instead)."""
    out = kern.combine_rows(rows_M, pair_pos_TK, topk_weights, expert_out.dtype)
    returned = rows_M if keep else expert_out.new_empty((0, expert_out.shape[1]))
    return out, returned


def weight_grad(
    kern,
    grad_out: Tensor,
    returned_rows: Tensor | None,
    pair_pos_TK: Tensor,
    topk_weights: Tensor | None,
) -> Tensor:
    """``grad_topk_weights[t, k] = <grad_out[t], row(t, k)>``; ``[0, 0]`` when not asked for
    (``returned_rows`` None)."""
    if returned_rows is None:  # the dtype the fake gives it
        dtype = grad_out.dtype if topk_weights is None else topk_weights.dtype
        return grad_out.new_empty((0, 0), dtype=dtype)
    return kern.slot_dot(grad_out, returned_rows, pair_pos_TK, topk_weights.dtype)


def per_rank_weights(
    kern,
    expert_out: Tensor,
    topk_weights: Tensor | None,
    token_pos: Tensor,
    send_rows: int,
    recv_shape: tuple[int, int],
    send: Callable[[Tensor], Tensor],
    unweighted: bool,
    out: Tensor | None = None,
) -> Tensor:
    """The weights of the token rows a combine that sums per rank received (both modes), in the
    accumulation dtype whatever the caller passed (the multiply runs in it anyway), so that every
    rank sends rows of the same size, also when some pass None (ones travel then). With
    ``unweighted`` (every rank passes None: dispatch's backward) nothing travels: ones of
    ``recv_shape``. ``out``: where the rows to send are written (``[send_rows, K]``), if not in
    fresh memory."""
    adt = acc_dtype(expert_out.dtype)
    if unweighted:
        if topk_weights is not None:
            raise ValueError("moe_ops: combine with unweighted=True takes topk_weights=None")
        return expert_out.new_ones(recv_shape, dtype=adt)
    if topk_weights is None:
        topk_weights = expert_out.new_ones((token_pos.shape[0], recv_shape[1]), dtype=adt)
    return send(kern.scatter_rows(topk_weights.to(adt), token_pos, None, send_rows, out=out))


def per_rank_weight_grad(
    kern,
    g_recv: Tensor,
    expert_out: Tensor | None,
    recv_w: Tensor,
    slot_rows: Tensor,
    sum_back: Callable[[Tensor], Tensor],
) -> Tensor:
    """The weight gradient when combine summed per rank (both modes): on the experts' rank each
    received token row's ``[K]`` dot products (``<grad row, expert row>`` per slot, zeros when
    ``expert_out`` is None: not asked for here, but ``sum_back`` is a collective every rank
    runs), which ``sum_back`` brings back and sums over ranks per token (slot k's gradient
    comes from the one rank of its expert; the others send exact zeros); ``[0, 0]`` when not
    asked for."""
    if expert_out is None:
        gw_recv = recv_w.new_zeros(recv_w.shape)
    else:
        gw_recv = kern.slot_dot(g_recv, expert_out, slot_rows, recv_w.dtype)
    grad_w = sum_back(gw_recv)
    return recv_w.new_empty((0, 0)) if expert_out is None else grad_w


def fake_combine(expert_out: Tensor, pair_pos_TK: Tensor, back_rows) -> tuple[Tensor, Tensor]:
    """combine's fake outputs: ``out[T, H']`` and ``returned_rows[back_rows, H']``."""
    H = expert_out.shape[1]
    return expert_out.new_empty((pair_pos_TK.shape[0], H)), expert_out.new_empty((back_rows, H))


def fake_combine_backward(
    grad_out: Tensor,
    returned_rows: Tensor | None,
    topk_weights: Tensor | None,
    pair_pos_TK: Tensor,
    rows,
) -> tuple[Tensor, Tensor]:
    """combine backward's fake outputs: ``grad_expert_out[rows, H']`` and the weight gradient
    (``[T, K]``, or ``[0, 0]`` without ``returned_rows``)."""
    grad_w_shape = (0, 0) if returned_rows is None else tuple(pair_pos_TK.shape)
    grad_w_dtype = grad_out.dtype if topk_weights is None else topk_weights.dtype
    return (
        grad_out.new_empty((rows, grad_out.shape[1])),
        grad_out.new_empty(grad_w_shape, dtype=grad_w_dtype),
    )
