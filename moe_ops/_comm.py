"""Communication: the count exchange, the one host sync, and the two payload exchanges.

Only this module talks to ``torch.distributed``. Every collective is an ``all_to_all_single``
issued by :func:`all_to_all` (or, in capacity mode on CUDA, reads from the peers' symmetric
memory after a device-side barrier, or with NVSHMEM a ``torch.ops.symm_mem`` all-to-all):

* :func:`exchange_counts`: the count row, ``[W, 2 + E_l]`` int64 per rank (``moe_ops._layout``;
  the layout kernels write it, :func:`bad_count_row` on bad input): a status flag, the token
  rows, then the counts per local expert; then W round columns (``sum_per_rank``). Its shape
  depends only on E and W, so a rank whose input is bad still takes part (flag set, counts
  zero) and every rank learns of it from the same call.
* :func:`rows_to_experts`: rows in send order -> the rows received, source-major (dispatch
  forward, its token rows with their slots in front, the routing weights with
  ``sum_per_rank``, combine backward; the caller regroups them by expert).
* :func:`rows_to_sources` and :func:`rows_back`: the way back (combine forward, dispatch
  backward, and the weight gradient with ``sum_per_rank``). Each chunk carries
  one extra status row so that a rank whose combine input is bad can still complete the exchange
  with the right sizes and tell its peers (no hang, no broken connection, and on CPU every rank
  raises; on GPU reading the flag would cost a host sync, so the bad rank's rows are NaN instead).
  Both directions have the spare row after each chunk (``moe_ops._layout``), so a pair's row is
  the same in both.

:func:`read_to_host` is the single device -> host sync of a dispatch (the send-buffer fill runs on
the device while the host waits for it).

Capacity mode (``moe_ops._capacity_ops``, no host sync): :class:`EqualChunks` (every rank's
counts per expert, and the rows in equal chunks: the padded transport through
``all_to_all_single``, the p2p transport through CUDA symmetric memory), and
:func:`nvshmem_to_experts` / :func:`nvshmem_to_sources` (device-side split sizes, NVSHMEM).
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import _kernels
from moe_ops._layout import COUNTS, count_width, write_count_row

_OK, _BAD = 0, 1


class PeerInputError(ValueError):
    """Another rank's input was bad; that rank raised the detailed error."""


def resolve_group(group_name: str, world_size: int) -> dist.ProcessGroup | None:
    """The process group behind ``group_name``, or None for a single rank."""
    if world_size == 1:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    if group.size() != world_size:
        raise ValueError(
            f"moe_ops: group {group_name!r} has {group.size()} ranks but the op was called "
            f"with world_size={world_size}; pass the group that dispatch used"
        )
    return group


def read_to_host(t: Tensor, meanwhile: Callable[[], Any] | None = None) -> tuple[Tensor, Any]:
    """The one device -> host sync of a dispatch: ``t`` on the CPU, and what ``meanwhile()``
    returned (None on the CPU, where it is not called: nothing would overlap there).

    On CUDA the copy goes into pinned memory on the current stream and the host waits for an
    event recorded after it, so the device work ``meanwhile`` queues behind the copy (the
    send-buffer fill) runs while the host waits: no stream switch, no pageable copy. The wait
    is reported to ``torch.cuda.set_sync_debug_mode`` like torch's own syncs (which it would
    not see by itself). The returned CPU tensor may be a buffer that the next read on this
    thread overwrites (on the CPU, ``t`` itself): copy what outlives the call.
    """
    if not t.is_cuda:
        return t.cpu(), None
    _report_sync()
    staging = _staging(t.device.index, t.shape, t.dtype)
    staging.host.copy_(t, non_blocking=True)
    staging.copied.record()
    queued = None if meanwhile is None else meanwhile()
    staging.copied.synchronize()
    return staging.host, queued


