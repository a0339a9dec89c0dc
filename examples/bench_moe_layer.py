"""Time one MoE block eager, with the default torch.compile, and with the "moe" backend.

Blocks (bf16): a family-A block (per-expert loop over an ``nn.ModuleList`` of SwiGLU experts,
``torch.where`` + ``index_add_``), the same block after ``fx_passes.shard_experts(block,
stack=True)`` (each rank keeps its experts' weights as one ``[E_l, ...]`` parameter per name, so
the rewrite's grouped GEMMs read them without a per-forward ``torch.stack``) and, when
transformers is installed, transformers 5's Mixtral block with
``experts_implementation="grouped_mm"``. Under torchrun (W > 1) also a "torchtitan-style EP"
baseline: expert parallelism written by hand without this package (:class:`TorchtitanEPBlock`,
eager and ``torch.compile`` only), checked against one process running the whole block (the
footnote), and transformers' own expert parallelism (5.21 or later: its Mixtral block's
``base_model_ep_plan`` applied with ``apply_expert_parallelism``, ``AllToAllEP``). Forward and
forward + backward, expert memory per GPU; a table. Modes: eager, ``torch.compile``, the "moe"
backend (also with ``sum_per_rank=True``: with K > W combine sums each token's slots on the rank
of their experts), and the "moe" backend with ``capacity="worst-case"`` (the sync-free
capacity-mode ops: the host is not held back by a read of the row counts); on GPUs also
the last with inductor's CUDA graphs (``moe_backend(capacity="worst-case",
mode="reduce-overhead")``; both also with ``sum_per_rank=True``: token rows and sums per rank,
K > 1; with and without CUDA graphs also with ``transport="p2p"`` at W > 1, the rows read
from the peers' symmetric memory) and, for the transformers block, ``torch.compile(mode=
"reduce-overhead")``. Each timed call is one step (``torch.compiler.cudagraph_mark_step_begin``);
forward + backward starts from no gradients, as a training step after ``zero_grad`` would. A
footnote says when inductor skipped CUDA graphs for a mode (then that row ran without them).

    python examples/bench_moe_layer.py                 # E=8, top-2, H=2048, I=5632, 4096 tokens
    python examples/bench_moe_layer.py --quick         # a small shape for a CPU smoke run
    torchrun --nproc-per-node 2 examples/bench_moe_layer.py   # W ranks, each with its tokens
    torchrun --nproc-per-node 2 examples/bench_moe_layer.py --experts 128 --top-k 8 --inter 768
    ... --blocks "transformers,torchtitan" --modes "torch.compile,moe backend"   # a subset
    ... --profile 5    # also: where each row's forward and forward + backward spend their time

On CUDA: CUDA events, warm-up, median of ``--iters`` (>= 10). Under torchrun every rank holds
the whole block and the "moe" backend runs it expert-parallel over the default group; the table
(rank 0) shows the slowest rank's median.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import tabulate
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor

import fx_passes


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LoopBlock(nn.Module):
    """Family A: static loop over experts, ``torch.where`` on a one-hot mask, ``index_add_``."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x[tok]) * w[tok, slot, None]
            out.index_add_(0, tok, y)
        return out


class _StackedExperts(nn.Module):
    """This rank's ``E_l`` SwiGLU experts as ``[E_l, I, H]`` / ``[E_l, H, I]`` parameters."""

    def __init__(self, experts: list[_Expert]):
        super().__init__()
        for name in ("gate", "up", "down"):
            w = torch.stack([getattr(e, name).weight.detach() for e in experts])
            setattr(self, name, nn.Parameter(w.clone()))

    def forward(self, x_MH: torch.Tensor, counts_El: torch.Tensor, sizes: list[int]):
        """``x_MH``: rows grouped by local expert, ``counts_El`` / ``sizes`` each; -> ``[M, H]``.

        bf16: one ``torch._grouped_mm`` per linear layer; otherwise a loop over ``split`` segments.
        """
        if x_MH.dtype == torch.bfloat16:
            offs_El = torch.cumsum(counts_El, 0, dtype=torch.int32)

            def mm(a, w):
                return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs_El)

            return mm(F.silu(mm(x_MH, self.gate)) * mm(x_MH, self.up), self.down)
        outs = []
        for j, x_jH in enumerate(torch.split(x_MH, sizes)):
            h_jI = F.silu(x_jH @ self.gate[j].T) * (x_jH @ self.up[j].T)
            outs.append(h_jI @ self.down[j].T)
        return torch.cat(outs)


