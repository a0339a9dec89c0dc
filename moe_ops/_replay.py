"""Short launch sequences replayed from CUDA graphs: dispatch's work before its count read.

Before its one host read, a default-mode dispatch launches a few small kernels (the send
layout, the token rows, the round columns) whose arguments depend only on ``topk_idx``'s shape
and the op's arguments. Run cold, as between the layers of a model, each launch costs tens of
microseconds of host time, and the read waits for all of them: on small payloads they are most
of dispatch's time before the read (docs/notes_gpu.md, "The layout before the count read,
replayed"). :func:`run` runs such a function eagerly the first time a key is seen (which also
compiles its kernels), captures it in a CUDA graph the second time, and from then on copies the
inputs into the graph's static inputs and replays it: one copy and one graph launch (and a copy
of each output the caller keeps).

Rules for the functions run here: device tensors of fixed shape in, a pytree of device tensors
out, no host sync, no collective (process groups whose communicators were captured in a graph
hang in ``destroy_process_group``, pytorch/pytorch#115388; the count exchange stays eager), and
the same kernels whatever the values. Outputs of a replay are the graph's static outputs, which
the next replay of the same key overwrites: what outlives the caller's call is copied after
each replay (``outlive``). Keys carry the device, the
current stream and the thread, so a replay never overwrites outputs that work queued on another
stream or thread still reads.

Only CUDA tensors, outside any capture of the caller's (the op bodies that call it never run
while compiling: fake kernels do). At most :data:`MAX_GRAPHS` graphs are
kept (the least recently used goes first); :func:`eager_only` turns replays off within a block
of the calling thread (tests compare both ways).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

MAX_GRAPHS = 8  # a model has few dispatch shapes; each graph holds its own memory pool

_eager: contextvars.ContextVar[bool] = contextvars.ContextVar("moe_ops_eager", default=False)


@contextlib.contextmanager
def eager_only() -> Iterator[None]:
    """Within the block (this thread), :func:`run` runs every function eagerly."""
    token = _eager.set(True)
    try:
        yield
    finally:
        _eager.reset(token)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # static: copied into before each replay
    out: Any  # static outputs, as the function returned them


# key -> None (seen once: ran eagerly), a _Graph, or False (capture failed: always eager)
_graphs: OrderedDict[tuple, _Graph | bool | None] = OrderedDict()
_lock = threading.Lock()
_UNSEEN = object()


def run(
    fn: Callable[..., Any],
    key: tuple,
    *inputs: Tensor,
    outlive: Callable[[Any], list[Tensor]] = lambda out: [],
) -> tuple[Any, list[Tensor] | None]:
    """``fn(*inputs)``, and None, or, when replayed, copies of the tensors ``outlive(out)``
    names (what outlives the caller's call: the rest of ``out`` is the graph's static outputs,
    which the next replay overwrites; one device copy each). ``key`` names ``fn`` and
    everything but ``inputs``' values that its kernels depend on (shapes, dtypes, the op's
    arguments, the kernel set)."""
    dev = inputs[0].device
    if dev.type != "cuda" or _eager.get() or torch._C._cuda_isCurrentStreamCapturing():
        return fn(*inputs), None
    # the stream as a raw handle: cheaper to look up than a Stream object, which only a capture
    # needs
    full = (key, dev, torch._C._cuda_getCurrentRawStream(dev.index), threading.get_ident())
    with _lock:
        entry = _graphs.get(full, _UNSEEN)
        if entry is not _UNSEEN:
            _graphs.move_to_end(full)
    if entry is _UNSEEN or entry is False:  # first sight (remembered) or not capturable
        if entry is _UNSEEN:
            _remember(full, None)
        return fn(*inputs), None
    if entry is None:  # second sight: capture
        entry = _capture(fn, inputs, torch.cuda.current_stream(dev))
        _remember(full, False if entry is None else entry)
        if entry is None:
            return fn(*inputs), None
    for static, t in zip(entry.inputs, inputs, strict=True):
        static.copy_(t)
    entry.graph.replay()
    return entry.out, copies_of(outlive(entry.out))


def copies_of(static: list[Tensor]) -> list[Tensor]:
    """What a replay's caller keeps, copied out of the graph's static outputs: separate tensors
    (a custom op's outputs may not share memory)."""
    return [t.clone() for t in static]


def _remember(full: tuple, entry: _Graph | bool | None) -> None:
    with _lock:
        _graphs[full] = entry
        _graphs.move_to_end(full)
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)


def _capture(fn, inputs: tuple[Tensor, ...], stream: torch.cuda.Stream) -> _Graph | None:
    """``fn`` captured on a side stream with static copies of ``inputs``; None when it cannot be
    captured (then the key stays eager)."""
    static = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs)
    graph = torch.cuda.CUDAGraph()
    # a stream of its own, not _comm.side_stream: work another thread queued there meanwhile
    # would be captured into this graph
    side = torch.cuda.Stream(stream.device)
    side.wait_stream(stream)
    try:
        with torch.cuda.stream(side):
            # thread_local: calls of other threads (NCCL's watchdog queries events) do not
            # invalidate the capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = fn(*static)
            finally:
                graph.capture_end()
    except RuntimeError:
        return None
    finally:
        stream.wait_stream(side)
    return _Graph(graph, static, out)


def cached() -> int:
    """Graphs kept now (for tests)."""
    with _lock:
        return sum(isinstance(e, _Graph) for e in _graphs.values())


def clear() -> None:
    """Drop every graph (their memory goes back to the allocator)."""
    with _lock:
        _graphs.clear()
