"""Does overlapping dispatch with expert compute pay? ``moe_ops._pipeline.chunked_moe`` (an
experiment, not public API) against plain dispatch -> experts -> combine, on a routed-experts
layer (SwiGLU experts, grouped GEMMs).

    torchrun --nproc-per-node 1 examples/bench_overlap.py            # GPU, W = 1
    torchrun --nproc-per-node 2 examples/bench_overlap.py            # GPU, W = 2 (NCCL)
    python examples/bench_overlap.py --world-size 2 --quick          # CPU, gloo (a smoke run)

Per shape (T tokens per rank, hidden H, expert width I, top-K of E experts, bf16 on GPUs):

* experts: the local experts alone on a dispatched ``recv_x`` (the compute there is to hide under);
  d+c: dispatch + combine with no expert compute (what there is to hide).
* chunks=1: ``dispatch``, experts, ``combine`` (what ``chunked_moe(chunks=1)`` runs); chunks=n:
  ``chunked_moe(..., chunks=n)``: micro-batch i + 1 dispatched on a side stream while the experts
  of micro-batch i run (see ``moe_ops/_pipeline.py``). fwd and fwd+bwd (grads of x, the routing
  weights and the expert weights, from no gradients as after ``zero_grad``).
* vs 1: time of chunks=1 / time of chunks=n (> 1: overlap wins).
* syncs: device -> host syncs per forward (``torch.cuda.set_sync_debug_mode``); a2a:
  ``all_to_all_single`` calls per forward.
* max |diff|: chunked forward against chunks=1 (the grouped GEMM may pick other tilings for other
  row counts, so bf16 results can differ in the last bit).

Timing as in ``bench_dispatch_combine.py`` (its ``_Meter``): warm-up, CUDA events, median of
``--iters`` over rotating random input sets, slowest rank at W > 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tabulate import tabulate

import moe_ops
from moe_ops._pipeline import chunked_moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch_combine import _Meter, _routing, launch  # noqa: E402

# E = 64 at H = 7168: with E = 256 the weights and their gradients (45 GB) leave too little of an
# H100 for the activations at W = 1.
_GPU_SHAPES = "4096,2048,5632,2,8;4096,7168,2048,8,64;16384,7168,2048,8,64"
_CPU_SHAPES = "256,128,256,2,8"


class StackedSwiGLU(torch.nn.Module):
    """This rank's experts, weights stacked ``[E_l, ...]``: one grouped GEMM per projection."""

    def __init__(self, num_local: int, hidden: int, inter: int, device, dtype, gen):
        super().__init__()

        def w(*shape):
            t = torch.randn(*shape, device=device, generator=gen) * shape[-2] ** -0.5
            return torch.nn.Parameter(t.to(dtype))

        self.gate_up = w(num_local, hidden, 2 * inter)
        self.down = w(num_local, inter, hidden)

    def forward(self, recv_x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if recv_x.is_cuda:
            offs = tokens_per_expert.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(recv_x, self.gate_up, offs=offs)
            g, u = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g) * u, self.down, offs=offs)
        outs = []  # CPU: a loop over the experts
        for e, rows in enumerate(recv_x.split(tokens_per_expert.tolist())):
            g, u = (rows @ self.gate_up[e]).chunk(2, dim=-1)
            outs.append((F.silu(g) * u) @ self.down[e])
        return torch.cat(outs) if outs else recv_x.new_empty((0, self.down.shape[-1]))


def _count(meter: _Meter, fn) -> tuple[int | None, int]:
    """(host syncs, all_to_all_single calls) of one ``fn()``; syncs None on the CPU."""
    with mock.patch.object(dist, "all_to_all_single", wraps=dist.all_to_all_single) as a2a:
        syncs = meter.syncs(fn)  # calls fn on CUDA only
        if syncs is None:
            fn()
    return syncs, a2a.call_count