class TorchtitanEPBlock(nn.Module):
    """Baseline: expert parallelism written by hand, as a user would without moe_ops.

    Rank ``r`` of ``W`` holds experts ``[r * E_l, (r + 1) * E_l)`` (``E_l = E / W``) of ``full``
    (a :class:`LoopBlock`, same router and weights), stacked as ``[E_l, ...]``. Forward on
    ``x_TH``: router + top-k, argsort by expert, bincount, count all_to_all, ``.tolist()`` split
    sizes (the host sync), payload all_to_all (autograd), regroup the received rows by local
    expert, grouped experts, reverse regroup, reverse all_to_all, unpermute, weighted sum over k.
    """

    def __init__(self, full: LoopBlock, group: dist.ProcessGroup):
        super().__init__()
        self.group, self.top_k, self.num_experts = group, full.top_k, full.num_experts
        self.world = dist.get_world_size(group)
        if self.num_experts % self.world:
            raise ValueError(f"experts: E={self.num_experts} not a multiple of W={self.world}")
        self.e_l = self.num_experts // self.world
        r = dist.get_rank(group)
        self.router = full.router
        self.experts = _StackedExperts(list(full.experts)[r * self.e_l : (r + 1) * self.e_l])

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        T, H = x_TH.shape
        K, W, E_l = self.top_k, self.world, self.e_l
        probs_TE = F.softmax(self.router(x_TH), dim=-1, dtype=torch.float32)
        w_TK, idx_TK = torch.topk(probs_TE, K, dim=-1)
        w_TK = (w_TK / w_TK.sum(-1, keepdim=True)).to(x_TH.dtype)
        order_S = torch.argsort(idx_TK.reshape(-1), stable=True)  # S = T * K slots
        send_SH = x_TH[order_S // K]
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts)
        recv_counts_E = torch.empty_like(counts_E)  # [src, local expert]
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.group)
        sizes = torch.cat([counts_E.view(W, E_l).sum(1), recv_counts_E]).tolist()
        send_W, recv_WEl = sizes[:W], sizes[W:]
        recv_W = [sum(recv_WEl[s * E_l : (s + 1) * E_l]) for s in range(W)]
        recv_MH = funcol.all_to_all_single_autograd(send_SH, recv_W, send_W, self.group)
        ids_M = torch.repeat_interleave(
            torch.arange(E_l, device=x_TH.device).repeat(W), recv_counts_E
        )
        perm_M = torch.argsort(ids_M, stable=True)
        counts_El = recv_counts_E.view(W, E_l).sum(0)
        sizes_El = [sum(recv_WEl[j::E_l]) for j in range(E_l)]
        y_MH = self.experts(recv_MH[perm_M], counts_El, sizes_El)[torch.argsort(perm_M)]
        back_SH = funcol.all_to_all_single_autograd(y_MH, send_W, recv_W, self.group)
        y_TKH = back_SH[torch.argsort(order_S)].view(T, K, H)
        return (y_TKH * w_TK[..., None]).sum(1)


def _expert_mib(block: nn.Module) -> float:
    """MiB of expert weights this rank holds: storages of every ``*experts`` submodule's params.

    Counts storage, so a stacked ``[E_l, ...]`` parameter counts once and a DTensor parameter
    of :func:`fx_passes.shard_experts` counts its local rows.
    """
    storages = {}
    for name, mod in block.named_modules():
        if name.rsplit(".", 1)[-1].endswith("experts"):
            for p in mod.parameters():
                s = (p.to_local() if isinstance(p, DTensor) else p).untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values()) / 2**20


