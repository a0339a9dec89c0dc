"""How long the MoE pass takes on a deep model, against the whole compile.

    python3 examples/pass_timing.py [--layers 48] [--inner aot_eager] [--tokens 16]

Builds a stack of ``--layers`` MoE layers (a router, 8 experts of a SwiGLU MLP each, top-2) in
two spellings: a per-expert ``torch.where`` + ``index_add_`` loop (found by the loop family's
syntactic walk) and a ``nonzero`` + ``index_put_`` loop (found only by the semantic family, by
what it computes), compiles each with ``fx_passes.moe_backend(inner=...)`` (``fullgraph=True``)
and prints, per spelling: the nodes of the Dynamo graph, the blocks rewritten, the time spent in
``fuse_moe_routing`` (of which in the numerical checks), and the time of the first call (Dynamo
capture + pass + inner compiler + one run).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fx_passes
from fx_passes import fuse
from fx_passes.families import semantic

H, I, E, K = 64, 128, 8, 2  # noqa: E741


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(H, I, bias=False)
        self.up = nn.Linear(H, I, bias=False)
        self.down = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.norm = nn.LayerNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(E))

    def forward(self, x):
        h = self.norm(x)
        w, ids = torch.topk(F.softmax(self.router(h), dim=-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            if self.spelling == "where":
                tok, slot = torch.where(ids == e)
                out.index_add_(0, tok, expert(h[tok]) * w[tok, slot, None])
            else:
                tok, slot = torch.nonzero(ids == e, as_tuple=True)
                out.index_put_((tok,), expert(h[tok]) * w[tok, slot, None], accumulate=True)
        return x + out


def measure(spelling: str, layers: int, inner: str, tokens: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*(MoE(spelling) for _ in range(layers)))
    x = torch.randn(tokens, H)
    spent = {"pass": 0.0, "checks": 0.0, "nodes": 0}
    real_fuse, real_verify = fx_passes.backend.fuse_moe_routing, fuse.verify_match

    def timed_fuse(gm, **kwargs):
        spent["nodes"] += len(gm.graph.nodes)
        start = time.perf_counter()
        try:
            return real_fuse(gm, **kwargs)
        finally:
            spent["pass"] += time.perf_counter() - start

    def timed_verify(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_verify(*args, **kwargs)
        finally:
            spent["checks"] += time.perf_counter() - start

    fx_passes.backend.fuse_moe_routing = timed_fuse
    fuse.verify_match = semantic.verify_match = timed_verify
    try:
        backend = fx_passes.moe_backend(inner=inner)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        start = time.perf_counter()
        out = compiled(x)
        first_call = time.perf_counter() - start
    finally:
        fx_passes.backend.fuse_moe_routing = real_fuse
        fuse.verify_match = semantic.verify_match = real_verify
    torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    families = sorted({m.family for m in backend.matches})
    return {
        "spelling": spelling,
        "layers": layers,
        "graph nodes": spent["nodes"],
        "rewritten": f"{len(backend.matches)} ({', '.join(families)})",
        "pass s": round(spent["pass"], 2),
        "of which checks s": round(spent["checks"], 2),
        "first call s": round(first_call, 2),
        "pass share": f"{spent['pass'] / first_call:.0%}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--inner", default="aot_eager", help="inner compiler (aot_eager, inductor)")
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    rows = [measure(s, args.layers, args.inner, args.tokens) for s in ("where", "nonzero")]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, inner={args.inner}")
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
