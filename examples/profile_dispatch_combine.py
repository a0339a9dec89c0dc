"""Where the time of ``moe_ops.dispatch`` + ``moe_ops.combine`` goes: a torch.profiler breakdown.

    torchrun --nproc-per-node 2 examples/profile_dispatch_combine.py            # GPUs, NCCL
    python examples/profile_dispatch_combine.py --world-size 2 --quick          # CPU, gloo

For each shape (T tokens per rank, hidden H, top-K of E experts; uniform routing, bf16 on GPUs)
rank 0 prints, for dispatch + combine forward (and forward + backward with ``--backward``):

* wall: the median time of one call measured around the profiled steps (CUDA events on GPUs);
* one row per kind of device kernel: the NCCL kernels (the all-to-alls), copies to and from the
  host, the sorts (``sort``, cub radix passes), the row moves (gather / scatter / index / copy /
  cat kernels and the Triton row kernels of moe_ops), the elementwise and reduction kernels, and
  the rest, each as milliseconds per call (summed kernel time, so overlapping kernels count
  twice) and its share of wall. The barrier between calls and the profiler's annotations are left
  out;
* "device busy": the union of all kernel intervals per call; wall minus busy is time the device
  waited on the host (launch latency, the host read of the counts, Python);
* "host, dispatch + combine calls": the CPU time inside the Python calls;
* the ten longest kernels by total time.

``--trace DIR`` also writes each rank's Chrome trace (``chrome://tracing``, Perfetto).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile, record_function

import moe_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch_combine import _routing, add_launch_args, init_rank, launch  # noqa: E402

_GPU_SHAPES = "4096,4096,2,8;16384,7168,8,256"
_CPU_SHAPES = "256,256,2,8;256,256,8,64"
# kernel-name fragments (lower case) -> kind; the first match wins
_KINDS = (
    ("nccl", ("nccl",)),
    ("memcpy / memset", ("memcpy", "memset")),
    ("sort", ("sort", "radix", "cub::")),
    ("row moves", ("gather", "scatter", "index", "copy", "cat", "_rows", "_combine", "_place")),
    ("elementwise / reduce", ("elementwise", "reduce", "vectorized", "unrolled")),
)


def _kind(name: str) -> str:
    low = name.lower()
    for kind, parts in _KINDS:
        if any(p in low for p in parts):
            return kind
    return "other"


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _step(x, idx, w, E, group, backward: bool):
    with record_function("dispatch + combine"):
        recv, h = moe_ops.dispatch(x, idx, E, group=group)
        out = moe_ops.combine(recv, h, w)
    if backward:
        out.float().sum().backward()
    return out


def profile_case(args, device, group, T, H, K, E, backward: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    idx = _routing(T, E, K, "uniform", device, gen)
    w = torch.rand(T, K, device=device, dtype=dtype, generator=gen)
    if backward:
        x.requires_grad_(True)
        w.requires_grad_(True)

    def step():
        x.grad = w.grad = None
        return _step(x, idx, w, E, group, backward)

    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    times = []
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.iters):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
            step()
            if cuda:
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                times.append((time.perf_counter() - t0) * 1e3)
    n = args.iters
    kernels = [  # empty on CPU
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith("nccl:")  # NCCL's own annotations
        and "AllReduce" not in e.name  # the barrier between calls
    ]
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for k in kernels:
        us = k.time_range.end - k.time_range.start
        by_kind[_kind(k.name)] = by_kind.get(_kind(k.name), 0.0) + us
        by_name[k.name] = by_name.get(k.name, 0.0) + us
    busy = _union([(k.time_range.start, k.time_range.end) for k in kernels])
    host = sum(
        e.cpu_time_total for e in prof.events() if e.name == "dispatch + combine"
    )  # microseconds, all steps
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        tag = f"T{T}_H{H}_K{K}_E{E}{'_bwd' if backward else ''}_rank{dist.get_rank()}"
        prof.export_chrome_trace(os.path.join(args.trace, tag + ".json"))
    return dict(
        wall=statistics.median(times),
        by_kind={k: v / 1e3 / n for k, v in by_kind.items()},
        busy=busy / 1e3 / n,
        host=host / 1e3 / n,
        top=sorted(by_name.items(), key=lambda kv: -kv[1])[:10],
        n=n,
        launches=len(kernels) / n,
    )


def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None):
    device = init_rank(args, rank, world_size, local_rank, init_method)
    group = dist.group.WORLD
    shapes = args.shapes or (_GPU_SHAPES if device.type == "cuda" else _CPU_SHAPES)
    for spec in shapes.split(";"):
        T, H, K, E = (int(v) for v in spec.split(","))
        for backward in (False, True) if args.backward else (False,):
            r = profile_case(args, device, group, T, H, K, E, backward)
            # the slowest rank's wall time; the breakdown is rank 0's
            t = torch.tensor([r["wall"]], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rank:
                continue
            wall = t.item()
            rows = [["wall (slowest rank, median)", wall, 100.0]]
            for kind in [k for k, _ in _KINDS] + ["other"]:
                if kind in r["by_kind"]:
                    ms = r["by_kind"][kind]
                    rows.append([f"kernels: {kind}", ms, 100 * ms / wall])
            rows.append(["device busy (union of kernels)", r["busy"], 100 * r["busy"] / wall])
            rows.append(["host, dispatch + combine calls", r["host"], 100 * r["host"] / wall])
            what = "dispatch + combine" + (" + backward" if backward else "")
            print(
                f"\n{what}: T={T} per rank, H={H}, top-{K} of {E}, W={world_size}, "
                f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
                f"torch {torch.__version__}; per call, mean of {r['n']} profiled calls "
                f"({r['launches']:.0f} kernels per call)"
            )
            print(tabulate(rows, ["", "ms", "% of wall"], floatfmt=".3f", tablefmt="github"))
            if r["top"]:
                top = [[name[:90], us / 1e3 / r["n"]] for name, us in r["top"]]
                print(tabulate(top, ["longest kernels", "ms per call"], floatfmt=".3f"))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_args(p)
    p.add_argument("--shapes", help="'T,H,K,E;...' (tokens per rank, hidden, top-k, experts)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backward", action="store_true", help="also profile forward + backward")
    p.add_argument("--trace", metavar="DIR", help="write each rank's Chrome trace here")
    p.add_argument("--quick", action="store_true", help="(CPU shapes are always small)")
    args = p.parse_args(argv)
    launch(run, args)


if __name__ == "__main__":
    main()
