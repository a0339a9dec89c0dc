"""Host time of one dispatch + combine, per function of moe_ops: where a host-bound call waits.

Every function defined in moe_ops' modules (the Triton kernel module too, when Triton is
installed) and ``torch.distributed.all_to_all_single`` is wrapped with ``time.perf_counter``
marks; each function's self time (its own Python and the unwrapped torch calls it makes, less
the wrapped functions it calls) is summed over one call of ``dispatch``, ``recv_x * 2`` and
``combine`` with weights (and the backward with ``--backward``), run cold as in the
benchmarks: a barrier and a device sync before each. The table lists the median over
``--iters`` calls, rank 0, largest first. The wrappers add about a microsecond per wrapped call
(the table's header says how many), so compare functions within a table, and tables of one
machine start::

    torchrun --nproc-per-node 2 examples/host_time_per_function.py --shapes "4096,4096,2,8"
    python examples/host_time_per_function.py --world-size 2 --backward     # CPU, gloo
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import types

import torch
import torch.distributed as dist
from tabulate import tabulate

import moe_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch_combine import (  # noqa: E402
    _DTYPES,
    _routing,
    add_launch_args,
    init_rank,
    launch,
)

_GPU_SHAPES = "4096,4096,2,8;4096,2048,8,128"
_CPU_SHAPES = "256,256,2,8;256,256,8,64"


class _SelfTimes:
    """Self time and calls per wrapped function, while ``on``."""

    def __init__(self):
        self.on = False
        self.stack: list[list] = []  # [name, start, time in wrapped callees]
        self.self_time: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def clear(self) -> None:
        self.self_time.clear()
        self.calls.clear()

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, inner = self.stack.pop()
                spent = time.perf_counter() - start
                self.self_time[name] += spent - inner
                self.calls[name] += 1
                if self.stack:
                    self.stack[-1][2] += spent

        timed.__wrapped__ = fn
        return timed


def _wrap_package(times: _SelfTimes) -> None:
    """Replace every moe_ops function, wherever a moe_ops module refers to it, by a timed one."""
    mods = [m for name, m in sys.modules.items() if name.split(".")[0] == "moe_ops"]
    timed = {}
    for m in mods:
        for value in vars(m).values():
            ours = (getattr(value, "__module__", None) or "").split(".")[0] == "moe_ops"
            if ours and isinstance(value, types.FunctionType) and id(value) not in timed:
                name = f"{value.__module__.split('.')[-1]}.{value.__name__}"
                timed[id(value)] = times.wrap(value, name)
    for m in mods:
        for key, value in list(vars(m).items()):
            if isinstance(value, types.FunctionType) and id(value) in timed:
                setattr(m, key, timed[id(value)])
    dist.all_to_all_single = times.wrap(dist.all_to_all_single, "dist.all_to_all_single")


def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None) -> None:
    device = init_rank(args, rank, world_size, local_rank, init_method)
    if device.type == "cuda":
        moe_ops._kernels.for_device(device)  # imports the Triton kernels, so they get wrapped
    times = _SelfTimes()
    _wrap_package(times)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = _DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    shapes = args.shapes or (_GPU_SHAPES if device.type == "cuda" else _CPU_SHAPES)
    tables = []
    for spec in shapes.split(";"):
        T, H, K, E = map(int, spec.split(","))
        x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=args.backward)
        totals, per_fn, calls = [], collections.defaultdict(list), {}
        gen = torch.Generator(device=device).manual_seed(rank)
        for i in range(args.warmup + args.iters):
            idx = _routing(T, E, K, "uniform", device, gen)
            w = torch.rand(T, K, device=device, requires_grad=args.backward)
            grad = torch.randn(T, H, device=device, dtype=dtype)
            dist.barrier()
            sync()
            times.clear()
            times.on = True
            start = time.perf_counter()
            recv_x, handle = moe_ops.dispatch(x, idx, E)
            out = moe_ops.combine(recv_x * 2, handle, w)
            if args.backward:
                out.backward(grad)
            total = time.perf_counter() - start
            times.on = False
            if i < args.warmup:
                continue
            totals.append(total * 1e6)
            for name, spent in times.self_time.items():
                per_fn[name].append(spent * 1e6)
            calls = dict(times.calls)
        # a function some calls skip counts 0 in those
        median = {
            n: statistics.median(v + [0.0] * (args.iters - len(v))) for n, v in per_fn.items()
        }
        top = sorted(median.items(), key=lambda kv: -kv[1])[: args.top]
        head = (
            f"T={T} H={H} top-{K}/{E}, {'fwd+bwd' if args.backward else 'fwd'}: "
            f"{statistics.median(totals):.0f} us per call, {sum(median.values()):.0f} us in the "
            f"wrapped functions ({sum(calls.values())} calls per d+c)"
        )
        rows = [[n, f"{t:.1f}", calls.get(n, 0)] for n, t in top]
        tables.append((head, rows))
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"# host self time per function, median of {args.iters} cold calls, rank 0, "
            f"W={world_size} ({dist.get_backend()}), {dev}, torch {torch.__version__}"
        )
        for head, rows in tables:
            print(f"\n{head}\n")
            print(tabulate(rows, headers=["function", "self us", "calls"], tablefmt="github"))
        sys.stdout.flush()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_args(p)
    p.add_argument("--shapes", help="'T,H,K,E;...' (tokens per rank, hidden, top-k, experts)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--backward", action="store_true", help="also run the backward")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=30, help="functions listed per table")
    launch(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
