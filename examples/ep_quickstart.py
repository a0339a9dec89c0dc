"""A MoE model written for one device runs expert-parallel on 2 ranks, with the same results.

    python examples/ep_quickstart.py [--world-size 2] [--inner inductor|aot_eager]

Each rank builds the same model (the usual single-device code: a top-2 router and a per-expert
loop over an ``nn.ModuleList``), keeps only its own experts' weights (``fx_passes.shard_experts``),
and compiles it with the ``"moe"`` backend. The pass rewrites the expert loop into
``moe_ops.dispatch`` -> this rank's experts -> ``moe_ops.combine``. Every rank then checks its
output and gradients against the unsharded model run eagerly in one process on all ranks' tokens.
Runs on local gloo ranks on CPUs (NCCL, one GPU per rank, when there are enough GPUs). Exits
non-zero if any rank's results differ.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fx_passes


# ----------------------------------------------------------------------------- the model
class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoEBlock(nn.Module):
    """Top-k routing over a ModuleList of experts, written for one device."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):  # x: [T, H]
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.num_experts).permute(2, 1, 0)  # [E, K, T]
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out


class TinyMoE(nn.Module):
    def __init__(self, hidden=32, inter=64, num_experts=4, top_k=2, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(
            MoEBlock(hidden, inter, num_experts, top_k) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(self.norm(x))
        return x


# ----------------------------------------------------------------------------- one rank
def _expert_param(name: str) -> bool:
    return ".experts." in name


def _check(rank: int, world_size: int, init_file: str, inner: str, tokens: int) -> None:
    use_nccl = torch.cuda.device_count() >= world_size
    backend = "nccl" if use_nccl else "gloo"
    device = torch.device("cuda", rank) if use_nccl else torch.device("cpu")
    if use_nccl:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = TinyMoE().to(device)
    reference = copy.deepcopy(model)
    x_all = torch.randn(world_size * tokens, 32, device=device)
    grad_all = torch.randn_like(x_all)
    x = x_all[rank * tokens : (rank + 1) * tokens]

    # The single-device model, eager, on every rank's tokens at once.
    ref_out = reference(x_all)
    (ref_out * grad_all).sum().backward()

    before = sum(p.numel() for n, p in model.named_parameters() if _expert_param(n))
    sharded = fx_passes.shard_experts(model)
    kept = sum(
        p.numel() for n, p in model.named_parameters() if _expert_param(n) and p.requires_grad
    )
    backend_fn = fx_passes.moe_backend(inner=inner)
    compiled = torch.compile(model, backend=backend_fn, fullgraph=True)
    out = compiled(x)
    (out * grad_all[rank * tokens : (rank + 1) * tokens]).sum().backward()
    for name, p in model.named_parameters():  # what data parallelism does for shared weights
        if p.requires_grad and not _expert_param(name):
            dist.all_reduce(p.grad)

    ref_params = dict(reference.named_parameters())
    tol = dict(rtol=1e-4, atol=1e-5)
    errors = []
    if not torch.allclose(out, ref_out[rank * tokens : (rank + 1) * tokens], **tol):
        errors.append("output")
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.allclose(p.grad, ref_params[name].grad, **tol):
            errors.append(f"grad of {name}")
    if rank == 0:
        print(f"{world_size} {backend} ranks, {tokens} tokens each, inner compiler {inner}")
        for m in backend_fn.matches:
            s = m.summary()
            print(
                f"  rewrote {s['module']}: family {s['family']}, {s['num_experts']} experts, "
                f"expert compute: {s['experts']}"
            )
        for s in sharded:
            print(f"  {s.path}: rank 0 keeps experts {list(s.local_experts)} of {s.num_experts}")
        print(f"  expert parameters per rank: {kept} of {before}")
    dist.barrier()
    print(
        f"rank {rank}: output and gradients "
        + ("match the single-device model" if not errors else f"DIFFER: {errors}"),
        flush=True,
    )
    dist.destroy_process_group()
    if errors:
        sys.exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--inner", default="inductor", help="inductor or aot_eager")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per rank")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(
                _check,
                args=(args.world_size, os.path.join(tmp, "store"), args.inner, args.tokens),
                nprocs=args.world_size,
            )
        except mp.ProcessExitedException as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
    print("OK: expert-parallel results equal the single-device ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
