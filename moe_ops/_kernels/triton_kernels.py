"""The row kernels fused in Triton: the CUDA path of dispatch and combine.

Same functions and signatures as ``moe_ops._kernels.torch_kernels``; each computes exactly what
its torch counterpart computes (same order of rows, same rounding), so the two sets agree bit for
bit, except :func:`slot_dot`, whose dot products are summed in a different (but fixed) order.
Imported only when a tensor is on a CUDA device (``moe_ops._kernels.for_device``).

Shape letters: see ``moe_ops._layout``. A pair ``p = t * K + k`` is one (token, slot).

* :func:`send_layout`: counts per expert, the bad-id count and every pair's row in the send
  buffer (a stable counting sort by expert in two small kernels, no sort, no torch glue).
* :func:`expert_major_rows`: where each row received source-major goes expert-major, in one kernel;
  :func:`regroup_by_expert` also moves the rows there in the same kernel.
* :func:`token_rows`: each token's row once per rank that holds one of its experts, and its slots.
* :func:`scatter_rows`: ``dst[pos[m, k]] = src[m] * w[m, k]``: reads each source row once and
  writes it to its K rows of the send buffer (dispatch, combine's backward); :func:`place_rows`
  is the same with K = 1 into a given buffer.
* :func:`gather_rows`: ``dst[i] = src[idx[i] // per_row] * w[i]``: the receive-side regroup by
  local expert.
* :func:`combine_rows`: ``out[t] = sum_k w[t, k] * rows[pos[t, k]]`` in slot order, accumulated in
  float32 for half types (float64 for float64), weights applied in the same pass, no ``[T * K, H]``
  temporary. Compiled with floating-point contraction off so that it rounds like the CPU path.
* :func:`slot_dot`: ``g[t, k] = <grad[t], rows[pos[t, k]]>``: combine's weight gradient.
* :func:`zero_tail`: ``dst[n:] = 0`` with ``n`` on the device (capacity mode).

None of them syncs with the host.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops import _layout
from moe_ops._layout import FixedPlan, SendLayout, TokenRows

_SB = 128  # pairs ranked at a time by the layout kernel


def _spec(args: tuple, constexpr: list[bool]) -> tuple:
    """What Triton specializes a launch's arguments on: constexprs by value; dtype and 16-byte
    alignment of pointers; for ints, being 1, a multiple of 16, and fitting in 32 bits (one
    pass over the arguments, no call per argument)."""
    return tuple(
        [
            (type(a), str(a))
            if c
            else (a.dtype, a.data_ptr() % 16 == 0)
            if isinstance(a, Tensor)
            else (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
            if type(a) is int
            else (type(a), str(a))
            for a, c in zip(args, constexpr, strict=True)
        ]
    )


class _Launcher:
    """Launches a ``@triton.jit`` kernel with less host time than ``kernel[grid](...)``.

    Triton binds and specializes every argument in Python on every launch (tens of microseconds
    on the hosts of the H100 / H200 machines measured, more than our small kernels run). After
    the first launch of a specialization we keep its compiled kernel under the same features
    Triton specializes on (``_spec``) and launch it directly, on the current device's current
    stream looked up the way inductor's generated code does (Triton's own lookup goes through
    ``torch.cuda.current_device``). Arguments: every kernel parameter, in order (constexprs
    too); ``options`` are Triton's launch options (``num_warps``...).
    """

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters.values()
        self.constexpr = ["constexpr" in str(p.annotation) for p in params]
        self.compiled = {}

    def __call__(self, grid, *args, **options):
        if len(args) != len(self.constexpr):
            raise TypeError(f"{self.fn.__name__}: expected {len(self.constexpr)} arguments")
        key = _spec(args, self.constexpr) + tuple(options.items())
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **options)
            if hasattr(kernel, "function"):  # not under TRITON_INTERPRET
                self.compiled[key] = kernel
        else:
            stream = torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())
            kernel[tuple(grid) + (1,) * (3 - len(grid))](*args, stream=stream)


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache  # a few shapes; called on every launch
def _row_block(H: int, elt: int) -> tuple[int, int, int]:
    """(rows, columns, warps) of one program's tile: 4 KiB of a row, about 8 KiB in all."""
    BH = min(triton.next_power_of_2(max(H, 1)), 4096 // elt)
    BM = min(64, max(1, 8192 // (BH * elt)))
    return BM, BH, 4


def _combine_block(H: int) -> tuple[int, int, int]:
    """(tokens, columns, warps) of one combine program: its float32 accumulator is about 8 KiB."""
    return _row_block(H, 4)


# ----------------------------------------------------------------------------- layout
@triton.jit
def _load_ids(idx_ptr, offs, m, K, stride_t, STRIDED: tl.constexpr):
    """The expert ids of the pairs ``offs`` (flat ``t * K + k``), int64, -1 where not ``m``; with
    ``STRIDED`` the rows of ``topk_idx`` are ``stride_t`` apart (a view of packed rows)."""
    if STRIDED:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
        at = (offs // K).to(tl.int64) * stride_t + offs % K
    else:
        at = offs
    return tl.load(idx_ptr + at, mask=m, other=-1).to(tl.int64)


@triton.jit
def _block_hist_kernel(
    idx_ptr,
    counts_ptr,
    bad_ptr,
    P,
    E,
    K,
    stride_t,
    NBINS: tl.constexpr,
    BP: tl.constexpr,
    STRIDED: tl.constexpr,
):
    """counts[b, e]: pairs of block b routed to expert e; bad[b]: ids of block b outside [-1, E)."""
    b = tl.program_id(0)
    offs = b * BP + tl.arange(0, BP)
    m = offs < P
    ids = _load_ids(idx_ptr, offs, m, K, stride_t, STRIDED)
    valid = m & (ids >= 0) & (ids < E)
    bad = m & ((ids < -1) | (ids >= E))
    hist = tl.histogram(tl.where(valid, ids, 0).to(tl.int32), NBINS, mask=valid)
    cols = tl.arange(0, NBINS)
    tl.store(counts_ptr + b * E + cols, hist, mask=cols < E)
    tl.store(bad_ptr + b, tl.sum(bad.to(tl.int32), axis=0))


_launch_hist = _Launcher(_block_hist_kernel)


@triton.jit
def _place_kernel(
    idx_ptr,
    counts_ptr,
    bad_ptr,
    send_pos_ptr,
    pair_pos_ptr,
    send_pair_ptr,
    counts_bad_ptr,
    row_ptr,
    P,
    E,
    E_l,
    W,
    NB,
    row_stride,
    K,
    stride_t,
    NBINS: tl.constexpr,
    RB: tl.constexpr,
    BP: tl.constexpr,
    SB: tl.constexpr,
    SHIFT: tl.constexpr,
    HAS_ROW: tl.constexpr,
    STRIDED: tl.constexpr,
):
    """Row of every valid pair of block b in the send buffer.

    The row is: the expert's first row (exclusive scan of the expert totals), plus the pairs of
    that expert in earlier blocks, plus its rank among the block's earlier pairs of that expert
    (so the order is stable). Program 0 also writes the totals and the bad-id count, and with
    ``HAS_ROW`` the count row ``[W, 2 + E_l]`` (columns ``moe_ops._layout.STATUS``,
    ``TOKEN_ROWS``, ``COUNTS``...; rows ``row_stride`` apart).
    """
    b = tl.program_id(0)
    cols = tl.arange(0, NBINS)
    cm = cols < E
    prefix = tl.zeros([NBINS], dtype=tl.int32)
    total = tl.zeros([NBINS], dtype=tl.int32)
    for r0 in range(0, NB, RB):
        rows = r0 + tl.arange(0, RB)
        c = tl.load(
            counts_ptr + rows[:, None] * E + cols[None, :],
            mask=(rows < NB)[:, None] & cm[None, :],
            other=0,
        )
        total += tl.sum(c, axis=0)
        prefix += tl.sum(tl.where((rows < b)[:, None], c, 0), axis=0)
    off = tl.cumsum(total, axis=0) - total + prefix
    if b == 0:
        tl.store(counts_bad_ptr + cols, total.to(tl.int64), mask=cm)
        n_bad = tl.zeros([1024], dtype=tl.int32)
        for r0 in range(0, NB, 1024):
            rows = r0 + tl.arange(0, 1024)
            n_bad += tl.load(bad_ptr + rows, mask=rows < NB, other=0)
        bad_total = tl.sum(n_bad, axis=0).to(tl.int64)
        tl.store(counts_bad_ptr + E, bad_total)
        if HAS_ROW:  # row d: status (the bad-id count), token rows (-1), counts of rank d
            C = row_stride
            tl.store(row_ptr + (cols // E_l) * C + 2 + cols % E_l, total.to(tl.int64), mask=cm)
            wm = cols < W
            tl.store(row_ptr + cols * C, tl.zeros([NBINS], dtype=tl.int64) + bad_total, mask=wm)
            tl.store(row_ptr + cols * C + 1, tl.full([NBINS], -1, dtype=tl.int64), mask=wm)
    i = tl.arange(0, SB)
    for s in range(0, BP, SB):
        offs = b * BP + s + i
        m = offs < P
        ids = _load_ids(idx_ptr, offs, m, K, stride_t, STRIDED)
        valid = m & (ids >= 0) & (ids < E)
        e = tl.where(valid, ids, 0).to(tl.int32)
        key = tl.where(valid, e, -1)
        rank = tl.sum(((key[:, None] == key[None, :]) & (i[None, :] < i[:, None])).to(tl.int32), 1)
        pos = (tl.gather(off, e, axis=0) + rank).to(tl.int64)
        tl.store(send_pos_ptr + offs, tl.where(valid, pos, -1), mask=m)
        if SHIFT:
            # combine gets each destination's chunk back followed by one status row
            tl.store(pair_pos_ptr + offs, tl.where(valid, pos + e // E_l, -1), mask=m)
        tl.store(send_pair_ptr + pos, offs.to(tl.int64), mask=valid)
        off += tl.histogram(e, NBINS, mask=valid)


_launch_place = _Launcher(_place_kernel)


def send_layout(
    topk_idx_TK: Tensor, num_experts: int, world_size: int, count_row: Tensor | None = None
) -> SendLayout:
    """Stable counting sort of the pairs by global expert; see :class:`~moe_ops._layout.SendLayout`
    (and ``count_row``: :func:`moe_ops._kernels.torch_kernels.send_layout`).

    Two kernels: per-block expert histograms, then every block scans the histograms it needs
    and places its pairs (the first also writes the totals and the count row). About 128 blocks
    whatever the size, so neither kernel is a long chain.
    """
    T, K = topk_idx_TK.shape
    P, E = T * K, num_experts
    dev = topk_idx_TK.device
    i64 = dict(dtype=torch.int64, device=dev)
    if P == 0:
        empty = torch.empty((T, K), **i64)
        counts_bad = torch.zeros(E + 1, **i64)
        if count_row is not None:
            _layout.write_count_row(count_row, counts_bad[:E], counts_bad[E])
        return SendLayout(empty, empty, torch.empty(0, **i64), counts_bad)
    if topk_idx_TK.stride(1) != 1:
        topk_idx_TK = topk_idx_TK.contiguous()
    # rows may be strided (slots received in packed rows): read in place
    stride_t = topk_idx_TK.stride(0)
    strided = T > 1 and stride_t != K
    BP = min(max(triton.next_power_of_2(triton.cdiv(P, 128)), _SB), 8192)
    NB = triton.cdiv(P, BP)
    NBINS = max(16, triton.next_power_of_2(E))
    scratch = torch.empty(NB * (E + 1), dtype=torch.int32, device=dev)
    counts, bad = scratch[: NB * E], scratch[NB * E :]
    _launch_hist((NB,), topk_idx_TK, counts, bad, P, E, K, stride_t, NBINS, BP, strided)
    send_pos = torch.empty((T, K), **i64)
    pair_pos = torch.empty((T, K), **i64) if world_size > 1 else send_pos
    send_pair_idx = torch.empty(P, **i64)
    counts_bad = torch.empty(E + 1, **i64)
    _launch_place(
        (NB,),
        topk_idx_TK,
        counts,
        bad,
        send_pos,
        pair_pos,
        send_pair_idx,
        counts_bad,
        counts_bad if count_row is None else count_row,
        P,
        E,
        E // world_size,
        world_size,
        NB,
        0 if count_row is None else count_row.stride(0),
        K,
        stride_t,
        NBINS,
        max(1, min(triton.next_power_of_2(NB), 8192 // NBINS)),
        BP,
        _SB,
        world_size > 1,
        count_row is not None,
        strided,
    )
    return SendLayout(send_pos, pair_pos, send_pair_idx, counts_bad)


@triton.jit
def _source_major_counts(counts_ptr, stride_s, W, E_l, NP: tl.constexpr):
    """Lane ``i = s * E_l + e`` (< W * E_l): the rows source s sent to local expert e."""
    i = tl.arange(0, NP)
    cnt = tl.load(counts_ptr + (i // E_l) * stride_s + i % E_l, mask=i < W * E_l, other=0)
    return i, cnt.to(tl.int64)


@triton.jit
def _spare_rows_and_tokens(i, cnt, perm_ptr, tokens_ptr, R, W, E_l):
    """From the source-major counts: the W spare rows after the R rows of ``perm`` (the last
    row of each source's chunk, plus one), and the rows per local expert."""
    for s in range(0, W):
        tl.store(perm_ptr + R + s, tl.sum(tl.where(i < (s + 1) * E_l, cnt, 0), axis=0) + s)
    e_i = i % E_l
    for e in range(0, E_l):
        tl.store(tokens_ptr + e, tl.sum(tl.where((e_i == e) & (i < W * E_l), cnt, 0), axis=0))


@triton.jit
def _expert_major_rows_kernel(
    counts_ptr, out_ptr, tokens_ptr, stride_s, R, W, E_l, NP: tl.constexpr, BR: tl.constexpr
):
    """Program (j, c) writes rows ``[c * BR, (c + 1) * BR)`` of segment ``j = e * W + s`` (what
    source s sent to local expert e); program (W * E_l, 0) writes the W spare rows and the rows
    per local expert."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    n = W * E_l
    i, cnt = _source_major_counts(counts_ptr, stride_s, W, E_l, NP)
    if j < n:
        src = (j % W) * E_l + j // W
        before_dst = ((i % E_l) * W + i // E_l) < j  # segments before j in expert-major order
        dst_start = tl.sum(tl.where(before_dst & (i < n), cnt, 0), axis=0)
        src_start = tl.sum(tl.where(i < src, cnt, 0), axis=0) + j % W
        n_j = tl.sum(tl.where(i == src, cnt, 0), axis=0)
        r = c * BR + tl.arange(0, BR).to(tl.int64)
        tl.store(out_ptr + dst_start + r, src_start + r, mask=r < n_j)
    elif c == 0:
        _spare_rows_and_tokens(i, cnt, out_ptr, tokens_ptr, R, W, E_l)


_launch_expert_major = _Launcher(_expert_major_rows_kernel)


def expert_major_rows(counts_WEl: Tensor, num_rows: int, max_count: int) -> tuple[Tensor, Tensor]:
    """``moe_ops._layout.expert_major_rows`` and the rows per local expert (``counts.sum(0)``) in
    one kernel (the torch version is a dozen small ops, each a launch on the host's critical
    path right after dispatch's count read). ``max_count``, the largest count (known on the host
    by then), sizes the grid."""
    W, E_l = counts_WEl.shape
    # two buffers: dispatch returns both, and a custom op's outputs must not alias each other
    rows = torch.empty(num_rows + W, dtype=torch.int64, device=counts_WEl.device)
    tokens = torch.empty(E_l, dtype=torch.int64, device=counts_WEl.device)
    BR = 1024
    grid = (W * E_l + 1, max(1, triton.cdiv(max_count, BR)))
    NP = max(16, triton.next_power_of_2(W * E_l))
    _launch_expert_major(
        grid, counts_WEl, rows, tokens, counts_WEl.stride(0), num_rows, W, E_l, NP, BR
    )
    return rows, tokens


@triton.jit
def _regroup_kernel(
    src_ptr,
    counts_ptr,
    dst_ptr,
    perm_ptr,
    tokens_ptr,
    stride_s,
    R,
    H,
    W,
    E_l,
    NP: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
):
    """Rows ``[b * BM, (b + 1) * BM)`` of ``dst``, expert-major, from ``src``, source-major with a
    spare row after each source's chunk; their source rows into ``perm``. The last program
    writes the W spare rows of ``perm`` and the rows per local expert (``tokens``)."""
    b = tl.program_id(0)
    n = W * E_l
    # lane i as source-major segment (s, e) = (i // E_l, i % E_l), and as expert-major
    # segment (e, s) = (i // W, i % W): its count, and where it starts on each side
    i, cnt_sm = _source_major_counts(counts_ptr, stride_s, W, E_l, NP)
    if b * BM >= R:  # the last program
        _spare_rows_and_tokens(i, cnt_sm, perm_ptr, tokens_ptr, R, W, E_l)
        return
    cnt_em = tl.load(counts_ptr + (i % W) * stride_s + i // W, mask=i < n, other=0).to(tl.int64)
    src_start = tl.cumsum(cnt_sm, axis=0) - cnt_sm + i // E_l  # + the spare rows before
    end_em = tl.cumsum(cnt_em, axis=0)
    r = b * BM + tl.arange(0, BM).to(tl.int64)
    rm = r < R
    # segment of each row: the first expert-major segment that ends after it
    j = tl.sum(((end_em[None, :] <= r[:, None]) & (i[None, :] < n)).to(tl.int32), axis=1)
    j = tl.minimum(j, n - 1)
    start_j = tl.gather(end_em - cnt_em, j, axis=0)
    src_j = tl.gather(src_start, (j % W) * E_l + j // W, axis=0)
    src = src_j + (r - start_j)
    tl.store(perm_ptr + r, src, mask=rm)
    for c0 in range(0, H, BH):
        cols = c0 + tl.arange(0, BH)
        m = rm[:, None] & (cols < H)[None, :]
        v = tl.load(src_ptr + src[:, None] * H + cols[None, :], mask=m)
        tl.store(dst_ptr + r[:, None] * H + cols[None, :], v, mask=m)


_launch_regroup = _Launcher(_regroup_kernel)


def regroup_by_expert(
    src_MH: Tensor, counts_WEl: Tensor, num_rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`moe_ops._kernels.torch_kernels.regroup_by_expert` in one kernel: each program
    finds its rows' places from the counts and moves them."""
    W, E_l = counts_WEl.shape
    H = src_MH.shape[1]
    dev = src_MH.device
    dst = src_MH.new_empty((num_rows, H))
    perm = torch.empty(num_rows + W, dtype=torch.int64, device=dev)
    tokens = torch.empty(E_l, dtype=torch.int64, device=dev)
    NP = max(16, triton.next_power_of_2(W * E_l))
    elt = src_MH.element_size()  # tiles of about 8 KiB, rows of up to 1 KiB at a time
    BH = min(triton.next_power_of_2(max(H, 1)), 1024 // elt)
    BM = max(1, min(16, 8192 // (BH * elt)))
    _launch_regroup(
        (triton.cdiv(num_rows, BM) + 1,),
        src_MH.contiguous(),
        counts_WEl,
        dst,
        perm,
        tokens,
        counts_WEl.stride(0),
        num_rows,
        H,
        W,
        E_l,
        NP,
        BM,
        BH,
    )
    return dst, perm, tokens


@triton.jit
def _block_dests(idx_ptr, b, T, K, E, E_l, BT: tl.constexpr, KP: tl.constexpr):
    """Tokens ``t`` of block b, slots ``k``, the in-bounds mask, the expert ids and each slot's
    destination rank (-1 for unused or out-of-range ids): ``[BT, KP]``."""
    t = b * BT + tl.arange(0, BT).to(tl.int64)
    k = tl.arange(0, KP)
    m = (t < T)[:, None] & (k < K)[None, :]
    ids = tl.load(idx_ptr + t[:, None] * K + k[None, :], mask=m, other=-1).to(tl.int64)
    valid = m & (ids >= 0) & (ids < E)
    return t, k, m, ids, tl.where(valid, ids // E_l, -1)


@triton.jit
def _token_slots_kernel(
    idx_ptr, count_ptr, slots_ptr, T, K, E, E_l, W, BT: tl.constexpr, KP: tl.constexpr
):
    """Block b of tokens: ``slots[t * W + d, k]`` (local expert of slot k at rank d, or -1) and
    ``count[b, d]``, the block's tokens with a slot at rank d."""
    b = tl.program_id(0)
    t, k, m, ids, dest = _block_dests(idx_ptr, b, T, K, E, E_l, BT, KP)
    for d in range(0, W):
        hit = dest == d
        slot = tl.where(hit, ids - d * E_l, -1).to(tl.int32)
        tl.store(slots_ptr + (t[:, None] * W + d) * K + k[None, :], slot, mask=m)
        tl.store(count_ptr + b * W + d, tl.sum(tl.max(hit.to(tl.int32), axis=1), axis=0))


_launch_token_slots = _Launcher(_token_slots_kernel)


@triton.jit
def _token_place_kernel(
    idx_ptr,
    count_ptr,
    pos_ptr,
    rows_ptr,
    rows_stride,
    T,
    K,
    E,
    E_l,
    W,
    NB,
    BT: tl.constexpr,
    KP: tl.constexpr,
    RB: tl.constexpr,
):
    """Block b of tokens: ``pos[t, d]``, the row of token t in the buffer sent to rank d (rows by
    destination, then token, one spare row after each destination's), -1 when t has no slot
    there; program 0 also writes ``rows[d]`` (spare rows not counted)."""
    b = tl.program_id(0)
    t, _, _, _, dest = _block_dests(idx_ptr, b, T, K, E, E_l, BT, KP)
    before = tl.zeros([1], dtype=tl.int64)  # rows of the destinations before d
    for d in range(0, W):
        total = tl.zeros([RB], dtype=tl.int64)
        prefix = tl.zeros([RB], dtype=tl.int64)
        for r0 in range(0, NB, RB):
            blocks = r0 + tl.arange(0, RB)
            c = tl.load(count_ptr + blocks * W + d, mask=blocks < NB, other=0).to(tl.int64)
            total += c
            prefix += tl.where(blocks < b, c, 0)
        has = tl.max((dest == d).to(tl.int32), axis=1)
        rank = (tl.cumsum(has, axis=0) - has).to(tl.int64)
        start = tl.sum(before, axis=0) + tl.sum(prefix, axis=0)
        tl.store(pos_ptr + t * W + d, tl.where(has > 0, start + rank, -1), mask=t < T)
        if b == 0:
            tl.store(rows_ptr + d * rows_stride, tl.sum(total, axis=0))
        before += tl.sum(total, axis=0) + 1  # and the spare row


_launch_token_place = _Launcher(_token_place_kernel)


def token_rows(
    topk_idx_TK: Tensor, num_experts: int, world_size: int, rows_out: Tensor | None = None
) -> TokenRows:
    """:func:`moe_ops._layout.token_rows` in two kernels (per block of tokens: its slots and
    counts per rank; then every block scans the counts it needs and places its tokens).
    ``rows_out``: see :func:`moe_ops._kernels.torch_kernels.token_rows`."""
    T, K = topk_idx_TK.shape
    W, E = world_size, num_experts
    dev = topk_idx_TK.device
    pos = torch.empty((T, W), dtype=torch.int64, device=dev)
    rows = torch.empty(W, dtype=torch.int64, device=dev) if rows_out is None else rows_out
    slots = torch.empty((T * W, K), dtype=torch.int32, device=dev)
    if T == 0 or K == 0:
        return TokenRows(pos, rows.zero_(), slots)
    idx = topk_idx_TK.contiguous()
    KP = max(2, triton.next_power_of_2(K))
    BT = max(16, min(256, 4096 // KP))
    NB = triton.cdiv(T, BT)
    count = torch.empty(NB * W, dtype=torch.int32, device=dev)
    _launch_token_slots((NB,), idx, count, slots, T, K, E, E // W, W, BT, KP)
    RB = min(1024, max(16, triton.next_power_of_2(NB)))
    _launch_token_place(
        (NB,), idx, count, pos, rows, rows.stride(0), T, K, E, E // W, W, NB, BT, KP, RB
    )
    return TokenRows(pos, rows, slots)


# ----------------------------------------------------------------------------- row movers
@triton.jit
def _scatter_rows_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    dst_ptr,
    fill_ptr,
    M,
    H,
    K,
    n_fill,
    fill_value,
    src_stride,
    dst_stride,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    FILL: tl.constexpr,
):
    """Programs ``[0, cdiv(M, BM) * cdiv(H, BH))`` move the rows; with ``FILL`` the programs
    after them write ``fill_value`` into the ``n_fill`` rows ``fill[i]`` of dst. Rows of src and
    dst are ``src_stride`` and ``dst_stride`` elements apart (columns contiguous)."""
    pid = tl.program_id(0)
    nhb = tl.cdiv(H, BH)
    cols = (pid % nhb) * BH + tl.arange(0, BH)
    cm = cols < H
    if FILL:
        moving = tl.cdiv(M, BM) * nhb
        if pid >= moving:
            i = ((pid - moving) // nhb) * BM + tl.arange(0, BM)
            im = i < n_fill
            p = tl.load(fill_ptr + i, mask=im, other=0)
            v = (tl.zeros([BM, BH], dtype=tl.float32) + fill_value).to(dst_ptr.dtype.element_ty)
            tl.store(
                dst_ptr + p[:, None] * dst_stride + cols[None, :],
                v,
                mask=im[:, None] & cm[None, :],
            )
            return
    rows = (pid // nhb) * BM + tl.arange(0, BM).to(tl.int64)
    rm = rows < M
    x = tl.load(
        src_ptr + rows[:, None] * src_stride + cols[None, :], mask=rm[:, None] & cm[None, :]
    )
    for k in range(K):
        p = tl.load(pos_ptr + rows * K + k, mask=rm, other=-1)
        if HAS_W:
            w = tl.load(w_ptr + rows * K + k, mask=rm, other=0).to(ACC)
            v = (x.to(ACC) * w[:, None]).to(dst_ptr.dtype.element_ty)
        else:
            v = x
        tl.store(
            dst_ptr + p[:, None] * dst_stride + cols[None, :],
            v,
            mask=(p >= 0)[:, None] & cm[None, :],
        )


_launch_scatter = _Launcher(_scatter_rows_kernel)


def scatter_rows(
    src_MH: Tensor, pos_MK: Tensor, w_MK: Tensor | None, num_rows: int, out: Tensor | None = None
) -> Tensor:
    """``dst[pos[m, k]] = src[m]`` (times ``w[m, k]`` in the accumulation dtype, then cast back).

    ``pos_MK`` int64 ``[M, K]`` (-1: skip). Returns ``dst`` ``[num_rows, H]`` in src's dtype
    (``out`` if given: rows may be strided, columns contiguous); rows no pair points at are left
    as they were. ``src_MH`` may have strided rows too.
    """
    H = src_MH.shape[1]
    dst = src_MH.new_empty((num_rows, H)) if out is None else out
    _scatter(src_MH, pos_MK, w_MK, dst, None, 0.0)
    return dst


def place_rows(
    src_MH: Tensor, dest_M: Tensor, out: Tensor, fill_rows: Tensor | None = None, value: float = 0
) -> Tensor:
    """``out[dest[m]] = src[m]`` for a ``dest_M`` of distinct valid rows, and ``value`` in the
    rows ``fill_rows`` (distinct from ``dest_M``'s) if given, in one kernel; returns ``out``."""
    _scatter(src_MH, dest_M[:, None], None, out, fill_rows, value)
    return out


def _scatter(src_MH, pos_MK, w_MK, dst, fill_rows, value) -> None:
    M, H = src_MH.shape
    K = pos_MK.shape[1]
    n_fill = 0 if fill_rows is None else fill_rows.shape[0]
    if K == 0:
        M = 0
    if (M == 0 and n_fill == 0) or H == 0 or dst.shape[0] == 0:
        return
    if src_MH.stride(1) != 1:
        src_MH = src_MH.contiguous()
    if dst.stride(1) != 1:
        raise ValueError("moe_ops: scatter_rows needs contiguous columns in out")
    BM, BH, nw = _row_block(H, src_MH.element_size())
    grid = ((triton.cdiv(M, BM) + triton.cdiv(n_fill, BM)) * triton.cdiv(H, BH),)
    _launch_scatter(
        grid,
        src_MH,
        pos_MK.contiguous(),
        w_MK.contiguous() if w_MK is not None else pos_MK,
        dst,
        pos_MK if fill_rows is None else fill_rows,
        M,
        H,
        K,
        n_fill,
        float(value),
        src_MH.stride(0),
        dst.stride(0),
        w_MK is not None,
        _acc_tl(src_MH.dtype),
        BM,
        BH,
        fill_rows is not None,
        num_warps=nw,
    )


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    idx_ptr,
    w_ptr,
    dst_ptr,
    M,
    H,
    per_row,
    stride_s,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
):
    pid = tl.program_id(0)
    nhb = tl.cdiv(H, BH)
    rows = (pid // nhb) * BM + tl.arange(0, BM).to(tl.int64)
    cols = (pid % nhb) * BH + tl.arange(0, BH)
    rm = rows < M
    mask = rm[:, None] & (cols < H)[None, :]
    s = tl.load(idx_ptr + rows, mask=rm, other=0) // per_row
    src = src_ptr + s[:, None] * stride_s + cols[None, :]
    v = tl.load(src, mask=mask & (s >= 0)[:, None], other=0)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rm, other=0).to(ACC)
        v = (v.to(ACC) * w[:, None]).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + rows[:, None] * H + cols[None, :], v, mask=mask)


_launch_gather = _Launcher(_gather_rows_kernel)


def gather_rows(
    src_SH: Tensor,
    idx_M: Tensor,
    w_M: Tensor | None = None,
    per_row: int = 1,
    negative: bool = False,
) -> Tensor:
    """``dst[i] = src[idx[i] // per_row]`` (times ``w[i]``, in the accumulation dtype): ``[M,
    H]``; negative entries of ``idx`` give zero rows (the kernel masks them whatever
    ``negative`` says: the mask costs nothing there). ``src`` may have strided rows."""
    M = idx_M.shape[0]
    H = src_SH.shape[1]
    dst = src_SH.new_empty((M, H))
    if M == 0 or H == 0:
        return dst
    if src_SH.stride(1) != 1:
        src_SH = src_SH.contiguous()
    BM, BH, nw = _row_block(H, src_SH.element_size())
    grid = (triton.cdiv(M, BM) * triton.cdiv(H, BH),)
    _launch_gather(
        grid,
        src_SH,
        idx_M.contiguous(),
        w_M.contiguous() if w_M is not None else idx_M,
        dst,
        M,
        H,
        per_row,
        src_SH.stride(0),
        w_M is not None,
        _acc_tl(src_SH.dtype),
        BM,
        BH,
        num_warps=nw,
    )
    return dst


# ----------------------------------------------------------------------------- combine
@triton.jit
def _token_tile(T, H, BT: tl.constexpr, BH: tl.constexpr):
    """This program's tile of a ``[T, H]`` output of per-token sums: its BT token rows (int64)
    and BH columns, and their masks."""
    pid = tl.program_id(0)
    nhb = tl.cdiv(H, BH)
    tok = (pid // nhb) * BT + tl.arange(0, BT).to(tl.int64)
    cols = (pid % nhb) * BH + tl.arange(0, BH)
    return tok, cols, tok < T, cols < H


@triton.jit
def _store_tile(out_ptr, acc, tok, cols, tm, cm, H):
    """A tile of sums (:func:`_token_tile`) into the contiguous ``[T, H]`` output, in its dtype."""
    tl.store(
        out_ptr + tok[:, None] * H + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=tm[:, None] & cm[None, :],
    )


@triton.jit
def _combine_kernel(
    rows_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    T,
    H,
    K,
    HAS_W: tl.constexpr,
    ACC: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    tok, cols, tm, cm = _token_tile(T, H, BT, BH)
    acc = tl.zeros((BT, BH), dtype=ACC)
    for k in range(K):
        p = tl.load(pos_ptr + tok * K + k, mask=tm, other=-1)
        ok = p >= 0
        r = tl.load(
            rows_ptr + p[:, None] * H + cols[None, :], mask=ok[:, None] & cm[None, :], other=0
        ).to(ACC)
        if HAS_W:
            w = tl.load(w_ptr + tok * K + k, mask=tm, other=0).to(ACC)
            r = r * w[:, None]
        acc += tl.where(ok[:, None], r, 0.0)
    _store_tile(out_ptr, acc, tok, cols, tm, cm, H)


_launch_combine = _Launcher(_combine_kernel)


def combine_rows(
    rows_MH: Tensor,
    pair_pos_TK: Tensor,
    topk_weights_TK: Tensor | None,
    out_dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum_k w[t, k] * rows[pair_pos[t, k]]``, as ``torch_kernels.combine_rows``."""
    T, K = pair_pos_TK.shape
    H = rows_MH.shape[1]
    if out is None:
        out = torch.empty((T, H), dtype=out_dtype, device=rows_MH.device)
    assert out.is_contiguous() and out.shape == (T, H) and out.dtype == out_dtype
    if T == 0 or H == 0:
        return out
    BT, BH, nw = _combine_block(H)
    grid = (triton.cdiv(T, BT) * triton.cdiv(H, BH),)
    _launch_combine(
        grid,
        rows_MH.contiguous(),
        pair_pos_TK.contiguous(),
        topk_weights_TK.contiguous() if topk_weights_TK is not None else pair_pos_TK,
        out,
        T,
        H,
        K,
        topk_weights_TK is not None,
        _acc_tl(out_dtype),
        BT,
        BH,
        num_warps=nw,
        enable_fp_fusion=False,
    )
    return out


@triton.jit
def _slot_dot_kernel(
    g_ptr,
    rows_ptr,
    pos_ptr,
    out_ptr,
    T,
    H,
    K,
    ACC: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    k = tl.program_id(0)
    tok = tl.program_id(1) * BT + tl.arange(0, BT).to(tl.int64)
    tm = tok < T
    p = tl.load(pos_ptr + tok * K + k, mask=tm, other=-1)
    ok = p >= 0
    acc = tl.zeros((BT, BH), dtype=ACC)
    for h0 in range(0, H, BH):
        cols = h0 + tl.arange(0, BH)
        cm = cols < H
        g = tl.load(
            g_ptr + tok[:, None] * H + cols[None, :], mask=tm[:, None] & cm[None, :], other=0
        )
        r = tl.load(
            rows_ptr + p[:, None] * H + cols[None, :], mask=ok[:, None] & cm[None, :], other=0
        )
        acc += g.to(ACC) * r.to(ACC)
    d = tl.where(ok, tl.sum(acc, axis=1), 0.0)
    tl.store(out_ptr + tok * K + k, d.to(out_ptr.dtype.element_ty), mask=tm)


_launch_slot_dot = _Launcher(_slot_dot_kernel)


def slot_dot(
    grad_TH: Tensor, rows_MH: Tensor, pair_pos_TK: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``g[t, k] = <grad[t], rows[pair_pos[t, k]]>`` (0 for -1 slots), as
    ``torch_kernels.slot_dot`` (summed in another order)."""
    T, K = pair_pos_TK.shape
    H = grad_TH.shape[1]
    out = torch.empty((T, K), dtype=out_dtype, device=grad_TH.device)
    if T == 0 or K == 0:
        return out
    BT = 4
    BH = min(triton.next_power_of_2(max(H, 16)), 512)
    _launch_slot_dot(
        (K, triton.cdiv(T, BT)),
        grad_TH.contiguous(),
        rows_MH.contiguous(),
        pair_pos_TK.contiguous(),
        out,
        T,
        H,
        K,
        _acc_tl(grad_TH.dtype),
        BT,
        BH,
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------- capacity mode
@triton.jit
def _zero_tail_kernel(dst_ptr, n_ptr, M, H, BM: tl.constexpr, BH: tl.constexpr):
    pid = tl.program_id(0)
    nhb = tl.cdiv(H, BH)
    row0 = (pid // nhb) * BM
    n = tl.load(n_ptr)
    if row0 + BM > n:
        rows = row0 + tl.arange(0, BM).to(tl.int64)
        cols = (pid % nhb) * BH + tl.arange(0, BH)
        mask = ((rows >= n) & (rows < M))[:, None] & (cols < H)[None, :]
        zero = tl.zeros((BM, BH), dtype=dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + rows[:, None] * H + cols[None, :], zero, mask=mask)


_launch_zero_tail = _Launcher(_zero_tail_kernel)


def zero_tail(dst_MH: Tensor, n: Tensor) -> Tensor:
    """``dst[n:] = 0`` in place, with ``n`` an int64 tensor on the device (no host sync)."""
    M, H = dst_MH.shape
    if M == 0 or H == 0:
        return dst_MH
    BM, BH, nw = _row_block(H, dst_MH.element_size())
    grid = (triton.cdiv(M, BM) * triton.cdiv(H, BH),)
    _launch_zero_tail(grid, dst_MH, n.reshape(1), M, H, BM, BH, num_warps=nw)
    return dst_MH


@triton.jit
def _fixed_plan_kernel(
    every_ptr,
    start_ptr,
    kept_ptr,
    off_ptr,
    kept_se_ptr,
    tpe_ptr,
    num_recv_ptr,
    num_dropped_ptr,
    ok_ptr,
    W,
    X,
    col_bad,
    col_T,
    col_per_rank,
    E_l,
    C,
    rank,
    rows_per_token,
    checks,
    BE: tl.constexpr,
    BW: tl.constexpr,
):
    """One program: the plan, destination by destination (``every`` is ``[W, X]``: the counts,
    then the columns ``col_*``, ``moe_ops._layout.FIXED_COLUMNS`` after them)."""
    e = tl.arange(0, BE)
    em = e < E_l
    tpe = tl.zeros([BE], dtype=tl.int64)
    overflow = tl.zeros([BE], dtype=tl.int64)
    dropped = tl.zeros([BE], dtype=tl.int64)
    sent = tl.zeros([1], dtype=tl.int64)  # this rank's pairs of the destinations before d
    for d in range(0, W):
        total = tl.zeros([BE], dtype=tl.int64)
        for s in range(0, W):
            total += tl.load(every_ptr + s * X + d * E_l + e, mask=em, other=0)
        ahead = tl.cumsum(total, axis=0) - total  # rows of the experts before e at rank d
        for s in range(0, W):
            cnt = tl.load(every_ptr + s * X + d * E_l + e, mask=em, other=0)
            kept = tl.minimum(tl.maximum(C - ahead, 0), cnt)
            overflow += cnt - kept
            mine = em & ((e * 0 + s) == rank)  # (a vector compare: interpreter-safe)
            tl.store(off_ptr + d * E_l + e, ahead, mask=mine)
            tl.store(kept_ptr + d * E_l + e, kept, mask=mine)
            dropped += tl.where(mine, cnt - kept, 0)
            to_me = em & ((e * 0 + d) == rank)
            tl.store(kept_se_ptr + s * E_l + e, kept, mask=to_me)
            tpe += tl.where(to_me, kept, 0)
            ahead += cnt
        cnt = tl.load(every_ptr + rank * X + d * E_l + e, mask=em, other=0)
        tl.store(
            start_ptr + d * E_l + e, tl.sum(sent, axis=0) + tl.cumsum(cnt, axis=0) - cnt, mask=em
        )
        sent += tl.sum(cnt, axis=0)
    tl.store(tpe_ptr + e, tpe, mask=em)
    tl.store(num_recv_ptr, tl.sum(tpe, axis=0))
    tl.store(num_dropped_ptr, tl.sum(dropped, axis=0))
    w = tl.arange(0, BW)
    wm = w < W
    bad = tl.load(every_ptr + w * X + col_bad, mask=wm, other=0)
    T_w = tl.load(every_ptr + w * X + col_T, mask=wm, other=0)
    rows = tl.minimum(T_w * rows_per_token, C)
    rows0 = tl.minimum(tl.load(every_ptr + col_T) * rows_per_token, C)
    per_rank = tl.load(every_ptr + w * X + col_per_rank, mask=wm, other=0)
    per_rank0 = tl.load(every_ptr + col_per_rank)
    ok0 = tl.max(bad, axis=0) == 0
    ok1 = tl.sum((wm & (rows != rows0)).to(tl.int32), axis=0) == 0
    ok2 = tl.sum((wm & (per_rank != per_rank0)).to(tl.int32), axis=0) == 0
    ok3 = tl.sum(overflow, axis=0) == 0
    tl.store(ok_ptr + 0, ok0.to(tl.int64))
    tl.store(ok_ptr + 1, ok1.to(tl.int64))
    tl.store(ok_ptr + 2, ok2.to(tl.int64))
    tl.store(ok_ptr + 3, ok3.to(tl.int64))
    every_ok = (
        (ok0 | ((checks & 1) == 0))
        & (ok1 | ((checks & 2) == 0))
        & (ok2 | ((checks & 4) == 0))
        & (ok3 | ((checks & 8) == 0))
    )
    tl.store(ok_ptr + 4, every_ok.to(tl.int64))


_launch_fixed_plan = _Launcher(_fixed_plan_kernel)


def fixed_plan(
    every_WX: Tensor, num_experts: int, capacity: int, rank: int, rows_per_token: int, checks: int
) -> FixedPlan:
    """:func:`moe_ops._kernels.torch_kernels.fixed_plan` in one kernel of one program."""
    W, E = every_WX.shape[0], num_experts
    E_l = E // W
    dev = every_WX.device
    i64 = dict(dtype=torch.int64, device=dev)
    plan = FixedPlan(
        start_E=torch.empty(E, **i64),
        kept_E=torch.empty(E, **i64),
        off_E=torch.empty(E, **i64),
        kept_se=torch.empty((W, E_l), **i64),
        tokens_per_expert=torch.empty(E_l, **i64),
        num_recv=torch.empty(1, **i64),
        num_dropped=torch.empty((), **i64),
        ok=torch.empty(5, **i64),
    )
    BE = max(16, triton.next_power_of_2(E_l))
    BW = max(2, triton.next_power_of_2(W))
    every = every_WX.contiguous()
    cols = (E + c for c in _layout.FIXED_COLUMNS)
    args = (W, every.shape[1], *cols, E_l, capacity, rank, rows_per_token, checks, BE, BW)
    _launch_fixed_plan((1,), every, *plan, *args)
    return plan


@triton.jit
def _fixed_token_rows_kernel(
    idx_ptr,
    send_pos_ptr,
    start_ptr,
    kept_ptr,
    off_ptr,
    pair_pos_ptr,
    token_pos_ptr,
    slots_ptr,
    T,
    K,
    E_l,
    W,
    S,
    slots_stride,
    BT: tl.constexpr,
    KP: tl.constexpr,
):
    """Program d: destination d, the tokens in blocks of BT in order (a running count of the
    rows taken), then -1 into the rest of d's chunk."""
    d = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    km = k < K
    taken = tl.zeros([1], dtype=tl.int64)
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT).to(tl.int64)
        tm = t < T
        m = tm[:, None] & km[None, :]
        sp = tl.load(send_pos_ptr + t[:, None] * K + k[None, :], mask=m, other=-1)
        valid = sp >= 0
        g = tl.where(valid, tl.load(idx_ptr + t[:, None] * K + k[None, :], mask=m, other=0), 0)
        g = g.to(tl.int64)
        to_d = valid & (g // E_l == d)
        j = sp - tl.load(start_ptr + g, mask=to_d, other=0)
        keep = to_d & (j < tl.load(kept_ptr + g, mask=to_d, other=0))
        dest = tl.where(keep, tl.load(off_ptr + g, mask=to_d, other=0) + j, -1)
        # each pair once: at its destination's turn, or at the first turn when unused
        tl.store(
            pair_pos_ptr + t[:, None] * K + k[None, :],
            dest,
            mask=m & (to_d | (~valid & ((k[None, :] * 0 + d) == 0))),
        )
        has = tl.max(keep.to(tl.int32), axis=1)
        row = d * S + tl.sum(taken, axis=0) + tl.cumsum(has, axis=0).to(tl.int64) - 1
        tl.store(token_pos_ptr + t * W + d, tl.where(has > 0, row, -1), mask=tm)
        tl.store(
            slots_ptr + row[:, None] * slots_stride + k[None, :],
            dest,
            mask=(has > 0)[:, None] & km[None, :],
        )
        taken += tl.sum(has, axis=0)
    for r0 in range(0, S, BT):
        r = r0 + tl.arange(0, BT).to(tl.int64)
        rm = (r >= tl.sum(taken, axis=0)) & (r < S)
        minus = tl.full([BT, KP], -1, dtype=tl.int64)
        tl.store(
            slots_ptr + (d * S + r)[:, None] * slots_stride + k[None, :],
            minus,
            mask=rm[:, None] & km[None, :],
        )


_launch_fixed_token_rows = _Launcher(_fixed_token_rows_kernel)


def fixed_token_rows(
    topk_idx_TK: Tensor,
    send_pos_TK: Tensor,
    plan: FixedPlan,
    W: int,
    S: int,
    slots_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`moe_ops._kernels.torch_kernels.fixed_token_rows` in one kernel, a program per
    destination."""
    T, K = topk_idx_TK.shape
    dev = topk_idx_TK.device
    i64 = dict(dtype=torch.int64, device=dev)
    pair_pos = torch.empty((T, K), **i64)
    token_pos = torch.empty((T, W), **i64)
    slots = torch.empty((W * S, K), **i64) if slots_out is None else slots_out
    if slots.stride(1) != 1:
        raise ValueError("moe_ops: fixed_token_rows needs contiguous columns in slots_out")
    if W * S == 0 and T * K == 0:
        return pair_pos, token_pos, slots
    KP = max(2, triton.next_power_of_2(K))
    BT = max(16, min(128, 2048 // KP))
    _launch_fixed_token_rows(
        (W,),
        topk_idx_TK.contiguous(),
        send_pos_TK.contiguous(),
        plan.start_E,
        plan.kept_E,
        plan.off_E,
        pair_pos,
        token_pos,
        slots,
        T,
        K,
        plan.kept_E.shape[0] // W,
        W,
        S,
        slots.stride(0),
        BT,
        KP,
        num_warps=4,
    )
    return pair_pos, token_pos, slots


# ----------------------------------------------------------------------------- p2p transport
@triton.jit
def _pull_chunks_kernel(
    ptrs_ptr, out_ptr, first_row, S, N, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr
):
    """Program (b, r): one ``[BM, BN]`` tile (tile b, row-block major) of chunk r, read from
    rank r's buffer (its address in ``ptrs[r]``) starting at row ``first_row``; N words a row.
    Tiles on the first grid axis, the only one without a 65535 limit. One tile a program, no
    loop: as many loads in flight as the GPU holds programs, which reads over NVLink need."""
    r = tl.program_id(1)
    b = tl.program_id(0)
    col_blocks = tl.cdiv(N, BN)
    src_ptr = tl.load(ptrs_ptr + r).to(tl.pointer_type(DT))
    rows = (b // col_blocks) * BM + tl.arange(0, BM)
    cols = (b % col_blocks) * BN + tl.arange(0, BN)
    mask = (rows < S)[:, None] & (cols < N)[None, :]
    src_rows = (first_row + rows).to(tl.int64) * N
    dst_rows = (r * S + rows).to(tl.int64) * N
    v = tl.load(src_ptr + src_rows[:, None] + cols[None, :], mask=mask)
    tl.store(out_ptr + dst_rows[:, None] + cols[None, :], v, mask=mask)


_launch_pull = _Launcher(_pull_chunks_kernel)
_WORDS = {  # bytes -> the integer type rows are copied as
    1: (torch.int8, tl.int8),
    2: (torch.int16, tl.int16),
    4: (torch.int32, tl.int32),
    8: (torch.int64, tl.int64),
}
_TL_FLOAT = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _pull_word(row_bytes: int, tensors: list[Tensor]) -> int:
    """The widest word (8, 4, 2 or 1 bytes) that divides a row and every tensor's address."""
    align = functools.reduce(math.gcd, [t.data_ptr() for t in tensors], row_bytes)
    return next(w for w in (8, 4, 2, 1) if align % w == 0)


def _pull_tile(N: int, word: int) -> tuple[int, int]:
    """(rows, words) of one pull program's tile: up to 2 KiB of a row, 4 KiB in all."""
    BN = min(triton.next_power_of_2(max(N, 1)), 2048 // word)
    return max(1, 4096 // (BN * word)), BN


def pull_chunks(peers: list[Tensor], peer_ptrs: Tensor, out: Tensor, first_row: int) -> Tensor:
    """``out[r * S : (r + 1) * S] = peers[r][first_row : first_row + S]`` for every rank r, with
    ``S = out.shape[0] / W``: the ``"p2p"`` transport's read of every rank's symmetric buffer,
    one kernel for all ranks (``peer_ptrs``: the buffers' addresses; rows copied as the widest
    words that divide them). Rows are contiguous: ``out`` is fresh memory, the buffers whole."""
    W = peer_ptrs.shape[0]
    S = out.shape[0] // W
    row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
    if S == 0 or row_bytes == 0:
        return out
    word = _pull_word(row_bytes, [out, *peers])
    torch_word, tl_word = _WORDS[word]
    N = row_bytes // word
    BM, BN = _pull_tile(N, word)
    grid = (triton.cdiv(S, BM) * triton.cdiv(N, BN), W)
    _launch_pull(
        grid,
        peer_ptrs,
        out.view(-1).view(torch_word),
        first_row,
        S,
        N,
        BM,
        BN,
        tl_word,
        num_warps=4,
    )
    return out


@triton.jit
def _pull_sum_kernel(
    ptrs_ptr,
    pos_ptr,
    out_ptr,
    first_row,
    S,
    T,
    H,
    W: tl.constexpr,
    DT: tl.constexpr,
    ACC: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    """``out[t] = sum_r peer_r[first_row + pos[t, r] - r * S]`` over the ranks with
    ``pos[t, r] >= 0``, in rank order, accumulated in ACC: ``_combine_kernel`` without weights
    over rows read straight from the peers' buffers. The loop over the W ranks is unrolled, so
    that a program's W reads are in flight together (each crosses NVLink)."""
    tok, cols, tm, cm = _token_tile(T, H, BT, BH)
    acc = tl.zeros((BT, BH), dtype=ACC)
    for r in tl.static_range(W):
        src_ptr = tl.load(ptrs_ptr + r).to(tl.pointer_type(DT))
        p = tl.load(pos_ptr + tok * W + r, mask=tm, other=-1)
        ok = p >= 0
        row = first_row + p - r * S
        v = tl.load(
            src_ptr + row[:, None] * H + cols[None, :], mask=ok[:, None] & cm[None, :], other=0
        ).to(ACC)
        acc += tl.where(ok[:, None], v, 0.0)
    _store_tile(out_ptr, acc, tok, cols, tm, cm, H)


_launch_pull_sum = _Launcher(_pull_sum_kernel)


def pull_sum(
    peers: list[Tensor], peer_ptrs: Tensor, pos_TW: Tensor, first_row: int, S: int
) -> Tensor:
    """``combine_rows(pulled, pos_TW, None, dtype)`` where ``pulled`` is what
    :func:`pull_chunks` would read (chunks of S rows from ``first_row``), in one kernel that
    reads each token's rows straight from the peers' buffers: no ``[W * S, H]`` copy."""
    T, W = pos_TW.shape
    H = peers[0].shape[1]
    dtype = peers[0].dtype
    out = torch.empty((T, H), dtype=dtype, device=pos_TW.device)
    if T == 0 or H == 0:
        return out
    # small tiles (2 KiB of a row from each rank): many programs, many reads in flight
    BH = min(triton.next_power_of_2(H), 2048 // dtype.itemsize)
    BT, nw = max(1, 1024 // BH), 4
    grid = (triton.cdiv(T, BT) * triton.cdiv(H, BH),)
    _launch_pull_sum(
        grid,
        peer_ptrs,
        pos_TW.contiguous(),
        out,
        first_row,
        S,
        T,
        H,
        W,
        _TL_FLOAT[dtype],
        _acc_tl(dtype),
        BT,
        BH,
        num_warps=nw,
        enable_fp_fusion=False,
    )
    return out
