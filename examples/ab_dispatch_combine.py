"""A/B of ``moe_ops.dispatch`` + ``moe_ops.combine`` against other versions of moe_ops, in one
process: calls of the versions alternate, so that host noise (which moves host-bound timings by
tens of percent from one process or machine to the next) hits them alike.

    git worktree add /tmp/before <commit>          # any tree with a moe_ops/ package
    torchrun --nproc-per-node 2 examples/ab_dispatch_combine.py --tree before=/tmp/before
    python examples/ab_dispatch_combine.py --tree before=/tmp/before --world-size 2   # CPU, gloo

Each ``--tree NAME=DIR`` is copied to a temporary directory as a package ``moe_ops_ab_NAME``
(every ``moe_ops`` in its sources renamed, the custom-op namespace included, so that both
register side by side) and imported next to the installed moe_ops ("this"). Per shape and pass
(forward: dispatch, ``y * 2``, combine with routing weights; forward + backward: and the
gradients of x and of the weights), after a warm-up of each version: ``--iters`` rounds, each
timing every version once in a rotated order (after a device sync and a barrier; CUDA events on
GPUs, ``time.perf_counter`` on CPU; the slowest rank's time). Prints the median (p25 / min) per
version and each version's median over this tree's. The versions' outputs must agree bit for bit.
``--seed`` adds the seed PR's algorithm as ``bench_dispatch_combine.py`` writes it (forward only;
equal up to rounding: it sums the slots in another order); ``--sum-per-rank`` adds every tree with
``moe_ops.dispatch(..., sum_per_rank=True)`` as "per_rank" (this tree) and "NAME_per_rank"
(equal up to rounding).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

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
    seed_combine,
    seed_dispatch,
)

_GPU_SHAPES = "4096,4096,2,8;16384,7168,8,256"
_CPU_SHAPES = "256,256,2,8;256,256,8,64"


def _import_tree(name: str, tree: str, into: str):
    """``tree``'s moe_ops as the package ``moe_ops_ab_<name>`` (a renamed copy under ``into``)."""
    pkg = f"moe_ops_ab_{name}"
    src = os.path.join(tree, "moe_ops")
    if not os.path.isdir(src):
        raise SystemExit(f"--tree {name}={tree}: no moe_ops/ package there")
    dst = os.path.join(into, pkg)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for root, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(re.sub(r"\bmoe_ops\b", pkg, text))
    if into not in sys.path:
        sys.path.insert(0, into)
    return importlib.import_module(pkg)


class _SeedPR:
    """The seed PR's algorithm as ``bench_dispatch_combine.py`` writes it, behind the moe_ops API
    (forward only: its all-to-alls have no autograd)."""

    def dispatch(self, x, idx, E):
        return seed_dispatch(x, idx, E, dist.group.WORLD)

    def combine(self, y, state, w):
        return seed_combine(y, state, w, dist.group.WORLD)


class _PerRank:
    """A tree's moe_ops with ``dispatch(..., sum_per_rank=True)``."""

    def __init__(self, ops):
        self.ops = ops

    def dispatch(self, x, idx, E):
        return self.ops.dispatch(x, idx, E, sum_per_rank=True)

    def combine(self, y, handle, w):
        return self.ops.combine(y, handle, w)


def _rounded(version: str) -> bool:
    """Versions whose sums run in another order than this tree's default: equal up to
    rounding."""
    return version == "seed" or version.endswith("per_rank")


def _time(device, group, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize(device)
        return e0.elapsed_time(e1)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None):
    device = init_rank(args, rank, world_size, local_rank, init_method)
    group = dist.group.WORLD
    versions = {"this": moe_ops}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.tree:
            name, _, tree = spec.partition("=")
            if not name.isidentifier() or not tree:
                raise SystemExit(f"--tree takes NAME=DIR, got {spec!r}")
            versions[name] = _import_tree(name, tree, tmp)
        if args.sum_per_rank:  # every tree's, this one's first
            trees = list(versions.items())
            versions["per_rank"] = _PerRank(moe_ops)
            for name, ops in trees[1:]:
                versions[f"{name}_per_rank"] = _PerRank(ops)
        if args.seed:
            versions["seed"] = _SeedPR()
        rows = _compare(args, device, group, versions)
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"\nd+c ms, median (p25 / min) of {args.iters} rounds, slowest rank, W={world_size} "
            f"({dist.get_backend()}), {dev}, torch {torch.__version__}"
        )
        others = [v for v in versions if v != "this"]
        headers = ["shape", "pass", *versions, *(f"{v} / this" for v in others)]
        print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    dist.destroy_process_group()


def _step(m, backward: bool, *, x, idx, w, E):
    xx, ww = x.detach().requires_grad_(backward), w.detach().requires_grad_(backward)
    y, handle = m.dispatch(xx, idx, E)
    out = m.combine(y * 2, handle, ww)
    if backward:
        out.backward(torch.ones_like(out))
    return out.detach()


def _close(a, b) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _compare(args, device, group, versions) -> list[list]:
    rank = dist.get_rank()
    shapes = args.shapes or (_GPU_SHAPES if device.type == "cuda" else _CPU_SHAPES)
    rows = []
    for spec in shapes.split(";"):
        T, H, K, E = (int(v) for v in spec.split(","))
        gen = torch.Generator(device=device).manual_seed(1000 + rank)
        x = torch.randn(T, H, device=device, generator=gen).to(_DTYPES[args.dtype])
        idx = _routing(T, E, K, "uniform", device, gen)
        w = torch.rand(T, K, device=device, generator=gen)

        step = functools.partial(_step, x=x, idx=idx, w=w, E=E)
        outs = {name: step(m, False) for name, m in versions.items()}
        for name, out in outs.items():
            same = _close if _rounded(name) else torch.equal
            if not same(out, outs["this"]):
                raise SystemExit(f"{name} and this tree differ at T={T} H={H} top-{K}/{E}")
        for backward in (False, True):
            names = [n for n in versions if not (backward and n == "seed")]
            ms = {name: [] for name in names}
            for name in names:
                for _ in range(args.warmup):
                    step(versions[name], backward)
            for i in range(args.iters):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    call = functools.partial(step, versions[name], backward)
                    ms[name].append(_time(device, group, call))
            stats = {}
            for name, v in ms.items():
                t = torch.tensor(v, dtype=torch.float64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
                v = sorted(t.tolist())
                stats[name] = (statistics.median(v), v[len(v) // 4], v[0])
            cell = {n: f"{m:.3f} ({q:.3f} / {lo:.3f})" for n, (m, q, lo) in stats.items()}
            ratio = {n: f"{stats[n][0] / stats['this'][0]:.2f}" for n in stats}
            rows.append(
                [
                    f"T={T} H={H} top-{K}/{E}",
                    "fwd+bwd" if backward else "fwd",
                    *(cell.get(n, "n/a") for n in versions),
                    *(ratio.get(n, "n/a") for n in versions if n != "this"),
                ]
            )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_args(p)
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR of another moe_ops tree")
    p.add_argument(
        "--seed", action="store_true", help="also the seed PR's algorithm (forward only)"
    )
    p.add_argument(
        "--sum-per-rank",
        action="store_true",
        help="also every tree with dispatch(..., sum_per_rank=True) (this one as per_rank)",
    )
    p.add_argument("--shapes", help="'T,H,K,E;...' (tokens per rank, hidden, top-k, experts)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    launch(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