def _check_ep(group, device: torch.device, E: int, K: int) -> str:
    """Max abs diff of :class:`TorchtitanEPBlock` vs one process running the whole LoopBlock.

    Small shape (H=32, I=64, T=24 tokens per rank); every rank builds all ranks' tokens, runs the
    reference on their concatenation and compares its own rows: the output, the input gradient,
    its local experts' weight gradients and the router gradient (summed over ranks), and the
    output of the block under the default ``torch.compile`` (forward only), for float32
    (per-expert loop) and bf16 (``torch._grouped_mm``). The maximum over ranks.
    """
    H, In, T = 32, 64, 24
    W, r = dist.get_world_size(group), dist.get_rank(group)
    parts = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        full = LoopBlock(H, In, E, K).to(device=device, dtype=dtype)
        ep = TorchtitanEPBlock(copy.deepcopy(full), group)
        xs = [
            torch.randn(T, H, generator=torch.Generator().manual_seed(100 + s)).to(device, dtype)
            for s in range(W)
        ]
        x = xs[r].clone().requires_grad_(True)
        out = ep(x)
        out.float().square().sum().backward()
        x_ref = torch.cat(xs).requires_grad_(True)
        ref = full(x_ref)
        ref.float().square().sum().backward()
        mine = slice(r * T, (r + 1) * T)
        torch._dynamo.reset()
        with torch.no_grad():
            out_compiled = torch.compile(ep)(xs[r])
        local = list(full.experts)[r * ep.e_l : (r + 1) * ep.e_l]
        g_router = ep.router.weight.grad.clone()
        dist.all_reduce(g_router, group=group)
        g_exp = max(
            (getattr(ep.experts, n).grad - torch.stack([getattr(e, n).weight.grad for e in local]))
            .abs()
            .max()
            .item()
            for n in ("gate", "up", "down")
        )
        d = torch.tensor(
            [
                (out - ref[mine]).abs().max().item(),
                (out_compiled - ref[mine]).abs().max().item(),
                (x.grad - x_ref.grad[mine]).abs().max().item(),
                g_exp,
                (g_router - full.router.weight.grad).abs().max().item(),
                ref.abs().max().item(),
            ],
            device=device,
        )
        dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
        d_out, d_outc, d_gx, d_gw, d_gr, ref_max = d.tolist()
        parts.append(
            f"{str(dtype).removeprefix('torch.')}: out {d_out:.3g} (torch.compile {d_outc:.3g}; "
            f"max |ref| {ref_max:.3g}), "
            f"grad x {d_gx:.3g}, grad experts {d_gw:.3g}, grad router {d_gr:.3g}"
        )
    return (
        f"EP check vs one process running the whole block on all {W} ranks' tokens "
        f"(E={E} top-{K} H={H} I={In} T={T}/rank), max |diff|: " + "; ".join(parts)
    )


def _transformers_block(hidden, inter, num_experts, top_k):
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.MixtralConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, experts_implementation="grouped_mm", dtype=torch.bfloat16
    )
    return model.model.layers[0].mlp


def _transformers_ep_missing() -> str | None:
    """Why transformers' own all-to-all expert parallelism can't run here, or None."""
    import transformers

    try:
        from transformers.distributed.expert_parallel import AllToAllEP  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no all-to-all EP (5.21 or later)"
    return None


def _transformers_ep_block(hidden, inter, num_experts, top_k, device):
    """transformers' own expert parallelism on its grouped_mm Mixtral block, over the default group.

    The block's ``base_model_ep_plan`` entries, applied by ``transformers.distributed.
    expert_parallel.apply_expert_parallelism`` (what ``from_pretrained(distributed_config=
    DistributedConfig(ep_size=W, ...))`` calls for each layer): the stacked experts become
    ``Shard(0)`` DTensors over an EP mesh of the group, and the experts' forward goes through
    ``AllToAllEP`` (a count all-to-all, one ``.tolist()``, the rows' all-to-all, the results'
    all-to-all). A TP mesh of size 1: every rank holds its own tokens, as here.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    block = _transformers_block(hidden, inter, num_experts, top_k).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(), 1), mesh_dim_names=("ep", "tp"))
    plan = {
        "experts.gate_up_proj": "grouped_gemm",
        "experts.down_proj": "grouped_gemm",
        "experts": "ep_dispatch_experts",
    }
    apply_expert_parallelism(block, mesh["ep"], mesh["tp"], plan, ep_implementation="all_to_all")
    return block


def _time(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()``; CUDA events on a GPU, wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _kernel_breakdown(fn, steps: int, top: int = 10, trace: str | None = None) -> tuple:
    """Kernel time per step of ``fn()`` under torch.profiler: the total, the ``top`` kernels by
    time (name, calls per step, ms per step, share), the ``top`` host ops by their own host time
    followed by the ``top`` CUDA runtime calls by inclusive time (name, calls per step, ms per
    step; the profiler slows the host down), and :func:`_inside_our_ops`. With ``trace``, the
    profile is also written there as a Chrome trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (a first call may compile or capture)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_name.setdefault(e.name, []).append(e.device_time_total / 1e3)
    total = sum(sum(v) for v in by_name.values()) / steps
    if not total:
        return 0.0, [], [], []
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    rows = [
        [name[:70], len(v) / steps, f"{sum(v) / steps:.3f}", f"{sum(v) / steps / total:.0%}"]
        for name, v in ranked
    ]
    averages = prof.key_averages()
    host = sorted(averages, key=lambda a: -a.self_cpu_time_total)[:top]
    host_rows = [
        [a.key[:70], a.count / steps, f"{a.self_cpu_time_total / 1e3 / steps:.3f}"] for a in host
    ]
    runtime = sorted(
        (a for a in averages if a.key.startswith(("cuda", "cu", "nccl"))),
        key=lambda a: -a.cpu_time_total,
    )[:top]
    host_rows += [
        [
            f"{a.key[:60]} (runtime, inclusive)",
            a.count / steps,
            f"{a.cpu_time_total / 1e3 / steps:.3f}",
        ]
        for a in runtime
    ]
    return total, rows, host_rows, _inside_our_ops(prof.events(), steps)


