"""The row kernels, two sets behind one signature: plain torch and fused Triton.

Both modules define the same functions (``send_layout``, ``token_rows``, ``expert_major_rows``,
``regroup_by_expert``, ``scatter_rows``, ``place_rows``, ``gather_rows``, ``combine_rows``,
``slot_dot``, ``zero_tail``; the capacity mode's ``fixed_plan`` and ``fixed_token_rows``; the
p2p transport's reads ``pull_chunks`` and ``pull_sum``) with the same arguments and results,
so an op picks its set once (:func:`for_device`) and calls it without forks.

The choice follows the device: Triton for CUDA tensors when Triton can be imported, plain torch
otherwise. :func:`use_kernels` ``("torch")`` runs the plain torch set on CUDA too, within a
``with`` block of the calling thread (a ``contextvars.ContextVar``: nothing module-wide changes, and
other threads keep their own choice). The ops' backwards run with the choice their forward saw.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch

from moe_ops._kernels import torch_kernels

KERNEL_CHOICES = ("auto", "torch")
_choice: contextvars.ContextVar[str] = contextvars.ContextVar("moe_ops_kernels", default="auto")


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
    """Within the block, ``"torch"`` runs the plain torch kernels on every device; ``"auto"``
    (the default) uses the fused Triton kernels for CUDA tensors when Triton is installed."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(
            f"moe_ops.use_kernels: kernels must be one of {KERNEL_CHOICES}, got {kernels!r}"
        )
    token = _choice.set(kernels)
    try:
        yield
    finally:
        _choice.reset(token)


def current() -> str:
    """The choice in effect on this thread: ``"auto"`` or ``"torch"``."""
    return _choice.get()


def for_device(device: torch.device) -> ModuleType:
    """The kernel set for tensors on ``device`` under the current choice."""
    if device.type == "cuda" and _choice.get() == "auto":
        fused = _triton_kernels()
        if fused is not None:
            return fused
    return torch_kernels


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """``moe_ops._kernels.triton_kernels``, imported on first use (CPU installs of torch come
    without Triton); None when Triton is missing."""
    if importlib.util.find_spec("triton") is None:
        return None
    from moe_ops._kernels import triton_kernels

    return triton_kernels
