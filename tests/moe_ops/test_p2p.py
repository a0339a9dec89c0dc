"""The ``"p2p"`` transport's exchanges (``moe_ops._comm.EqualChunks`` over CUDA symmetric memory)
against NCCL's ``all_to_all_single`` (marked ``gpu``; a test for W ranks skips, saying why, with
fewer than W GPUs).

* every dtype the ops move (bf16 rows, float32 weights, int64 counts), odd widths, one row and
  many, the Triton pull kernel and the plain torch copies: the same bits as NCCL; the rows
  summed per token as they are read (``exchange_sum``) too;
* calls back to back through the same buffer (the next call's writes must wait for every peer's
  reads of the last one), with one rank held back on the device so that the others run ahead;
* a whole op call: dispatch + combine with ``transport="p2p"`` issues no NCCL call.

End-to-end dispatch / combine / CUDA-graph cases with this transport are in
``test_fixed_capacity.py`` and ``test_cuda_graphs.py``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

import moe_ops
from moe_ops import _comm, _kernels
from tests.moe_ops._cases import rank_and_world, triton_kernels

pytestmark = pytest.mark.gpu

SHAPES = [  # (rows per peer, width, dtype)
    (1, 9, torch.int64),
    (5, 3, torch.float32),
    (64, 4099, torch.bfloat16),
    (130, 7, torch.float16),
    (128, 7168, torch.bfloat16),  # decode's token rows: 8-byte words, several column tiles
]


def _group_name() -> str:
    return dist.group.WORLD.group_name


def _chunks(op: str, transport: str, exchanges: int = 1) -> _comm.EqualChunks:
    return _comm.EqualChunks(dist.group.WORLD, _group_name(), transport, op, exchanges)


def _send(rows: int, width: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    r, W = rank_and_world()
    n = W * rows * width
    vals = torch.arange(n, device="cuda") * 7 + 1000 * r + salt
    return (vals % 251 - 125).to(dtype).view(W * rows, width)


def exchange_case(triton: bool) -> None:
    with triton_kernels(triton):
        for rows, width, dtype in SHAPES:
            send = _send(rows, width, dtype, 0)
            want = _chunks("t", "padded").exchange(send)
            # the send buffer written in place (the ops' way) and a tensor copied in
            p2p = _chunks("t", "p2p")
            buf = p2p.send_buffer(tuple(send.shape), dtype, send.device)
            buf.copy_(send)
            got_in_place = p2p.exchange(buf)
            got_copied = _chunks("t", "p2p").exchange(send)
            assert torch.equal(got_in_place, want), (rows, width, dtype)
            assert torch.equal(got_copied, want), (rows, width, dtype)
            row = send[0]
            assert torch.equal(_chunks("g", "p2p").gather(row), _chunks("g", "padded").gather(row))


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_exchange_matches_nccl(nccl_world, W, triton):
    nccl_world(W).run(exchange_case, triton)


def exchange_sum_case(triton: bool) -> None:
    r, W = rank_and_world()
    g = torch.Generator().manual_seed(r)
    with triton_kernels(triton):
        for rows, width, dtype in SHAPES:
            if not dtype.is_floating_point:
                continue
            # each token a random row of each rank's chunk, or none (-1) for some ranks; random
            # values, so that another summation order would show in the bits
            T = 2 * rows + 1
            pos = torch.randint(0, rows, (T, W), generator=g) + torch.arange(W) * rows
            pos = torch.where(torch.rand((T, W), generator=g) < 0.3, -1, pos).cuda()
            send = torch.randn((W * rows, width), generator=g).to("cuda", dtype)
            want = _chunks("s", "padded").exchange_sum(send)(pos)
            got = _chunks("s", "p2p").exchange_sum(send)(pos)
            assert torch.equal(got, want), (rows, width, dtype)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_exchange_sum_matches_nccl(nccl_world, W, triton):
    """The sums back read straight from the peers' buffers (``pull_sum``) equal NCCL's exchange
    followed by the combine kernel, bit for bit."""
    nccl_world(W).run(exchange_sum_case, triton)


def back_to_back_case(calls: int, exchanges: int) -> None:
    """``calls`` op calls of ``exchanges`` exchanges each, issued without a host wait; in each
    exchange one rank spins on the device between the barrier and its read, so that the others
    run ahead to their next writes: they must not overwrite what it has yet to read."""
    r, W = rank_and_world()
    rows, width = 256, 1024
    kern = _kernels.for_device(torch.device("cuda"))
    real_pull = kern.pull_chunks
    slow = [False]

    def late_pull(*args):
        if slow[0]:
            torch.cuda._sleep(2_000_000)
        return real_pull(*args)

    got = []
    with mock.patch.object(kern, "pull_chunks", late_pull):
        for i in range(calls):
            ex = _chunks(f"b2b{exchanges}", "p2p", exchanges)
            for j in range(exchanges):
                slow[0] = r == (i + j) % W
                buf = ex.send_buffer((W * rows, width), torch.float32, torch.device("cuda"))
                buf.copy_(_send_of(r, rows, width, i * exchanges + j))
                got.append(ex.exchange(buf))
    for n, g in enumerate(got):
        sent = [_send_of(s, rows, width, n).view(W, rows, width)[r] for s in range(W)]
        assert torch.equal(g, torch.cat(sent)), f"exchange {n}"


def _send_of(rank: int, rows: int, width: int, salt: int) -> torch.Tensor:
    """What rank ``rank`` sent in :func:`back_to_back_case`'s call ``salt``."""
    _, W = rank_and_world()
    n = W * rows * width
    vals = torch.arange(n, device="cuda") * 7 + 1000 * rank + salt
    return (vals % 251 - 125).to(torch.float32).view(W * rows, width)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("exchanges", [1, 2, 3])