_OUR_OPS = ("moe_ops::dispatch", "moe_ops::combine", "moe_ops::_combine_backward")


def _inside_our_ops(events, steps: int, top: int = 12) -> list[list]:
    """Host time per step inside each moe_ops op: the op's total, then what it calls (torch ops,
    CUDA runtime calls, Triton launches) by inclusive host time; "(own)" is the op's Python outside
    them. The autograd and custom-op wrappers around an op's body are looked through."""

    def body(e):
        for c in e.cpu_children:
            if c.name == e.name or c.name.startswith("GeneratedBackwardFor"):
                yield from body(c)
            else:
                yield c

    def outermost(e):
        p = e.cpu_parent
        while p is not None:
            if p.name == e.name:
                return False
            p = p.cpu_parent
        return True

    agg: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.name not in _OUR_OPS or not outermost(e):
            continue
        agg.setdefault((e.name, "(total)"), []).append(e.cpu_time_total)
        own = e.cpu_time_total
        for c in body(e):
            agg.setdefault((e.name, c.name), []).append(c.cpu_time_total)
            own -= c.cpu_time_total
        agg.setdefault((e.name, "(own)"), []).append(own)
    out = []
    for op in _OUR_OPS:
        items = sorted(
            ((k[1], v) for k, v in agg.items() if k[0] == op), key=lambda kv: -sum(kv[1])
        )
        for child, v in items[: top + 1]:
            name = op if child == "(total)" else ""
            out.append([name, child[:60], len(v) / steps, f"{sum(v) / 1e3 / steps:.3f}"])
    return out


def _modes(group, device: torch.device):
    def moe(m, capacity=None, mode=None, sum_per_rank=False, transport=None):
        backend = fx_passes.moe_backend(
            group=group,
            capacity=capacity,
            mode=mode,
            sum_per_rank=sum_per_rank,
            transport=transport,
        )
        return torch.compile(m, backend=backend, fullgraph=True)

    modes = {
        "eager": lambda m: m,
        "torch.compile": lambda m: torch.compile(m),
        "moe backend": moe,
        # K > W: combine sums each token's slots on the experts' rank, one row per (token, rank)
        "moe backend, sum_per_rank": lambda m: moe(m, sum_per_rank=True),
        # sync-free dispatch_fixed/combine_fixed on W * T * K padded rows (no host read)
        "moe backend, capacity=worst-case": lambda m: moe(m, "worst-case"),
        # the same with token rows (min(C, T) per peer) and sums per rank (K > 1)
        "moe backend, capacity=worst-case, sum_per_rank": lambda m: moe(
            m, "worst-case", sum_per_rank=True
        ),
    }
    p2p = device.type == "cuda" and group is not None and group.size() > 1
    if p2p:  # the same with the rows read from the peers' symmetric memory
        modes["moe backend, capacity=worst-case, sum_per_rank, p2p"] = lambda m: moe(
            m, "worst-case", sum_per_rank=True, transport="p2p"
        )
    if device.type == "cuda":  # inductor's CUDA graphs (what mode="reduce-overhead" turns on)
        modes[_CG_COMPILE] = lambda m: torch.compile(m, mode="reduce-overhead")
        modes[_CG_MOE] = lambda m: moe(m, "worst-case", mode="reduce-overhead")
        modes[_CG_MOE + ", sum_per_rank"] = lambda m: moe(
            m, "worst-case", mode="reduce-overhead", sum_per_rank=True
        )
    if p2p:  # rows from the peers' symmetric memory (no NCCL call)
        modes[_CG_MOE + ", sum_per_rank, p2p"] = lambda m: moe(
            m, "worst-case", mode="reduce-overhead", sum_per_rank=True, transport="p2p"
        )

    return modes