def bench_shape(args, meter: _Meter, group, T, H, inter, K, E) -> list[dict]:
    W, dev = dist.get_world_size(group), meter.device
    dtype = torch.bfloat16 if meter.cuda else torch.float32
    gen = torch.Generator(device=dev).manual_seed(1234 + dist.get_rank(group))
    experts = StackedSwiGLU(E // W, H, inter, dev, dtype, gen)
    sets = []
    for _ in range(args.sets):
        x = torch.randn(T, H, device=dev, generator=gen).to(dtype).requires_grad_(True)
        idx = _routing(T, E, K, "uniform", dev, gen)
        w = torch.rand(T, K, device=dev, generator=gen).to(dtype).requires_grad_(True)
        sets.append((x, idx, w))
    recvs = [moe_ops.dispatch(x.detach(), idx, E, group) for x, idx, _ in sets]

    def layer(i, chunks):
        x, idx, w = sets[i]
        return chunked_moe(x, idx, w, E, experts, group, chunks=chunks)

    def train(i, chunks):  # a training step from fresh gradients
        experts.zero_grad(set_to_none=True)
        sets[i][0].grad = sets[i][2].grad = None
        layer(i, chunks).sum().backward()

    base = {"shape": f"T={T} H={H} I={inter} top-{K}/{E} W={W}"}
    with torch.no_grad():
        experts_ms = meter.time_ms(
            lambda i: experts(recvs[i][0], recvs[i][1].tokens_per_expert), args.sets
        )
        dc_ms = meter.time_ms(
            lambda i: moe_ops.combine(
                *moe_ops.dispatch(sets[i][0], sets[i][1], E, group), sets[i][2]
            ),
            args.sets,
        )
        ref = layer(0, 1)
    rows = []
    for chunks in args.chunks:
        row = dict(base, chunks=chunks, experts_ms=experts_ms, dc_ms=dc_ms)
        with torch.no_grad():
            row["fwd_ms"] = meter.time_ms(lambda i, c=chunks: layer(i, c), args.sets)
            row["syncs"], row["a2a"] = _count(meter, lambda c=chunks: layer(0, c))
            row["max_diff"] = (layer(0, chunks) - ref).abs().max().item()
        if args.backward:
            row["fwd_bwd_ms"] = meter.time_ms(lambda i, c=chunks: train(i, c), args.sets)
        rows.append(row)
    for row in rows:
        row["vs1_fwd"] = rows[0]["fwd_ms"] / row["fwd_ms"]
        if args.backward:
            row["vs1_fwd_bwd"] = rows[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def _table(rows, backward: bool) -> str:
    head = ["shape", "experts ms", "d+c ms", "chunks", "fwd ms", "vs 1"]
    if backward:
        head += ["fwd+bwd ms", "vs 1 (fwd+bwd)"]
    head += ["syncs / fwd", "a2a / fwd", "max |diff|"]
    body = []
    for r in rows:
        line = [
            r["shape"],
            f"{r['experts_ms']:.3f}",
            f"{r['dc_ms']:.3f}",
            r["chunks"],
            f"{r['fwd_ms']:.3f}",
            f"{r['vs1_fwd']:.2f}",
        ]
        if backward:
            line += [f"{r['fwd_bwd_ms']:.3f}", f"{r['vs1_fwd_bwd']:.2f}"]
        line += ["n/a" if r["syncs"] is None else r["syncs"], r["a2a"], f"{r['max_diff']:.3g}"]
        body.append(line)
    return tabulate(body, head, tablefmt="github")


def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None):
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    kw = dict(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    if init_method:
        kw["init_method"] = init_method
    if use_cuda:
        kw["device_id"] = device
    dist.init_process_group(**kw)
    meter = _Meter(device, dist.group.WORLD, args.iters, args.warmup)
    rows = []
    for spec in (args.shapes or (_GPU_SHAPES if use_cuda else _CPU_SHAPES)).split(";"):
        T, H, inter, K, E = (int(v) for v in spec.split(","))
        shape_rows = bench_shape(args, meter, dist.group.WORLD, T, H, inter, K, E)
        if rank == 0:  # as it goes, in case a later shape does not fit
            print(_table(shape_rows, args.backward), flush=True)
        rows += shape_rows
        if use_cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if use_cuda else "CPU"
        print(
            f"\n# chunked_moe overlap on {name}, W={world_size} ({kw['backend']}), "
            f"torch {torch.__version__}, median of {args.iters}\n"
        )
        print(_table(rows, args.backward), flush=True)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes", help="'T,H,I,K,E;...' (tokens per rank, hidden, expert width, top-k, experts)"
    )
    p.add_argument("--chunks", default="1,2,4", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn without torchrun")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 iterations")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    args.chunks = [1] + [c for c in args.chunks if c != 1]
    if args.quick:
        args.iters, args.warmup = 2, 1
    launch(run, args)


if __name__ == "__main__":
    main()