def test_back_to_back_calls(nccl_world, W, exchanges):
    """The overwrite rule of ``moe_ops._comm.EqualChunks``: one barrier more before calls of a
    single exchange, none for calls of two or more."""
    nccl_world(W).run(back_to_back_case, 12, exchanges)


def no_nccl_case() -> int:
    r, W = rank_and_world()
    E, T, K, H = 4 * W, 32, 4, 64
    g = torch.Generator().manual_seed(r)
    x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    idx = torch.randint(0, E, (T, K), generator=g).cuda()
    w = torch.rand(T, K, generator=g).cuda()
    calls = []
    real = _comm.all_to_all
    _comm.all_to_all = lambda *a: (calls.append(1), real(*a))[1]
    try:
        for sum_per_rank in (False, True):
            outs = []
            for transport in ("padded", "p2p"):
                before = len(calls)
                recv_x, handle = moe_ops.dispatch(
                    x,
                    idx,
                    E,
                    capacity="worst-case",
                    transport=transport,
                    sum_per_rank=sum_per_rank,
                )
                outs.append(moe_ops.combine(recv_x * 2, handle, w))
                if transport == "p2p":
                    assert len(calls) == before, "p2p issued an NCCL call"
            assert torch.equal(outs[0], outs[1])
    finally:
        _comm.all_to_all = real
    return len(calls)


@pytest.mark.parametrize("W", [2, 4])
def test_ops_issue_no_nccl_call(nccl_world, W):
    assert all(n > 0 for n in nccl_world(W).run(no_nccl_case))  # the padded calls were seen


def mixed_backends_case() -> str:
    r, W = rank_and_world()
    E, T, K, H = 4 * W, 16, 2, 32
    x = torch.randn(T, H, device="cuda")
    idx = torch.randint(0, E, (T, K), device="cuda")
    moe_ops.dispatch(x, idx, E, capacity="worst-case", transport="p2p")
    try:
        moe_ops.dispatch(x, idx, E, capacity="worst-case", transport="nvshmem")
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("W", [2])
def test_p2p_then_nvshmem_is_a_clear_error(nccl_world, W):
    """torch's symmetric memory takes one backend per process: 'nvshmem' after 'p2p' raises a
    ValueError saying so on every rank (torch's own error would be 'Backend can not be changed
    after use')."""
    if not _comm.nvshmem_available():
        pytest.skip("this PyTorch build has no usable NVSHMEM")
    for msg in nccl_world(W, "mixed").run(mixed_backends_case):
        assert "one backend per process" in msg, msg
