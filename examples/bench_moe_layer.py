"""Time one MoE block eager, with the default torch.compile, and with the "moe" backend.

Blocks (bf16): a family-A block (per-expert loop over an ``nn.ModuleList`` of SwiGLU experts,
``torch.where`` + ``index_add_``), the same block after ``fx_passes.shard_experts(block,
stack=True)`` (each rank keeps its experts' weights as one ``[E_l, ...]`` parameter per name, so
the rewrite's grouped GEMMs read them without a per-forward ``torch.stack``) and, when
transformers is installed, transformers 5's Mixtral block with
``experts_implementation="grouped_mm"``. Forward and forward + backward; a table. Modes: eager,
``torch.compile``, the "moe" backend, and the "moe" backend with ``capacity="worst-case"`` (the
sync-free capacity-mode ops: the host is not held back by a read of the row counts).

    python examples/bench_moe_layer.py                 # E=8, top-2, H=2048, I=5632, 4096 tokens
    python examples/bench_moe_layer.py --quick         # a small shape for a CPU smoke run
    torchrun --nproc-per-node 2 examples/bench_moe_layer.py   # W ranks, each with its tokens

On CUDA: CUDA events, warm-up, median of ``--iters`` (>= 10). Under torchrun every rank holds
the whole block and the "moe" backend runs it expert-parallel over the default group; the table
(rank 0) shows the slowest rank's median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import tabulate
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def _modes(group):
    def moe(m, capacity=None):
        backend = fx_passes.moe_backend(group=group, capacity=capacity)
        return torch.compile(m, backend=backend, fullgraph=True)

    return {
        "eager": lambda m: m,
        "torch.compile": lambda m: torch.compile(m),
        "moe backend": moe,
        # sync-free dispatch_fixed/combine_fixed on W * T * K padded rows (no host read)
        "moe backend, capacity=worst-case": lambda m: moe(m, "worst-case"),
    }


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

    rows = []
    for bname, make in blocks.items():
        torch.manual_seed(0)
        base = make().to(device=device, dtype=torch.bfloat16)
        if bname.endswith("stack=True"):  # the experts read slices of one [E_l, ...] parameter
            fx_passes.shard_experts(base, group, stack=True)
        x = torch.randn(T, Hd, device=device, dtype=torch.bfloat16, generator=None) * 0.5
        if bname.startswith("transformers"):
            x = x.view(1, T, Hd)
        for mname, wrap in _modes(group).items():
            torch._dynamo.reset()
            model = wrap(base)
            xg = x.clone().requires_grad_(True)

            def fwd(model=model, x=x):
                with torch.no_grad():
                    model(x)

            def fwd_bwd(model=model, xg=xg):
                out = model(xg)
                out = out[0] if isinstance(out, tuple) else out
                out.float().sum().backward()

            try:
                f = _time(fwd, args.iters, args.warmup, device)
                fb = _time(fwd_bwd, args.iters, args.warmup, device)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
                f = fb = float("nan")
                print(f"[{bname} / {mname}] failed: {type(e).__name__}: {str(e)[:200]}")
            if group is not None:
                t = torch.tensor([f, fb], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                f, fb = t.tolist()
            rows.append([bname, mname, f"{f:.3f}", f"{fb:.3f}"])
    if rank == 0:
        print(
            f"E={E} top-{K} H={Hd} I={In} T={T} per rank, W={world}, bf16, {device.type}, "
            f"median of {args.iters} (ms)"
        )
        print(tabulate.tabulate(rows, headers=["block", "mode", "fwd ms", "fwd+bwd ms"]))
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