_CG_COMPILE = "torch.compile, CUDA graphs"
_CG_MOE = "moe backend, capacity=worst-case, CUDA graphs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shape (CPU smoke run)")
    p.add_argument("--world-size", type=int, default=None, help="expected W (checked)")
    p.add_argument(
        "--no-stacked", action="store_true", help="skip the shard_experts(stack=True) block"
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check of the torchtitan-style baseline against one process (slow at E=128)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="on GPUs, also profile STEPS forward and STEPS forward+backward steps of each row "
        "(kernel and host tables)",
    )
    p.add_argument(
        "--trace",
        metavar="DIR",
        help="with --profile: write each row's Chrome trace per rank into DIR",
    )
    p.add_argument(
        "--blocks",
        help="comma-separated (semicolon-separated when it holds a ';'): only the blocks whose"
        " names hold one (=NAME: exactly)",
    )
    p.add_argument(
        "--modes",
        help="comma-separated (semicolon-separated when it holds a ';': mode names hold commas):"
        " only the modes whose names hold one (=NAME: exactly)",
    )
    args = p.parse_args()
    if args.quick:
        args.experts, args.hidden, args.inter, args.tokens = 4, 64, 128, 256
        args.iters, args.warmup = max(args.iters, 10), 2

    group, rank, world = None, 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if args.world_size is not None and args.world_size != world:
        raise SystemExit(f"--world-size {args.world_size} but {world} rank(s) running")
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    E, K, Hd, In, T = args.experts, args.top_k, args.hidden, args.inter, args.tokens
    blocks = {"family A (ModuleList loop)": lambda: LoopBlock(Hd, In, E, K)}
    if not args.no_stacked:
        blocks["family A, stack=True"] = lambda: LoopBlock(Hd, In, E, K)
    if _transformers_block(8, 16, 2, 1) is not None:
        blocks["transformers grouped_mm"] = lambda: _transformers_block(Hd, In, E, K)
        if world > 1:  # the same block with its stacked experts sharded (DTensor Shard(0))
            blocks["transformers grouped_mm, sharded"] = lambda: _transformers_block(Hd, In, E, K)
    ep_name, notes = "torchtitan-style EP", []
    tf_ep_name = "transformers EP (all-to-all)"
    if world > 1 and _transformers_block(8, 16, 2, 1) is not None:
        missing = _transformers_ep_missing()
        if missing:
            notes.append(f"{tf_ep_name}: skipped, {missing}")
        else:
            blocks[tf_ep_name] = lambda: _transformers_ep_block(Hd, In, E, K, device)
    if world == 1:
        notes.append(f"{ep_name}: skipped, it needs W > 1 ranks (run under torchrun)")
    elif E % world:
        notes.append(f"{ep_name}: skipped, E={E} is not a multiple of W={world}")
    else:
        blocks[ep_name] = lambda: TorchtitanEPBlock(LoopBlock(Hd, In, E, K), group)
        if not args.no_check:
            notes.append(_check_ep(group, device, E, K))

    def wanted(name: str, spec: str | None) -> bool:
        """Does a comma-separated ``spec`` (semicolon-separated when it holds one) select
        ``name``: a part selects the names that hold it, or, written ``=part``, the one name
        equal to it."""
        if spec is None:
            return True
        parts = [part.strip() for part in spec.split(";" if ";" in spec else ",")]
        return any(name == p[1:] if p.startswith("=") else p in name for p in parts)

    blocks = {b: make for b, make in blocks.items() if wanted(b, args.blocks)}
    rows, profiles = [], []
    for bname, make in blocks.items():
        torch.manual_seed(0)
        base = make().to(device=device, dtype=torch.bfloat16)
        if bname.endswith("stack=True"):  # the experts read slices of one [E_l, ...] parameter
            fx_passes.shard_experts(base, group, stack=True)
        elif bname.endswith("sharded"):
            fx_passes.shard_experts(base, group)
        torch.manual_seed(1 + rank)  # every rank routes its own tokens
        x = torch.randn(T, Hd, device=device, dtype=torch.bfloat16) * 0.5
        if bname.startswith("transformers"):
            x = x.view(1, T, Hd)
        mib = _expert_mib(base)
        modes = _modes(group, device)
        if not bname.startswith("transformers"):
            # family A under plain torch.compile has data-dependent shapes: a CUDA graph per shape
            modes.pop(_CG_COMPILE, None)
        if bname in (ep_name, tf_ep_name):  # the baselines' own all_to_all; no moe backend
            modes = {m: modes[m] for m in ("eager", "torch.compile")}
        elif (bname.endswith("stack=True") or bname.endswith("sharded")) and world > 1:
            # without the moe backend a sharded block lacks the other ranks' experts
            modes = {m: w for m, w in modes.items() if m.startswith("moe backend")}
        modes = {m: w for m, w in modes.items() if wanted(m, args.modes)}
        for mname, wrap in modes.items():
            torch._dynamo.reset()
            t_row = time.perf_counter()
            model = wrap(base)
            xg = x.clone().requires_grad_(True)

            def fwd(model=model, x=x):
                torch.compiler.cudagraph_mark_step_begin()  # one step per call (CUDA graphs)
                with torch.no_grad():
                    model(x)

            def fwd_bwd(model=model, xg=xg):
                # As a training step would: fresh gradients (CUDA-graph outputs are reused by the
                # next replay, so they must not be accumulated into).
                torch.compiler.cudagraph_mark_step_begin()
                model.zero_grad(set_to_none=True)
                xg.grad = None
                out = model(xg)
                out = out[0] if isinstance(out, tuple) else out
                out.float().sum().backward()

            skips = counters["inductor"]["cudagraph_skips"]
            try:
                f = _time(fwd, args.iters, args.warmup, device)
                fb = _time(fwd_bwd, args.iters, args.warmup, device)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
                f = fb = float("nan")
                print(f"[{bname} / {mname}] failed: {type(e).__name__}: {str(e)[:200]}")
            if args.profile and device.type == "cuda" and f == f:
                trace = None
                if args.trace:
                    os.makedirs(args.trace, exist_ok=True)
                    slug = "".join(c if c.isalnum() else "_" for c in f"{bname}_{mname}")
                    trace = os.path.join(args.trace, f"{slug}.rank{rank}.json")
                for pname, step, wall in (("forward", fwd, f), ("forward + backward", fwd_bwd, fb)):
                    ptrace = trace and trace.replace(".rank", f".{pname[:3]}.rank")
                    breakdown = _kernel_breakdown(step, args.profile, trace=ptrace)
                    profiles.append((bname, mname, pname, wall, *breakdown))
            skipped = counters["inductor"]["cudagraph_skips"] - skips
            if "CUDA graphs" in mname and skipped:
                notes.append(f"{bname} / {mname}: inductor skipped CUDA graphs {skipped} time(s)")
            if rank == 0:  # progress: compiles can take a while at large E
                print(f"[{bname} / {mname}] {time.perf_counter() - t_row:.0f} s", flush=True)
            if group is not None:
                t = torch.tensor([f, fb], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                f, fb = t.tolist()
            rows.append([bname, mname, f"{f:.3f}", f"{fb:.3f}", f"{mib:.2f}"])
    if rank == 0:
        print(
            f"E={E} top-{K} H={Hd} I={In} T={T} per rank, W={world}, bf16, {device.type}, "
            f"median of {args.iters} (ms)"
        )
        headers = ["block", "mode", "fwd ms", "fwd+bwd ms", "expert memory per GPU (MiB)"]
        print(tabulate.tabulate(rows, headers=headers))
        for note in notes:
            print(note)
    for bname, mname, pname, wall, total, top, host, ours in profiles if rank == 0 else ():
        print(
            f"\n{bname} / {mname}: {pname}, rank 0, kernel time {total:.3f} ms per "
            f"step (median wall {wall:.3f} ms, rank 0)"
        )
        print(tabulate.tabulate(top, headers=["kernel", "calls", "ms", "share"]))
        print(tabulate.tabulate(host, headers=["host op (self time)", "calls", "ms"]))
        if ours:
            print(
                tabulate.tabulate(ours, headers=["op", "inside (host, inclusive)", "calls", "ms"])
            )
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