def _report_sync() -> None:
    """What ``torch.cuda.set_sync_debug_mode`` does for torch's synchronizing calls: warn
    ("warn") or raise ("error") with its message."""
    mode = torch.cuda.get_sync_debug_mode()
    if mode:
        msg = "called a synchronizing CUDA operation (moe_ops.dispatch reads its row counts)"
        if mode == 2:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=3)


class _Staging(NamedTuple):
    host: Tensor  # pinned
    copied: torch.cuda.Event


_staging_per_thread = threading.local()


def _staging(device_index: int, shape: torch.Size, dtype: torch.dtype) -> _Staging:
    """A pinned host buffer and an event for :func:`read_to_host`, made once per thread, device,
    shape and dtype (pinning memory is slow; the buffer is read back before it is reused)."""
    cache = getattr(_staging_per_thread, "cache", None)
    if cache is None:
        cache = _staging_per_thread.cache = {}
    key = (device_index, shape, dtype)
    staging = cache.get(key)
    if staging is None:
        host = torch.empty(shape, dtype=dtype, pin_memory=True)
        staging = cache[key] = _Staging(host, torch.cuda.Event())
    return staging


def bad_count_row(local_experts: int, world_size: int, device: torch.device) -> Tensor:
    """The count row (``moe_ops._layout.write_count_row``) of a rank whose input is bad: status
    1, no rows; from tensors made by fills (never a copy from pageable host memory, which would
    sync)."""
    i64 = dict(dtype=torch.int64, device=device)
    row = torch.full((world_size, count_width(local_experts, world_size)), -1, **i64)
    zeros = torch.zeros(world_size * local_experts, **i64)
    write_count_row(row[:, : COUNTS + local_experts], zeros, torch.ones((), **i64))
    return row


def exchange_counts(send_WC: Tensor, group: dist.ProcessGroup, out: Tensor | None = None) -> Tensor:
    """Send row d of ``send_WC`` (the count row and the round columns,
    ``moe_ops._layout.count_width``) to rank d; returns the rows received, one per source rank
    (in ``out`` if given)."""
    recv = torch.empty_like(send_WC) if out is None else out
    all_to_all(recv, send_WC, [], [], group)
    return recv


def all_to_all(
    out: Tensor,
    inp: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup,
    async_op: bool = False,
):
    """``dist.all_to_all_single(out, inp, out_splits, in_splits, group=group,
    async_op=async_op)``; empty splits mean equal chunks. The one place this module issues a
    collective (tests count calls here). Returns the work when ``async_op``.

    Calling the process group's ``alltoall_base`` directly, without this wrapper's checks, was
    tried: no measurable gain in a training step (docs/notes_moe_layer.md), so the public call
    stays.
    """
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def raise_if_peer_bad(status_W: list[int], my_rank: int, what: str) -> None:
    bad = [r for r, s in enumerate(status_W) if s != _OK and r != my_rank]
    if bad:
        raise PeerInputError(
            f"moe_ops.{what}: rank(s) {bad} of the group passed bad input (see the error raised "
            f"there); every rank raised and the group can be used again"
        )


def _with_spare_row(splits: list[int]) -> list[int]:
    return [n + 1 for n in splits]


