"""Configuration without module state: the kernel choice (``moe_ops.use_kernels``, read per
thread through a ``ContextVar`` and carried into the backward) and the capacity mode's
``transport=`` argument."""

from __future__ import annotations

import ast
import inspect
import pathlib
import threading
from unittest import mock

import pytest
import torch

import moe_ops
from moe_ops import _kernels
from moe_ops._kernels import torch_kernels
from tests.moe_ops._cases import Spec, fixed_case, rank_and_world

_CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU


def _inputs(T=6, K=2, E=4, H=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    idx = torch.randint(-1, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    return x, idx, w, E


# ----------------------------------------------------------------------------- kernel choice
def test_kernels_follow_the_device():
    fused = object()
    with mock.patch.object(_kernels, "_triton_kernels", lambda: fused):
        assert _kernels.for_device(torch.device("cpu")) is torch_kernels
        assert _kernels.for_device(_CUDA) is fused
        with moe_ops.use_kernels("torch"):
            assert _kernels.for_device(_CUDA) is torch_kernels
            with moe_ops.use_kernels("auto"):
                assert _kernels.for_device(_CUDA) is fused
            assert _kernels.for_device(_CUDA) is torch_kernels
        assert _kernels.for_device(_CUDA) is fused
    with mock.patch.object(_kernels, "_triton_kernels", lambda: None):  # no Triton installed
        assert _kernels.for_device(_CUDA) is torch_kernels


def test_use_kernels_rejects_unknown_names():
    want = r"kernels must be one of \('auto', 'torch'\), got 'cuda'"
    with pytest.raises(ValueError, match=want), moe_ops.use_kernels("cuda"):
        pass
    assert _kernels.current() == "auto"


def test_use_kernels_restores_after_an_error():
    with pytest.raises(RuntimeError, match="inside"), moe_ops.use_kernels("torch"):
        raise RuntimeError("inside")
    assert _kernels.current() == "auto"


def test_use_kernels_is_per_thread():
    seen = {}
    with moe_ops.use_kernels("torch"):
        thread = threading.Thread(target=lambda: seen.update(other=_kernels.current()))
        thread.start()
        thread.join()
        seen["here"] = _kernels.current()
    assert seen == {"other": "auto", "here": "torch"}


@pytest.mark.parametrize("capacity", [None, 8], ids=["default", "capacity"])
def test_backward_runs_with_the_forward_choice(capacity):
    """The backward (which autograd may run on another thread) picks its kernels under the choice
    the forward ran with, not the one in effect when ``backward()`` is called."""
    x, idx, w, E = _inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    kwargs = {} if capacity is None else dict(capacity=capacity, overflow="drop")
    choices = []
    real = _kernels.for_device

    def recording(device):
        choices.append(_kernels.current())
        return real(device)

    with mock.patch.object(_kernels, "for_device", recording):
        with moe_ops.use_kernels("torch"):
            recv_x, handle = moe_ops.dispatch(x, idx, E, **kwargs)
            out = moe_ops.combine(recv_x * 2, handle, w)
        n_forward = len(choices)
        out.sum().backward()
    assert n_forward >= 2 and len(choices) > n_forward  # both passes picked kernels
    assert set(choices) == {"torch"}, choices
    assert x.grad is not None and w.grad is not None


def _public_signatures(path: pathlib.Path) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text())
    return {
        node.name: [a.arg for a in node.args.args + node.args.kwonlyargs]
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    }


def test_both_kernel_sets_have_one_signature():
    """The Triton set (parsed, not imported: this machine may have no Triton) defines the same
    public functions with the same arguments as the torch set."""
    here = pathlib.Path(inspect.getfile(torch_kernels)).parent
    fused = _public_signatures(here / "triton_kernels.py")
    plain = _public_signatures(here / "torch_kernels.py")
    assert plain == fused
    assert {"send_layout", "scatter_rows", "gather_rows", "combine_rows", "slot_dot"} <= set(plain)


# ----------------------------------------------------------------------------- transport
@pytest.mark.parametrize(
    "kwargs, frag",
    [
        (dict(capacity=4, transport="padded"), r"one of \('local',\) with no process group"),
        (dict(capacity=4, transport="fast"), r"with no process group, got 'fast'"),
        (dict(transport="local"), "transport is a capacity-mode option; pass capacity too"),
    ],
)
def test_bad_transport(kwargs, frag):
    x, idx, _, E = _inputs()
    with pytest.raises(ValueError, match=frag):
        moe_ops.dispatch(x, idx, E, **kwargs)


def test_transport_is_kept_in_the_handle():
    x, idx, w, E = _inputs()
    _, handle = moe_ops.dispatch(x, idx, E, capacity=12, transport="local")
    assert (handle.transport, handle.capacity) == ("local", 12)
    _, default = moe_ops.dispatch(x, idx, E, capacity=12)
    assert default.transport == "local"
    _, plain = moe_ops.dispatch(x, idx, E)
    assert (plain.transport, plain.capacity, plain.num_dropped) == (None, None, None)
    assert plain.tokens_per_expert_host is not None


def explicit_transport_case(transport: str) -> None:
    spec = Spec(T=(6,), K=2, E_l=2, H=4, Hp=4, dtype=torch.float64, seed=3)
    assert fixed_case(spec, "worst-case", False, transport) == 0


def local_transport_case() -> None:
    r, W = rank_and_world()
    x, idx, _, _ = _inputs()
    with pytest.raises(ValueError, match=rf"one of \('padded', 'p2p', 'nvshmem'\) with {W} ranks"):
        moe_ops.dispatch(x, idx, 2 * W, capacity=4, transport="local")


def p2p_on_cpu_case() -> None:
    r, W = rank_and_world()
    x, idx, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"transport='p2p' reads the peers' GPU memory.*on cpu"):
        moe_ops.dispatch(x, idx, 2 * W, capacity=4, transport="p2p")
    # no rank entered an exchange: the group still works
    _, handle = moe_ops.dispatch(x, idx, 2 * W, capacity="worst-case")
    assert handle.transport == "padded"


def test_explicit_padded_transport_gloo(gloo_world):
    gloo_world(2).run(explicit_transport_case, "padded")


def test_local_transport_needs_one_rank_gloo(gloo_world):
    gloo_world(2).run(local_transport_case)


def test_p2p_transport_needs_cuda_gloo(gloo_world):
    """The p2p transport reads GPU memory; CPU tensors get a clear error on every rank."""
    gloo_world(2).run(p2p_on_cpu_case)
