"""Decode-sized dispatch + combine captured in a CUDA graph: replay time and the kernels inside.

    torchrun --nproc-per-node 2 examples/profile_decode_graph.py
    torchrun --nproc-per-node 4 examples/profile_decode_graph.py --shape 128,7168,8,256
    torchrun --nproc-per-node 4 examples/profile_decode_graph.py --transports padded,p2p

Capacity mode (``capacity="worst-case"``, ``overflow="drop"``), per transport (``--transports``:
``padded``, NCCL's all_to_all_single; ``p2p``, reads from the peers' symmetric buffers) with and
without ``sum_per_rank=True``: ``dispatch`` + ``combine`` (with routing weights) captured once,
warmed up, then per mode: the median replay time over ``--iters`` replays (CUDA events, a barrier
before each, the slowest rank), the mean time of ``--iters`` replays issued back to back (no
host wait between them: what a decode loop sees), and rank 0's kernels over ``--profiled``
replays (torch.profiler, per replay: count and summed time of each kernel; "kernel time" is
their sum, so the rest of the replay is launch gaps and waits between ranks; ``--trace DIR``
writes the Chrome trace). Uniform top-K routing, bf16. Needs CUDA GPUs and NCCL.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

import moe_ops


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # Triton compiles, NCCL communicators
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replay_ms(graph, iters: int, device) -> float:
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def _back_to_back_ms(graph, iters: int, device) -> float:
    """Mean time of ``iters`` replays issued back to back after one barrier (the ranks stay in
    step through the exchanges inside the graph; no host wait between replays), slowest rank."""
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    slowest = torch.tensor([start.elapsed_time(end) / iters], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def _kernels(graph, replays: int, trace: str | None) -> list[tuple[str, float, float]]:
    """(kernel, launches per replay, us per replay), longest first; a Chrome trace of the
    replays in ``trace`` if given."""
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    rows = []
    for ev in prof.key_averages():
        us = ev.self_device_time_total
        if us > 0:
            rows.append((ev.key[:70], ev.count / replays, us / replays))
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="128,7168,8,256", help="T,H,K,E: tokens per rank, ...")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profiled", type=int, default=5, help="replays under the profiler")
    p.add_argument("--top", type=int, default=12, help="kernels listed per mode")
    p.add_argument("--transports", default="padded", help="comma-separated: padded, p2p")
    p.add_argument("--trace", default=None, help="directory for rank 0's Chrome traces")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_graph.py needs CUDA GPUs (CUDA graphs, NCCL)")
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    T, H, K, E = (int(v) for v in args.shape.split(","))
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)
    idx = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices
    w = torch.rand(T, K, device=device, generator=gen)
    summary, details = [], []
    modes = [(t, per_rank) for t in args.transports.split(",") for per_rank in (False, True)]
    for transport, per_rank in modes:

        def dc(per_rank=per_rank, transport=transport):
            recv_x, handle = moe_ops.dispatch(
                x,
                idx,
                E,
                capacity="worst-case",
                overflow="drop",
                transport=transport,
                sum_per_rank=per_rank,
            )
            return moe_ops.combine(recv_x, handle, w)

        graph, _ = _capture(dc)
        ms = _replay_ms(graph, args.iters, device)
        b2b = _back_to_back_ms(graph, args.iters, device)
        mode = f"{transport}, " + ("sum_per_rank" if per_rank else "slot order")
        trace = None
        if args.trace and rank == 0:
            os.makedirs(args.trace, exist_ok=True)
            trace = os.path.join(args.trace, mode.replace(", ", "-").replace(" ", "_") + ".json")
        kernels = _kernels(graph, args.profiled, trace)
        nccl = [k for k in kernels if "nccl" in k[0].lower()]
        summary.append(
            [
                mode,
                f"{ms * 1000:.1f}",
                f"{b2b * 1000:.1f}",
                f"{sum(k[2] for k in kernels):.1f}",
                f"{sum(k[1] for k in kernels):.0f}",
                f"{sum(k[1] for k in nccl):.0f}",
                f"{sum(k[2] for k in nccl):.1f}",
            ]
        )
        details += [[mode, name, f"{n:.0f}", f"{us:.1f}"] for name, n, us in kernels[: args.top]]
        del graph
    if rank == 0:
        print(f"\n# d+c in a CUDA graph, T={T} H={H} top-{K}/{E} per rank, W={W}, bf16, ", end="")
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        head = ["mode", "replay us", "back to back us", "kernel us", "kernels", "NCCL calls"]
        head.append("NCCL us")
        print(tabulate(summary, head, tablefmt="github"))
        print()
        print(tabulate(details, ["mode", "kernel", "per replay", "us"], tablefmt="github"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