def rows_to_experts(
    rows_M: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Payload exchange towards the experts.

    ``rows_M``: this rank's rows in send order with one spare row after each destination's chunk
    (``M >= N + W``; rows past ``N + W`` are not sent). Returns the rows received, source-major,
    with one (unwritten) spare row after each source's chunk: ``[R + W, ...]``.
    """
    send, recv_W = _with_spare_row(send_splits), _with_spare_row(recv_splits)
    recv = rows_M.new_empty((sum(recv_W), *rows_M.shape[1:]))
    all_to_all(recv, rows_M[: sum(send)], recv_W, send, group)
    return recv


def rows_to_sources(
    rows_R: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    recv_rows: Tensor,
    bad: bool,
    my_rank: int,
    group: dist.ProcessGroup,
    what: str,
    kern,
    out: Tensor | None = None,
) -> Tensor:
    """Payload exchange back to the sources.

    ``rows_R`` is in expert-major order, as the experts produced it; ``recv_rows`` (int64
    ``[R + W]``, ``moe_ops._layout.expert_major_rows``) gives each one's row in the source-major
    buffer, then the status rows. Returns the rows this rank sent, back in send order, with one
    status row after each destination's chunk: ``[N + W, ...]``, so chunk ``d`` starts at row
    ``sum(send_splits[:d]) + d`` (into ``out`` if given).
    """
    W = len(send_splits)
    R = sum(recv_splits)
    buf = rows_R.new_empty((R + W, *rows_R.shape[1:]))
    status_W = recv_rows[R:]
    if not bad:  # the status rows written by the placing kernel
        kern.place_rows(rows_R, recv_rows[:R], buf, fill_rows=status_W, value=_OK)
    args = (buf, send_splits, recv_splits, status_W, bad, my_rank, group, what, not bad)
    return rows_back(*args, out=out)


def spare_rows(splits: list[int], device: torch.device) -> Tensor:
    """The spare rows of a buffer laid out with one after each rank's chunk of ``splits`` rows
    (built from host values: a copy to the device, so for error paths only)."""
    ends = torch.tensor(_with_spare_row(splits), dtype=torch.int64).cumsum(0) - 1
    return ends.to(device)


def rows_back(
    buf: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    status_W: Tensor | None,
    bad: bool,
    my_rank: int,
    group: dist.ProcessGroup,
    what: str,
    status_written: bool = False,
    *,
    check_peers: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """The exchange back to the sources of rows already laid out source-major with a spare row
    after each source's chunk (``buf`` ``[sum(recv_splits) + W, ...]``; ``status_W``: the spare
    rows; None when ``status_written``). Writes the status rows unless ``status_written`` (every
    row NaN when this rank's input is ``bad``), exchanges, and returns ``[sum(send_splits) + W,
    ...]`` in send order with the peers' status rows (into ``out`` if given); on the CPU it
    raises ``PeerInputError`` when a peer flagged bad input (with ``check_peers``; else the
    caller reads :func:`peer_status` once every exchange of the call is done). The status
    "input good" is 0."""
    args = (buf, send_splits, recv_splits, status_W, bad, status_written, group)
    out, work = start_rows_back(*args, out=out)
    work.wait()
    if check_peers and out.device.type == "cpu":
        raise_if_peer_bad(peer_status(out, send_splits), my_rank, what)
    return out


def start_rows_back(
    buf: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    status_W: Tensor | None,
    bad: bool,
    status_written: bool,
    group: dist.ProcessGroup,
    *,
    out: Tensor | None = None,
    with_status: bool = True,
    beside: bool = False,
):
    """:func:`rows_back`'s exchange: returns the rows that come back and the work to wait for
    (``wait()``) before reading them; no peer check. With ``beside`` the exchange runs beside
    the caller's stream (on CUDA on a side stream; elsewhere asynchronously), else it is done
    on return. Without ``with_status`` (an exchange whose call sent the status in an earlier
    one) the buffers have no spare rows, and a bad rank's rows are NaN."""
    W = len(send_splits) if with_status else 0
    # Status rows are written with a fill (the value a kernel argument). ``buf[pos] = value``
    # would copy the Python scalar to the device as a 0-d tensor from pageable memory: a host
    # sync on CUDA.
    if bad:
        buf.fill_(float("nan"))
        if with_status:
            buf.index_fill_(0, status_W, _BAD)
    elif with_status and not status_written:
        buf.index_fill_(0, status_W, _OK)
    if out is None:
        out = buf.new_empty((sum(send_splits) + W, *buf.shape[1:]))
    splits = (send_splits, recv_splits)
    if with_status:
        splits = (_with_spare_row(send_splits), _with_spare_row(recv_splits))
    if not beside:
        all_to_all(out, buf, *splits, group)
        return out, _Done()
    if out.device.type != "cuda":
        return out, all_to_all(out, buf, *splits, group, async_op=True)
    # A blocking collective runs on the current stream: on a side stream it leaves the caller's
    # free (NCCL's own stream, async_op=True, stalled the host for ~2 ms at the switch from the
    # blocking ones before it, docs/notes_gpu.md).
    side = side_stream(out.device)
    side.wait_stream(torch.cuda.current_stream(out.device))
    with torch.cuda.stream(side):
        all_to_all(out, buf, *splits, group)
    return out, _Joined(side, buf)


