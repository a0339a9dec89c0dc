"""Benchmark moe_ops.dispatch + moe_ops.combine against the floors and a straightforward baseline.

Runs with NCCL under torchrun (one process per GPU) and with gloo on CPU, where it spawns its own
ranks when started without torchrun::

    torchrun --nproc-per-node 1 examples/bench_dispatch_combine.py                 # GPU, W = 1
    torchrun --nproc-per-node 2 examples/bench_dispatch_combine.py                 # GPU, W = 2
    python examples/bench_dispatch_combine.py --world-size 2 --quick               # CPU, gloo

What each column measures, per rank (T tokens per rank, top-K of E experts, hidden size H):

* payload: the dispatched rows, N * H elements of the dtype, N = (token, slot) pairs this rank
  sends (T * K here: the benchmark routes every slot). Dispatch writes it, combine reads it back.
* copy: ``dst.copy_(src)`` of one payload-sized ``[N, H]`` tensor on the device: the payload read
  once and written once ("a device copy of the same bytes"). The byte floor of dispatch + combine
  at W = 1 is (1 + 1/K) such copies: the payload written once and read once, plus x read and out
  written.
* a2a: one bare ``all_to_all_single`` of the payload with the same split sizes, same process group.
  When K > W, moe_ops' dispatch sends fewer rows than the payload (each token once per rank that
  holds one of its experts, expanded to one row per slot on arrival); combine sends the payload.
* dispatch, combine: ``moe_ops.dispatch`` alone; ``moe_ops.combine`` alone (with routing weights,
  on precomputed expert outputs); d+c: both back to back, combine on ``recv_x``. With
  ``--sum-per-rank`` dispatch gets ``sum_per_rank=True`` (K > W: combine sends one row per
  (token, rank) back, summed on the experts' ranks; "sum_per_rank" in the case name); with
  ``--low-memory`` ``low_memory=True`` (default mode: large payloads back in rounds; "low_memory"
  in the case name).
  fwd+bwd: d+c and its backward (grads of x and of the routing weights).
* seed PR: the original PR's algorithm written the straightforward way for top-k (every
  (token, slot) pair is a row): argsort by destination rank, counts all-to-all, counts to the host,
  four all-to-alls (rows, expert ids, source indices, source ranks), argsort by local expert;
  combine: argsort by source rank, split sizes to the host, two all-to-alls (rows, source
  indices), ``index_copy_`` into ``[T * K, H]``, weighted sum over K.
* torch path (GPU only): moe_ops with its Triton kernels switched off (plain torch ops: sort,
  index, per-slot gathers).
* algbw: payload bytes / time (dispatch, combine); for d+c, twice the payload / time.
* peak extra: ``torch.cuda.max_memory_allocated()`` during the call minus the memory allocated
  before it (outputs included), in MiB; n/a on CPU (the allocator there keeps no such count).
* syncs: device -> host synchronizations counted with ``torch.cuda.set_sync_debug_mode("warn")``
  over one call (n/a on CPU).
* sync-free rows (third table): ``moe_ops.dispatch(..., capacity=--capacity, overflow="drop",
  transport=--transport)`` (fixed-size buffers, no host sync; the transport in parentheses;
  with ``--sum-per-rank`` too, where the padded transport then moves token rows, K > 1)
  beside the default mode; "CUDA graph": dispatch + combine
  captured once per input set and the graph replays timed (no host work at all); syncs counted
  over dispatch + combine.

Timing: warm-up first, then the median of ``--iters`` runs cycling over ``--sets`` input sets
(random data, never zeros). On GPUs each run is timed with CUDA events after a device sync and a
barrier; on CPU with ``time.perf_counter``. At W > 1 each run's time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate

import moe_ops

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_GPU_SHAPES = "16384,7168,8,256;4096,7168,8,256;4096,4096,2,8;16384,4096,2,8"
_CPU_SHAPES = "512,1024,2,8;512,1024,8,64"
_QUICK_CPU_SHAPES = "128,256,2,8;128,256,8,64"


# ----------------------------------------------------------------------------- inputs
def _routing(T: int, E: int, K: int, kind: str, device, gen) -> torch.Tensor:
    """``[T, K]`` distinct experts per token: uniform, or skewed (Zipf, p_e ~ 1/(e+1))."""
    if kind == "uniform":
        return torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices
    p = 1.0 / torch.arange(1, E + 1, device=device, dtype=torch.float32)
    return torch.multinomial(p.expand(T, E), K, replacement=False, generator=gen)


def _a2a(out, inp, out_splits, in_splits, group):
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


# ----------------------------------------------------------------------------- seed PR baseline
def seed_dispatch(x_TH, topk_idx_TK, num_experts, group):
    """The original PR's dispatch, extended to top-k by treating every (token, slot) as a row."""
    W, rank = group.size(), group.rank()
    T, K = topk_idx_TK.shape
    E_l = num_experts // W
    ids_P = topk_idx_TK.reshape(-1)
    dest_P = ids_P // E_l
    order_P = torch.argsort(dest_P, stable=True)
    send_x = x_TH[order_P // K]
    send_ids = ids_P[order_P]
    send_src_idx = order_P
    send_src_rank = torch.full_like(order_P, rank)
    n_to = torch.bincount(dest_P, minlength=W)
    n_from = torch.empty_like(n_to)
    dist.all_to_all_single(n_from, n_to, group=group)
    to_l, from_l = n_to.tolist(), n_from.tolist()  # counts to the host
    R = sum(from_l)
    recv_x = _a2a(x_TH.new_empty((R, x_TH.shape[1])), send_x, from_l, to_l, group)
    recv_ids = _a2a(send_ids.new_empty(R), send_ids, from_l, to_l, group)
    recv_src_idx = _a2a(send_src_idx.new_empty(R), send_src_idx, from_l, to_l, group)
    recv_src_rank = _a2a(send_src_rank.new_empty(R), send_src_rank, from_l, to_l, group)
    perm = torch.argsort(recv_ids - rank * E_l, stable=True)
    return recv_x[perm], (recv_src_idx[perm], recv_src_rank[perm], n_to, n_from, T, K)


def seed_combine(y_RH, state, topk_weights_TK, group):
    """The original PR's combine (rows back by source rank, ``index_copy_``), then the weights."""
    src_idx, src_rank, n_to, n_from, T, K = state
    order = torch.argsort(src_rank, stable=True)
    send_y, send_idx = y_RH[order], src_idx[order]
    to_l, from_l = n_from.tolist(), n_to.tolist()  # split counts to the host again
    back = _a2a(y_RH.new_empty((sum(from_l), y_RH.shape[1])), send_y, from_l, to_l, group)
    back_idx = _a2a(send_idx.new_empty(sum(from_l)), send_idx, from_l, to_l, group)
    out_PH = y_RH.new_zeros((T * K, y_RH.shape[1])).index_copy_(0, back_idx, back)
    return (out_PH.view(T, K, -1) * topk_weights_TK[..., None]).sum(1)


# ----------------------------------------------------------------------------- measuring
class _Meter:
    def __init__(self, device: torch.device, group, iters: int, warmup: int):
        self.device, self.group, self.iters, self.warmup = device, group, iters, warmup
        self.cuda = device.type == "cuda"

    def _barrier(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)

    def time_ms(self, fn, nsets: int) -> float:
        """Median over iterations (slowest rank at W > 1) of ``fn(i % nsets)``, in ms."""
        for i in range(self.warmup):
            fn(i % nsets)
        times = []
        for i in range(self.iters):
            self._barrier()
            if self.cuda:
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                fn(i % nsets)
                t1.record()
                times.append((t0, t1))
            else:
                s = time.perf_counter()
                fn(i % nsets)
                times.append(time.perf_counter() - s)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            ms = [a.elapsed_time(b) for a, b in times]
        else:
            ms = [t * 1e3 for t in times]
        ms_t = torch.tensor(ms, dtype=torch.float64, device=self.device)
        dist.all_reduce(ms_t, op=dist.ReduceOp.MAX, group=self.group)
        return statistics.median(ms_t.tolist())

    def peak_extra_mib(self, fn):
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return peak / 2**20

    def syncs(self, fn):
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        del out
        return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def _floors(meter: _Meter, group, send_splits, recv_splits, like, gen) -> tuple[float, float]:
    """Times of a device copy of the payload and of a bare all-to-all of it (same splits)."""
    H, S = like.shape[1], len(send_splits)
    send = [
        torch.randn(sum(sp), H, device=like.device, generator=gen).to(like.dtype)
        for sp in send_splits
    ]
    dst = like.new_empty((max(sum(sp) for sp in send_splits), H))
    copy_ms = meter.time_ms(lambda i: dst[: send[i].shape[0]].copy_(send[i]), S)
    recv = like.new_empty((max(sum(rp) for rp in recv_splits), H))
    a2a_ms = meter.time_ms(
        lambda i: _a2a(recv[: sum(recv_splits[i])], send[i], recv_splits[i], send_splits[i], group),
        S,
    )
    return copy_ms, a2a_ms


def bench_case(args, meter: _Meter, group, T, H, K, E, routing, dtype):
    device = meter.device
    rank = group.rank()
    per_rank, low = args.sum_per_rank, args.low_memory

    def ours_dispatch(x, idx):
        return moe_ops.dispatch(x, idx, E, group=group, sum_per_rank=per_rank, low_memory=low)

    gen = torch.Generator(device=device).manual_seed(1234 + 17 * rank)
    S = args.sets
    xs = [torch.randn(T, H, device=device, generator=gen).to(dtype) for _ in range(S)]
    idxs = [_routing(T, E, K, routing, device, gen) for _ in range(S)]
    ws = [torch.rand(T, K, device=device, generator=gen).softmax(-1).to(dtype) for _ in range(S)]
    handles, eos = [], []
    for s in range(S):
        recv, h = ours_dispatch(xs[s], idxs[s])
        handles.append(h)
        eos.append(torch.randn(recv.shape, device=device, generator=gen).to(dtype))
        del recv
    send_splits = [h.layout.send_splits.tolist() for h in handles]
    recv_splits = [h.layout.recv_splits.tolist() for h in handles]
    N = sum(send_splits[0])
    payload = N * H * xs[0].element_size()

    # sanity: ours equals the seed PR's round trip (and the Triton path the torch path)
    recv, h = ours_dispatch(xs[0], idxs[0])
    ours = moe_ops.combine(recv, h, ws[0])
    r2, st = seed_dispatch(xs[0], idxs[0], E, group)
    seed = seed_combine(r2, st, ws[0], group)
    check = (ours.float() - seed.float()).abs().max().item()
    del recv, h, ours, r2, st, seed

    row = dict(T=T, H=H, K=K, E=E, routing=routing, dtype=str(dtype).split(".")[-1], W=group.size())
    row["sum_per_rank"] = per_rank
    row["low_memory"] = low
    row["payload_MiB"] = payload / 2**20
    row["max|ours-seed|"] = check

    row["copy_ms"], row["a2a_ms"] = _floors(meter, group, send_splits, recv_splits, xs[0], gen)

    def ours_d(i):
        return ours_dispatch(xs[i], idxs[i])

    def ours_c(i):
        return moe_ops.combine(eos[i], handles[i], ws[i])

    def ours_dc(i):
        recv, h = ours_dispatch(xs[i], idxs[i])
        return moe_ops.combine(recv, h, ws[i])

    def seed_dc(i):
        r, st = seed_dispatch(xs[i], idxs[i], E, group)
        return seed_combine(r, st, ws[i], group)

    row["dispatch_ms"] = meter.time_ms(ours_d, S)
    row["combine_ms"] = meter.time_ms(ours_c, S)
    row["d+c_ms"] = meter.time_ms(ours_dc, S)
    if args.backward:
        xg = [x.clone().requires_grad_() for x in xs]
        wg = [w.clone().requires_grad_() for w in ws]
        go = [torch.randn(T, H, device=device, generator=gen).to(dtype) for _ in range(S)]

        def ours_fb(i):
            recv, h = ours_dispatch(xg[i], idxs[i])
            out = moe_ops.combine(recv, h, wg[i])
            out.backward(go[i])
            xg[i].grad = wg[i].grad = None

        row["fwd+bwd_ms"] = meter.time_ms(ours_fb, S)
        del xg, wg, go
    if not args.no_seed:
        row["seed_d+c_ms"] = meter.time_ms(seed_dc, S)
    if meter.cuda and not args.no_torch_path:
        with moe_ops.use_kernels("torch"):
            row["torch_path_d+c_ms"] = meter.time_ms(ours_dc, S)

    row["peak_d+c_MiB"] = meter.peak_extra_mib(lambda: ours_dc(0))
    row["peak_seed_MiB"] = None if args.no_seed else meter.peak_extra_mib(lambda: seed_dc(0))
    row["syncs_dispatch"] = meter.syncs(lambda: ours_d(0))
    row["syncs_combine"] = meter.syncs(lambda: ours_c(0))
    row["syncs_seed_d+c"] = None if args.no_seed else meter.syncs(lambda: seed_dc(0))
    row["syncs_d+c"] = meter.syncs(lambda: ours_dc(0))
    if not args.no_sync_free:
        row.update(_bench_sync_free(args, meter, group, xs, idxs, ws, E, gen))
    return row


def _capture(fn, device):
    """A CUDA graph of ``fn()`` (warmed up on a side stream first), and its outputs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _bench_sync_free(args, meter: _Meter, group, xs, idxs, ws, E, gen) -> dict:
    """The capacity mode (``capacity=args.capacity``): times, peak memory, syncs, and on GPUs
    d+c captured in a CUDA graph (one graph per input set, replays timed)."""
    device, S = meter.device, len(xs)
    cap = args.capacity if args.capacity == "worst-case" else int(args.capacity)

    opts = dict(
        capacity=cap, overflow="drop", transport=args.transport, sum_per_rank=args.sum_per_rank
    )

    def disp(i):
        return moe_ops.dispatch(xs[i], idxs[i], E, group=group, **opts)

    handles = [disp(i)[1] for i in range(S)]
    C = handles[0].capacity
    eos = [
        torch.randn(C, xs[0].shape[1], device=device, generator=gen).to(xs[0].dtype)
        for _ in range(S)
    ]

    def comb(i):
        return moe_ops.combine(eos[i], handles[i], ws[i])

    def dc(i):
        recv, h = disp(i)
        return moe_ops.combine(recv, h, ws[i])

    recv_d, h_d = moe_ops.dispatch(xs[0], idxs[0], E, group=group)
    diff = (dc(0).float() - moe_ops.combine(recv_d, h_d, ws[0]).float()).abs().max().item()
    del recv_d, h_d
    row = {
        "sf_transport": handles[0].transport,
        "sf_capacity": C,
        "sf_dropped": int(handles[0].num_dropped),
        "sf_max|diff|": diff,
    }
    row["sf_dispatch_ms"] = meter.time_ms(disp, S)
    row["sf_combine_ms"] = meter.time_ms(comb, S)
    row["sf_d+c_ms"] = meter.time_ms(dc, S)
    if args.backward:
        xg = [x.clone().requires_grad_() for x in xs]
        wg = [w.clone().requires_grad_() for w in ws]
        go = [torch.randn(x.shape, device=device, generator=gen).to(x.dtype) for x in xs]

        def fb(i):
            recv, h = moe_ops.dispatch(xg[i], idxs[i], E, group=group, **opts)
            moe_ops.combine(recv, h, wg[i]).backward(go[i])
            xg[i].grad = wg[i].grad = None

        row["sf_fwd+bwd_ms"] = meter.time_ms(fb, S)
        del xg, wg, go
    row["sf_peak_d+c_MiB"] = meter.peak_extra_mib(lambda: dc(0))
    row["sf_syncs_d+c"] = meter.syncs(lambda: dc(0))
    if meter.cuda:
        graphs = [_capture(lambda i=i: dc(i), device) for i in range(S)]
        for i, (graph, out) in enumerate(graphs):
            graph.replay()
            assert torch.equal(out, dc(i)), "graph replay differs from eager"
        row["sf_graph_d+c_ms"] = meter.time_ms(lambda i: graphs[i][0].replay(), S)
        del graphs
    return row


# ----------------------------------------------------------------------------- report
def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _tables(rows):
    t1, t2 = [], []
    for r in rows:
        case = f"T={r['T']} H={r['H']} top-{r['K']}/{r['E']} {r['routing']} {r['dtype']} W={r['W']}"
        if r.get("sum_per_rank"):
            case += " sum_per_rank"
        if r.get("low_memory"):
            case += " low_memory"
        dc, cp, a2a = r["d+c_ms"], r["copy_ms"], r["a2a_ms"]
        seed = r.get("seed_d+c_ms")
        tp = r.get("torch_path_d+c_ms")
        t1.append(
            [
                case,
                f"{r['payload_MiB']:.4g}",
                _f(cp),
                _f(a2a),
                _f(r["dispatch_ms"]),
                _f(r["combine_ms"]),
                _f(dc),
                f"{dc / cp:.2f}",
                f"{dc / (2 * a2a):.2f}",
                _f(r.get("fwd+bwd_ms")),
                _f(seed),
                _f(seed and seed / dc, "{:.1f}"),
                _f(seed and seed / cp, "{:.1f}"),
                _f(tp),
                _f(tp and tp / cp, "{:.1f}"),
            ]
        )
        gbs = r["payload_MiB"] * 2**20 / 1e6  # payload bytes / 1e9 * 1e3 (ms)
        t2.append(
            [
                case,
                f"{gbs / r['dispatch_ms']:.3g}",
                f"{gbs / r['combine_ms']:.3g}",
                f"{2 * gbs / dc:.3g}",
                f"{gbs / a2a:.3g}",
                _f(r["peak_d+c_MiB"], "{:.0f}"),
                _f(r["peak_d+c_MiB"] and r["peak_d+c_MiB"] / r["payload_MiB"], "{:.2f}"),
                _f(r["peak_seed_MiB"], "{:.0f}"),
                _f(r["syncs_dispatch"], "{}"),
                _f(r["syncs_combine"], "{}"),
                _f(r["syncs_seed_d+c"], "{}"),
                f"{r['max|ours-seed|']:.2g}",
            ]
        )
    h1 = [
        "case",
        "payload MiB",
        "copy ms",
        "a2a ms",
        "dispatch ms",
        "combine ms",
        "d+c ms",
        "d+c / copy",
        "d+c / (2 a2a)",
        "fwd+bwd ms",
        "seed PR d+c ms",
        "seed / ours",
        "seed / copy",
        "torch path d+c ms",
        "torch path / copy",
    ]
    h2 = [
        "case",
        "dispatch GB/s",
        "combine GB/s",
        "d+c GB/s",
        "a2a GB/s",
        "peak extra MiB (d+c)",
        "peak / payload",
        "seed PR peak MiB",
        "syncs dispatch",
        "syncs combine",
        "syncs seed PR d+c",
        "max |ours - seed|",
    ]
    t3 = []
    for r in rows:
        if "sf_d+c_ms" not in r:
            continue
        case = f"T={r['T']} H={r['H']} top-{r['K']}/{r['E']} {r['routing']} {r['dtype']} W={r['W']}"
        if r.get("sum_per_rank"):
            case += " sum_per_rank"
        if r.get("low_memory"):
            case += " low_memory"
        cp, a2a, seed = r["copy_ms"], r["a2a_ms"], r.get("seed_d+c_ms")
        modes = [
            (
                "default",
                "",
                r["dispatch_ms"],
                r["combine_ms"],
                r["d+c_ms"],
                r.get("fwd+bwd_ms"),
                r["peak_d+c_MiB"],
                r["syncs_d+c"],
            ),
            (
                f"sync-free ({r['sf_transport']})",
                r["sf_capacity"],
                r["sf_dispatch_ms"],
                r["sf_combine_ms"],
                r["sf_d+c_ms"],
                r.get("sf_fwd+bwd_ms"),
                r["sf_peak_d+c_MiB"],
                r["sf_syncs_d+c"],
            ),
        ]
        if r.get("sf_graph_d+c_ms") is not None:
            modes.append(
                (
                    f"sync-free ({r['sf_transport']}), CUDA graph",
                    r["sf_capacity"],
                    None,
                    None,
                    r["sf_graph_d+c_ms"],
                    None,
                    None,
                    0,
                )
            )
        for mode, cap, d, c, dc, fb, peak, syncs in modes:
            t3.append(
                [
                    case,
                    mode,
                    cap,
                    _f(d),
                    _f(c),
                    _f(dc),
                    f"{dc / cp:.2f}",
                    f"{dc / (2 * a2a):.2f}",
                    _f(seed and seed / dc, "{:.1f}"),
                    _f(fb),
                    _f(peak, "{:.0f}"),
                    _f(syncs, "{}"),
                    f"{r['sf_max|diff|']:.2g}" if mode != "default" else "",
                ]
            )
    h3 = [
        "case",
        "mode",
        "capacity",
        "dispatch ms",
        "combine ms",
        "d+c ms",
        "d+c / copy",
        "d+c / (2 a2a)",
        "seed / ours",
        "fwd+bwd ms",
        "peak extra MiB (d+c)",
        "syncs (d+c fwd)",
        "max |sync-free - default|",
    ]
    tables = [tabulate(t1, h1, tablefmt="github"), tabulate(t2, h2, tablefmt="github")]
    if t3:
        tables.append(tabulate(t3, h3, tablefmt="github"))
    return tables


# ----------------------------------------------------------------------------- driver
def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None):
    device = init_rank(args, rank, world_size, local_rank, init_method)
    use_cuda = device.type == "cuda"
    group = dist.group.WORLD
    meter = _Meter(device, group, args.iters, args.warmup)
    shapes = args.shapes or (
        _GPU_SHAPES if use_cuda else _QUICK_CPU_SHAPES if args.quick else _CPU_SHAPES
    )
    rows = []
    for spec in shapes.split(";"):
        T, H, K, E = (int(v) for v in spec.split(","))
        for routing in args.routing.split(","):
            row = bench_case(args, meter, group, T, H, K, E, routing, _DTYPES[args.dtype])
            if rank == 0:
                print(json.dumps(row), flush=True)
            rows.append(row)
            if use_cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if use_cuda else "CPU"
        head = (
            f"# moe_ops dispatch/combine on {dev}, W={world_size} ({dist.get_backend()}), "
            f"torch {torch.__version__}, median of {args.iters}"
        )
        text = "\n\n".join([head, *_tables(rows)]) + "\n"
        print("\n" + text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            with open(args.out + ".json", "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


def _spawned(local_rank, run_fn, args, world_size, init_file):
    run_fn(args, local_rank, world_size, local_rank, f"file://{init_file}")


def init_rank(args, rank: int, world_size: int, local_rank: int, init_method: str | None):
    """Join the default process group (NCCL on this rank's GPU, else gloo with ``args.threads``
    CPU threads; ``args.cpu`` forces gloo) and return this rank's device."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    kw = dict(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    if init_method:
        kw["init_method"] = init_method
    if use_cuda:
        kw["device_id"] = device
    dist.init_process_group(**kw)
    return device


def launch(run_fn, args) -> None:
    """``run_fn(args, rank, world_size, local_rank, init_method)`` on every rank: in this process
    under torchrun, else on ``args.world_size`` spawned gloo ranks (CPU only)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        run_fn(args, rank, world_size, int(os.environ.get("LOCAL_RANK", 0)), None)
        return
    if torch.cuda.is_available() and not args.cpu:
        sys.exit("on GPUs run under torchrun: torchrun --nproc-per-node N " + sys.argv[0])
    with tempfile.TemporaryDirectory() as d:
        init = os.path.join(d, "init")
        mp.spawn(_spawned, args=(run_fn, args, args.world_size, init), nprocs=args.world_size)


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`launch` and :func:`init_rank` read."""
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn without torchrun")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even if GPUs are present")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_args(p)
    p.add_argument(
        "--shapes", help="'T,H,K,E;T,H,K,E...' (tokens per rank, hidden, top-k, experts)"
    )
    p.add_argument("--routing", default="uniform,skewed", help="uniform,skewed")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sets", type=int, default=3, help="input sets to cycle through")
    p.add_argument("--quick", action="store_true", help="small CPU shapes")
    p.add_argument("--backward", action="store_true", help="also time d+c forward + backward")
    p.add_argument("--no-seed", action="store_true", help="skip the seed PR baseline")
    p.add_argument("--no-torch-path", action="store_true", help="skip moe_ops without Triton")
    p.add_argument(
        "--capacity", default="worst-case", help="sync-free mode's capacity: an int or worst-case"
    )
    p.add_argument(
        "--transport",
        help="sync-free mode's transport (moe_ops.dispatch's; default: the library's choice)",
    )
    p.add_argument("--no-sync-free", action="store_true", help="skip the sync-free mode")
    p.add_argument(
        "--sum-per-rank",
        action="store_true",
        help="moe_ops.dispatch(..., sum_per_rank=True), both modes: combine sums per rank "
        "(default mode: K > W; capacity mode: K > 1)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="moe_ops.dispatch(..., low_memory=True), default mode: combine's rows back in rounds",
    )
    p.add_argument("--out", help="also write the tables (markdown) and rows (.json) here")
    args = p.parse_args(argv)
    launch(run, args)


if __name__ == "__main__":
    main()