class _Done:
    """The work of an exchange that is done."""

    def wait(self) -> None:
        pass


class _Joined:
    """The work of an exchange on a side stream: ``wait()`` makes the current stream wait for
    it; until then it holds the rows being sent (allocated on the current stream, so their
    memory is reused only after the wait)."""

    def __init__(self, side: torch.cuda.Stream, buf: Tensor) -> None:
        self.side, self.buf = side, buf

    def wait(self) -> None:
        torch.cuda.current_stream(self.side.device).wait_stream(self.side)
        self.buf = None


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per CUDA device for the ops' work beside the current stream."""
    return torch.cuda.Stream(device)


def peer_status(out: Tensor, send_splits: list[int]) -> list[int]:
    """CPU only: the status rows that came back with :func:`rows_back` (nonzero: that peer's
    input was bad). On CUDA this read would be a host sync; the bad rank's rows are NaN there
    instead."""
    status = out[spare_rows(send_splits, out.device), 0]
    return [0 if s == _OK else 1 for s in status.tolist()]


# ----------------------------------------------------------------------------- capacity mode
class EqualChunks:
    """The equal-chunk exchanges of one capacity-mode op call (sizes known to every rank in
    advance, so no count travels to the host), through one of two transports:

    * ``"padded"``: ``all_to_all_single`` (gloo or NCCL), one collective per exchange;
    * ``"p2p"``: CUDA symmetric memory within one NVLink (peer-to-peer) domain. A rank writes
      what it sends into its own persistent symmetric buffer (the caller's kernel writes it there
      directly: :meth:`send_buffer`), a device-side barrier says every rank has written, and
      each rank reads its chunk of every peer's buffer into a fresh tensor in one kernel
      (``pull_chunks``; or, for rows summed per token, sums them as it reads them:
      :meth:`exchange_sum`): no host work, no NCCL call, nothing the host waits for. Buffers are
      allocated and rendezvoused on first use (a collective call: warm up before capturing a
      CUDA graph) and reused by the next call with the same op, exchange index and shape; all
      ranks run the same calls in the same order, on one stream each.

      When may a rank overwrite its buffer? Once every peer has read it. A call of ``op`` makes
      ``exchanges`` exchanges, each ending with a barrier that a peer enters only after its
      reads of the exchanges before (stream order). Exchange i > 0 of a call writes after the
      barrier of exchange i - 1 of the same call, so every peer is done with all earlier calls.
      Exchange 0 writes after the barrier of exchange 1 of the previous call of ``op``, so every
      peer is done with that call's exchange 0, when calls make two or more exchanges; an op
      whose calls make one exchange waits for one more barrier before writing it.

    ``size()`` and ``rank()`` are the group's.
    """

    def __init__(
        self, group: dist.ProcessGroup, group_name: str, transport: str, op: str, exchanges: int
    ):
        self.group, self.group_name, self.op = group, group_name, op
        self.exchanges = exchanges  # what every call of ``op`` with these arguments makes
        self.p2p = transport == "p2p"
        self.counted = transport in ("padded", "p2p")  # nvshmem moves rows elsewhere
        self._calls = 0  # exchanges so far in this op call
        self._pending: _P2PBuffer | None = None
        self._unread = False  # an exchange_sum whose rows are not yet read

    def done(self, result: Any) -> Any:
        """``result``, once the call made the exchanges it declared (the overwrite rule counts
        on every call of ``op`` making the same number; checked with the padded transport too,
        so the CPU tests guard it)."""
        if self.counted and self._calls != self.exchanges:
            raise RuntimeError(
                f"moe_ops: {self.op} made {self._calls} exchanges, not the {self.exchanges} "
                f"it declared"
            )
        self._check_read()
        return result

    def _check_read(self) -> None:
        if self._unread:  # the overwrite rule counts on reads before the next barrier
            raise RuntimeError(f"moe_ops: {self.op} left an exchange_sum's rows unread")

    def size(self) -> int:
        return self.group.size()

    def rank(self) -> int:
        return self.group.rank()

    def send_buffer(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """With ``"p2p"``, this rank's symmetric buffer for what the next :meth:`exchange` sends,
        which peers read directly: write the rows there and pass it to :meth:`exchange`. None
        otherwise (any tensor will do)."""
        if not self.p2p:
            return None
        if device.type == "cuda" and device.index is None:  # as the maker thread cannot tell
            device = torch.device("cuda", torch.cuda.current_device())
        # calls of one op with another number of exchanges (combine: 1 in slot order, 2 summing
        # per rank) get buffers of their own, so the overwrite rule holds for each key
        key = (
            (self.op, self.exchanges),
            self._calls,
            tuple(shape),
            dtype,
            device,
            self.group_name,
        )
        buf = _p2p_buffer(key)
        if self._calls == 0 and self.exchanges == 1:
            buf.handle.barrier(channel=0)  # peers are done reading this op's buffers
        self._pending = buf
        return buf.local

    def exchange(self, send: Tensor) -> Tensor:
        """Chunk d of ``send`` (``M / W`` rows) to rank d; returns the chunks received, one per
        source rank."""
        buf = self._arrive(send)
        if buf is None:
            return self._padded(send)
        rows = send.shape[0] // self.size()
        return self._pull(buf, send, rows, self.rank() * rows)

    def gather(self, row: Tensor) -> Tensor:
        """Every rank's ``row``: ``[W, n]``."""
        if not self.p2p:  # an all_to_all_single of the row repeated W times (tiny)
            return self.exchange(row.expand(self.size(), row.shape[0]))
        send = row.view(1, -1)
        return self._pull(self._arrive(send), send, 1, 0)

    def _pull(self, buf: _P2PBuffer, send: Tensor, rows: int, first: int) -> Tensor:
        """Rows ``[first, first + rows)`` of every rank's buffer, rank by rank, in a fresh
        tensor."""
        out = send.new_empty((self.size() * rows, *send.shape[1:]))
        return _kernels.for_device(send.device).pull_chunks(buf.peers, buf.peer_ptrs, out, first)

    def exchange_sum(self, send: Tensor) -> Callable[[Tensor], Tensor]:
        """:meth:`exchange` of ``send`` (``[W * S, H]``) for rows that are summed per token:
        returns ``sum_rows(pos_TW)``, which gives ``out[t]``, the sum of the received rows
        ``pos_TW[t, r]`` (chunk r's rows are ``[r * S, (r + 1) * S)``) over the ranks r with
        ``pos_TW[t, r] >= 0``, in rank order, accumulated in ``acc_dtype``, in ``send``'s dtype.
        With ``"p2p"`` it is one kernel reading the rows straight from the peers' buffers (no
        ``[W * S, H]`` copy). Two steps so that the caller can drop ``send`` in between: its
        memory can then serve the output. ``sum_rows`` must run before the call's next
        exchange and before :meth:`done` (the overwrite rule counts on every read of an
        exchange coming before the next barrier; checked)."""
        kern = _kernels.for_device(send.device)
        buf = self._arrive(send)
        recv = self._padded(send) if buf is None else None
        S = send.shape[0] // self.size()
        self._unread = True

        def sum_rows(pos_TW: Tensor) -> Tensor:
            self._unread = False
            if buf is None:
                return kern.combine_rows(recv, pos_TW, None, recv.dtype)
            return kern.pull_sum(buf.peers, buf.peer_ptrs, pos_TW, self.rank() * S, S)

        return sum_rows

    def _arrive(self, send: Tensor) -> _P2PBuffer | None:
        """Counts the exchange; with ``"p2p"``, puts ``send`` in this rank's buffer (unless the
        caller wrote it there: :meth:`send_buffer`) and waits on the device until every rank
        has: returns the buffer, whose peers' rows are ready to read. None otherwise."""
        if self._calls >= self.exchanges:  # p2p's overwrite rule above would not hold
            raise RuntimeError(f"moe_ops: {self.op} made more than {self.exchanges} exchanges")
        self._check_read()
        buf = None
        if self.p2p:
            buf = self._pending
            if (
                buf is None
                or send.data_ptr() != buf.local.data_ptr()
                or send.shape != buf.local.shape
            ):
                self.send_buffer(tuple(send.shape), send.dtype, send.device).copy_(send)
                buf = self._pending
            self._pending = None
        self._calls += 1
        if buf is not None:
            buf.handle.barrier(channel=0)  # every rank's rows are in its buffer
        return buf

    def _padded(self, send: Tensor) -> Tensor:
        recv = torch.empty_like(send, memory_format=torch.contiguous_format)
        all_to_all(recv, send.contiguous(), [], [], self.group)
        return recv


class _P2PBuffer(NamedTuple):
    local: Tensor  # this rank's symmetric buffer
    handle: Any  # torch's _SymmetricMemory for it
    peers: list[Tensor]  # every rank's buffer (this rank's too), as tensors on this device
    peer_ptrs: Tensor  # int64 [W] on the device: their addresses


_p2p_cache: dict[tuple, _P2PBuffer] = {}
_ONE_BACKEND = (
    "moe_ops: transport={this!r} after transport={other!r} in one process: torch's symmetric "
    "memory takes one backend per process (NVSHMEM for 'nvshmem', CUDA's for 'p2p'); use one of "
    "the two in a process"
)


def _p2p_buffer(key: tuple) -> _P2PBuffer:
    """The persistent symmetric buffer of ``key`` (op, exchange, shape, dtype, device, group),
    allocated and rendezvoused on first use (collective: every rank asks for the same keys in
    the same order; not inside a CUDA-graph capture)."""
    buf = _p2p_cache.get(key)
    if buf is None and _symm_cache:
        raise ValueError(_ONE_BACKEND.format(this="p2p", other="nvshmem"))
    if buf is None:
        # Made on a thread of its own: a CUDA-graph memory pool that takes this thread's
        # allocations (inductor's CUDA graph trees warm up inside one) must not own buffers that
        # outlive the graph.
        made: list = []

        def make() -> None:
            try:
                made.append(_make_p2p_buffer(*key[2:]))
            except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
                made.append(e)

        maker = threading.Thread(target=make)
        maker.start()
        maker.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        buf = _p2p_cache[key] = made[0]
    return buf


def _make_p2p_buffer(shape, dtype, device, group_name) -> _P2PBuffer:
    import torch.distributed._symmetric_memory as symm_mem

    torch.cuda.set_device(device)
    numel = math.prod(shape)
    # one element at least: an exchange of no rows (T = 0 everywhere) still has its barrier
    block = symm_mem.empty(max(numel, 1), dtype=dtype, device=device)
    handle = symm_mem.rendezvous(block, group_name)
    offset = block.data_ptr() - handle.buffer_ptrs[handle.rank]  # bytes into the allocation
    peers = [
        handle.get_buffer(r, block.shape, dtype, offset // dtype.itemsize)[:numel].view(shape)
        for r in range(handle.world_size)
    ]
    local = block[:numel].view(shape)
    ptrs = torch.tensor([p.data_ptr() for p in peers], dtype=torch.int64, device=device)
    torch.cuda.current_stream(device).synchronize()  # the table is on the device
    return _P2PBuffer(local, handle, peers, ptrs)


_symm_cache: dict[tuple, Tensor] = {}


def _symm_buffer(
    key: tuple, shape: tuple, dtype: torch.dtype, device: torch.device, group_name: str
) -> Tensor:
    """A persistent symmetric-memory (NVSHMEM) tensor, allocated and rendezvoused once per key.

    Allocation is collective: every rank must ask for the same shapes in the same order (the
    capacity mode requires the same T on every rank), and the first call must not be inside a
    CUDA-graph capture (warm up first).
    """
    full = (key, shape, dtype, device, group_name)
    buf = _symm_cache.get(full)
    if buf is None:
        import torch.distributed._symmetric_memory as symm_mem

        if symm_mem.get_backend(device) != "NVSHMEM":
            if _p2p_cache:
                raise ValueError(_ONE_BACKEND.format(this="nvshmem", other="p2p"))
            symm_mem.set_backend("NVSHMEM")
        buf = symm_mem.empty(shape, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, group_name)
        _symm_cache[full] = buf
    return buf


def nvshmem_available() -> bool:
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    return symm_mem.is_nvshmem_available()


def nvshmem_to_experts(
    fill_send,
    send_rows: int,
    out_rows: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
    in_splits_E: Tensor,
    group_name: str,
    tag: str,
) -> tuple[Tensor, Tensor]:
    """Rows (send order: destination rank, local expert) -> expert-major on their owners.

    ``fill_send(buf)`` writes the packed send rows into the symmetric send buffer
    ``[send_rows, width]``; ``in_splits_E`` (int64 ``[W * E_l]``, on the device) gives the rows
    per (destination, local expert). Returns the symmetric receive buffer ``[out_rows, width]``
    (rows ``[0, R)`` filled, expert-major then source rank) and ``[2, W * E_l]`` (received splits
    and offsets per (local expert, source), what the way back needs); both are reused by the next
    call with the same tag, so callers copy what they keep.
    """
    send = _symm_buffer(("send", tag), (send_rows, width), dtype, device, group_name)
    recv = _symm_buffer(("recv", tag), (out_rows, width), dtype, device, group_name)
    n = in_splits_E.shape[0]
    splits = _symm_buffer(("in_splits", tag), (n,), torch.int64, device, group_name)
    out_so = _symm_buffer(("out_so", tag), (2, n), torch.int64, device, group_name)
    fill_send(send)
    splits.copy_(in_splits_E)
    try:
        torch.ops.symm_mem.all_to_all_vdev_2d(send, recv, splits, out_so, group_name)
    except RuntimeError as e:  # every rank has the same E and W, so every rank raises here
        raise RuntimeError(
            f"moe_ops.dispatch: the nvshmem transport's kernel "
            f"(torch.ops.symm_mem.all_to_all_vdev_2d) refused {n} (rank, local expert) splits: "
            f"{e}. It handles a limited number of experts per call (256 experts at W = 4 were "
            f"refused with torch 2.11); use transport='padded'"
        ) from e
    return recv, out_so.clone()


def nvshmem_to_sources(
    rows_CH: Tensor, back_rows: int, splits_offsets_2E: Tensor, group_name: str, tag: str
) -> Tensor:
    """The way back of :func:`nvshmem_to_experts`: expert-major rows -> the senders' send order.

    Returns the symmetric buffer ``[back_rows, width]`` (reused by the next call with this tag).
    """
    C, width = rows_CH.shape
    dev = rows_CH.device
    send = _symm_buffer(("back_send", tag), (C, width), rows_CH.dtype, dev, group_name)
    recv = _symm_buffer(("back_recv", tag), (back_rows, width), rows_CH.dtype, dev, group_name)
    in_so = _symm_buffer(
        ("back_in_so", tag), tuple(splits_offsets_2E.shape), torch.int64, dev, group_name
    )
    out_so = _symm_buffer(
        ("back_out_so", tag), tuple(splits_offsets_2E.shape), torch.int64, dev, group_name
    )
    send.copy_(rows_CH)
    in_so.copy_(splits_offsets_2E)
    torch.ops.symm_mem.all_to_all_vdev_2d_offset(send, recv, in_so, out_so, group_name)
    return recv
