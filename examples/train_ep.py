"""Train a transformers 5 MoE causal LM expert-parallel on W ranks; checkpoint; resume at another W.

    python3 examples/train_ep.py --tiny --world-size 2 --check        # CPU: 2 spawned gloo ranks
    torchrun --nproc-per-node 4 examples/train_ep.py --check          # GPUs: NCCL, one per rank
    torchrun --nproc-per-node 2 examples/train_ep.py --steps 20 --save /tmp/ck --save-step 10
    torchrun --nproc-per-node 4 examples/train_ep.py --steps 20 --resume /tmp/ck --check

The model is ``Qwen3MoeForCausalLM`` built from a small config with
``experts_implementation="grouped_mm"``: the code written for one device, built with the same seed
on every rank. ``fx_passes.shard_experts`` keeps this rank's rows of every stacked
``experts.gate_up_proj`` / ``experts.down_proj`` (DTensor ``Shard(0)`` parameters), and
``torch.compile(model, backend=fx_passes.moe_backend(...), fullgraph=True)`` rewrites each MoE
block into dispatch -> local experts -> combine.

Parallelism: data parallel over the non-expert weights, expert parallel over the experts. Each
step's global batch (``--batch`` sequences of ``--seq`` bytes of a fixed text corpus, the same for
every W) is split into W micro-batches, one per rank. Each rank back-propagates its mean loss / W;
the non-expert gradients are then summed over the ranks (one all-reduce of one flat buffer), and
the expert gradients already are (every rank's tokens reach the experts through dispatch). So
every update equals the single-device model's on the whole global batch (mean loss), gradient
clipping to ``--clip`` by the global norm included, and so do the losses.

``--check`` trains that single-device model too (rank 0, all experts, plain ``torch.compile`` with
``--ref-inner``, by default the inner compiler, ``eager``: no compile; same seed and data,
uninterrupted from step 1 even when this run resumes) before the expert-parallel run, prints its
loss and gradient norm beside the expert-parallel ones each step, checks them within a tolerance,
checks that the non-expert weights are the same on every rank at the end, and exits non-zero when
a check fails. On a resumed run this is also the check that the resumed curve continues the
uninterrupted one. The learning rate warms up linearly over ``--warmup`` steps: without it the
default model's bfloat16 loss jumped (5.7 -> 9.5 in 5 steps at lr 1e-3 on GPUs) and the two
compiled programs' rounding differences grew with it.

Checkpoints: ``--save DIR`` writes the model and AdamW state with ``torch.distributed.checkpoint``
after step ``--save-step`` (default: the last step), with ``train_ep.json`` (the model, data and
optimizer settings). The state comes from ``torch.distributed.checkpoint.state_dict``'s
``get_state_dict``: the unsharded model's keys, for the model and AdamW alike; expert entries are
DTensors, so each rank writes its own rows. ``--resume DIR`` loads it on any W that divides the
experts and the batch (its settings replace the command line's) and trains on to step ``--steps``.

``--ep transformers`` trains the same model under transformers' own expert parallelism
instead (5.21 or later, with ``accelerate``): ``from_pretrained(distributed_config=
DistributedConfig(ep_size=W, fsdp_size=W))`` and ``torch.compile(model)`` with the inner compiler,
the same data, optimizer and step; for a comparison of memory and tokens/s (``--check`` checks its
losses too).

At the end rank 0 prints, per rank, expert and total parameter MiB, AdamW state MiB and the peak
memory (CUDA: ``torch.cuda.max_memory_allocated`` over the training steps; CPU: the process's peak
RSS, compile included), and tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from tabulate import tabulate
from torch.distributed.tensor import DTensor
from torch.multiprocessing.spawn import ProcessException

import fx_passes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch_combine import add_launch_args, init_rank, launch  # noqa: E402

_MiB = 2**20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Relative tolerance of the loss and gradient-norm checks: the expert-parallel model sums in another
# order than the single-device one, and AdamW carries the differences on from step to step.
_RTOL = {"float32": 2e-3, "bfloat16": 3e-2}
_META = "train_ep.json"


@dataclasses.dataclass
class Settings:
    """What a checkpoint must be resumed with: the model, the data and the optimizer."""

    layers: int = 8
    experts: int = 16
    top_k: int = 2
    hidden: int = 1024
    inter: int = 1024
    heads: int = 16
    kv_heads: int = 4
    batch: int = 16
    seq: int = 1024
    dtype: str = "bfloat16"
    lr: float = 3e-4
    warmup: int = 5
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    corpus: str = ""


_TINY = dict(layers=4, experts=8, hidden=32, inter=32, heads=4, kv_heads=2, batch=4, seq=32)
_TINY.update(dtype="float32", lr=3e-3, warmup=0)


# ----------------------------------------------------------------------------- model and data
def build_model(s: Settings, device: torch.device) -> torch.nn.Module:
    """The single-device model: the same weights on every rank (built on the CPU from the seed)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=256,  # bytes
        hidden_size=s.hidden,
        intermediate_size=s.inter,  # unused: every layer is sparse
        moe_intermediate_size=s.inter,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.hidden // s.heads,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        norm_topk_prob=True,
        max_position_embeddings=max(s.seq, 256),
        use_cache=False,
    )
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm")
    return model.to(device=device, dtype=_DTYPES[s.dtype]).train()


def load_transformers_ep(s: Settings, device: torch.device, W: int) -> torch.nn.Module:
    """The same model under transformers' own parallelism (5.21 or later), for comparison.

    Rank 0 writes the single-device model with ``save_pretrained``; every rank loads it with
    ``from_pretrained(distributed_config=DistributedConfig(ep_size=W, fsdp_size=W))``, the
    configuration transformers documents for expert parallelism with each rank on its own batch:
    experts split E/W over the ranks (``AllToAllEP``: a count all-to-all, a ``.tolist()`` and two
    row all-to-alls per layer), the other weights sharded by FSDP2, which also averages their
    gradients and the experts' over the ranks. Needs ``accelerate``.
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = [tempfile.mkdtemp(prefix="train_ep_tf_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    if dist.get_rank() == 0:
        build_model(s, torch.device("cpu")).save_pretrained(path[0])
    dist.barrier()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path[0],
            distributed_config=DistributedConfig(ep_size=W, fsdp_size=W),
            experts_implementation="grouped_mm",
            dtype=_DTYPES[s.dtype],
        )
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)
    return model.to(device).train()


def load_corpus(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    return data.long()


def global_batch(corpus: torch.Tensor, s: Settings, step: int) -> torch.Tensor:
    """Step ``step``'s ``[batch, seq]`` byte windows: a function of the seed and the step only."""
    if corpus.numel() <= s.seq:
        raise ValueError(f"the corpus has {corpus.numel()} bytes; --seq {s.seq} needs more")
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    starts = torch.randint(0, corpus.numel() - s.seq, (s.batch, 1), generator=g)
    return corpus[starts + torch.arange(s.seq)]


def is_expert(name: str) -> bool:
    return ".experts." in name


def make_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """AdamW; the experts (DTensors after sharding) in a group of their own, so that ``foreach``
    never mixes DTensors with plain tensors."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if is_expert(n)]},
        {"params": [p for n, p in named if not is_expert(n)]},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)


def set_lr(opt: torch.optim.Optimizer, s: Settings, step: int) -> None:
    """Linear warm-up over the first ``s.warmup`` steps, then constant: a function of the step
    alone, so a resumed run needs no scheduler state."""
    for g in opt.param_groups:
        g["lr"] = s.lr * min(1.0, step / s.warmup) if s.warmup > 0 else s.lr


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grads(model: torch.nn.Module, clip: float, group=None) -> torch.Tensor:
    """Scale the gradients to global norm <= ``clip``; returns the norm before (float32).

    Replicated (non-expert) gradients count once; sharded (DTensor) ones are summed over the ranks.
    No host sync: the scale stays on the device."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = [_local(g).float().pow(2).sum() for g in grads]
    rep = [q for q, g in zip(sq, grads, strict=True) if not isinstance(g, DTensor)]
    sharded = [q for q, g in zip(sq, grads, strict=True) if isinstance(g, DTensor)]
    total = torch.stack(rep).sum() if rep else sq[0].new_zeros(())
    if sharded:
        part = torch.stack(sharded).sum()
        dist.all_reduce(part, group=group)
        total = total + part
    norm = total.sqrt()
    scale = (clip / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        _local(g).mul_(scale.to(g.dtype))
    return norm


def all_reduce_replicated_grads(model: torch.nn.Module) -> None:
    """Sum the non-expert gradients over the ranks: one all-reduce of one flat buffer."""
    grads = [
        p.grad for p in model.parameters() if p.grad is not None and not isinstance(p, DTensor)
    ]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(r)


def param_mib(model: torch.nn.Module, experts: bool | None = None) -> float:
    return (
        sum(
            _local(p).nbytes
            for n, p in model.named_parameters()
            if experts is None or is_expert(n) == experts
        )
        / _MiB
    )


def optim_mib(opt: torch.optim.Optimizer) -> float:
    return (
        sum(
            _local(v).nbytes
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
        / _MiB
    )


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the reference
def train_single_device(s, corpus, steps, inner, device) -> dict:
    """The single-device model on the whole global batch, uninterrupted from step 1."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(s, device)
    opt = make_optimizer(model, s)
    # inner "eager": no torch.compile at all (the same computation, without Dynamo's tracing time)
    compiled = model if inner == "eager" else torch.compile(model, backend=inner, fullgraph=True)
    losses, norms, times = {}, {}, {}
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x = global_batch(corpus, s, step).to(device)
        loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        norm = clip_grads(model, s.clip)
        set_lr(opt, s, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[step], norms[step] = loss.item(), norm.item()
        _sync(device)
        times[step] = time.perf_counter() - t0
    out = dict(
        losses=losses,
        norms=norms,
        times=times,
        expert_mib=param_mib(model, True),
        param_mib=param_mib(model),
        optim_mib=optim_mib(opt),
        peak_mib=peak_mib(device) if device.type == "cuda" else float("nan"),
    )
    del model, opt, compiled
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- checkpoints
def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    """The model's and AdamW's state by the unsharded model's parameter names (expert entries are
    DTensors of this rank's rows); ``get_state_dict`` creates AdamW's state if there is none yet."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": step}


def save_checkpoint(path: str, model, opt, step: int, s: Settings) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, opt, step), checkpoint_id=path)
    if dist.get_rank() == 0:
        with open(os.path.join(path, _META), "w") as f:
            meta = dataclasses.asdict(s) | {"step": step, "corpus_sha256": corpus_digest(s.corpus)}
            json.dump(meta, f, indent=1)
    dist.barrier()


def read_settings(path: str) -> Settings:
    """The settings a checkpoint was saved with; its corpus must still hold the same bytes (by
    default the corpus is this file, which may have changed since)."""
    with open(os.path.join(path, _META)) as f:
        meta = json.load(f)
    meta.pop("step")
    digest = meta.pop("corpus_sha256")
    s = Settings(**meta)
    if corpus_digest(s.corpus) != digest:
        raise SystemExit(
            f"the corpus {s.corpus} changed since the checkpoint in {path} was saved (SHA-256 "
            f"{digest[:12]}...): a resumed run would train on other data"
        )
    return s


def corpus_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_checkpoint(path: str, model, opt) -> int:
    """Load ``path`` (saved at any W); returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, opt, -1)
    dcp.load(state, checkpoint_id=path)  # reshards the expert rows to this W
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


# ----------------------------------------------------------------------------- one rank
def run(args, rank: int, world_size: int, local_rank: int, init_method: str | None) -> None:
    device = init_rank(args, rank, world_size, local_rank, init_method)
    try:
        ok = _train(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()
    # Leave the compiled model's many objects to the OS: the interpreter's last garbage collection
    # of them took 10-40 s per process on a busy 2-core machine.
    gc.freeze()
    if not ok:
        sys.exit(1)


def _say(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def _train(args, rank: int, W: int, device: torch.device) -> bool:
    s = read_settings(args.resume) if args.resume else args.settings
    if s.experts % W or s.batch % W:
        raise SystemExit(f"--experts {s.experts} and --batch {s.batch} must be multiples of W={W}")
    inner = args.inner or ("inductor" if device.type == "cuda" else "aot_eager")
    corpus = load_corpus(s.corpus)
    tokens = s.batch * s.seq  # per step, over all ranks
    _say(
        rank,
        f"Qwen3-MoE: {s.layers} layers, {s.experts} experts (top-{s.top_k}), hidden {s.hidden}, "
        f"expert inter {s.inter}, {s.dtype}; W={W} ({dist.get_backend()}, {device.type}), "
        f"inner compiler {inner}; global batch {s.batch} x {s.seq} bytes of "
        f"{os.path.basename(s.corpus)} ({s.batch // W} per rank), AdamW lr {s.lr}"
        + (f" (linear warm-up over {s.warmup} steps)" if s.warmup else ""),
    )

    # The single-device reference first (rank 0), so its memory and time do not mix with ours.
    ref = None
    if args.check:
        if rank == 0:
            print("training the single-device reference (rank 0, all experts) ...", flush=True)
            ref_inner = args.ref_inner or inner
            ref = train_single_device(s, corpus, args.steps, ref_inner, device)
        dist.barrier()

    theirs = args.ep == "transformers"
    if theirs:
        model = load_transformers_ep(s, device, W)
        compiled = torch.compile(model, backend=inner)  # its EP breaks the graph in every layer
        _say(rank, f"transformers' own EP: DistributedConfig(ep_size={W}, fsdp_size={W})")
    else:
        model = build_model(s, device)
        shards = fx_passes.shard_experts(model)
    opt = make_optimizer(model, s)
    start = load_checkpoint(args.resume, model, opt) if args.resume else 0
    if args.resume:
        _say(rank, f"resumed from {args.resume} after step {start}")
    if start >= args.steps:
        raise SystemExit(f"the checkpoint is at step {start}; ask for --steps > {start}")
    if not theirs:
        backend = fx_passes.moe_backend(inner=inner, sum_per_rank=args.sum_per_rank)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        e_l = s.experts // W
        _say(
            rank,
            f"sharded {len(shards)} expert modules: rank r holds experts "
            f"{e_l}*r..{e_l}*r+{e_l - 1} of each layer",
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    save_step = args.save_step or args.steps
    if args.save and not start < save_step <= args.steps:
        raise SystemExit(f"--save-step {save_step} is not one of this run's steps")
    times, losses, norms = {}, {}, {}
    b = s.batch // W
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        x = global_batch(corpus, s, step)[rank * b : (rank + 1) * b].to(device)
        loss = compiled(input_ids=x, labels=x).loss
        if theirs:
            loss.backward()  # FSDP2 averages the gradients over the ranks
        else:
            (loss / W).backward()
            all_reduce_replicated_grads(model)
        norm = clip_grads(model, s.clip)
        set_lr(opt, s, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean_loss = loss.detach().float() / W
        dist.all_reduce(mean_loss)
        losses[step], norms[step] = mean_loss.item(), norm.item()
        _sync(device)
        times[step] = time.perf_counter() - t0
        line = (
            f"step {step:4d}/{args.steps}  loss {losses[step]:.4f}  gnorm {norms[step]:.4f}  "
            f"{tokens / times[step]:10.0f} tok/s  {times[step] * 1e3:8.1f} ms"
        )
        if ref is not None:
            d = abs(losses[step] - ref["losses"][step])
            line += (
                f"  | single device: loss {ref['losses'][step]:.4f} gnorm "
                f"{ref['norms'][step]:.4f}  |dloss| {d:.2e}"
            )
        _say(rank, line)
        if args.save and step == save_step:
            save_checkpoint(args.save, model, opt, step, s)
            _say(rank, f"saved the model and AdamW state after step {step} to {args.save}")

    # Memory and speed per rank.
    timed = _timed_steps(times)
    mine = dict(
        rank=rank,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        expert_mib=param_mib(model, True),
        param_mib=param_mib(model),
        optim_mib=optim_mib(opt),
        peak_mib=peak_mib(device),
        tokens_per_s=tokens / statistics.median(times[k] for k in timed),
        step_ms=[times[k] * 1e3 for k in sorted(times)],
    )
    everyone = [None] * W
    dist.all_gather_object(everyone, mine)
    ok = _replicas_agree(model, rank) if args.check and not theirs else True
    result = dict(world_size=W, steps=sorted(losses), losses=losses, grad_norms=norms)
    result.update(ranks=everyone, settings=dataclasses.asdict(s), check=None)
    if rank == 0:
        _print_table(everyone, ref, tokens, timed, len(times), device, W)
        if ref is not None:
            result["check"] = ok = _report_check(s, losses, norms, ref) and ok
            result["single_device"] = ref
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    verdict = torch.tensor([int(ok)], device=device)
    dist.broadcast(verdict, 0)
    return bool(verdict.item())


def _timed_steps(times: dict) -> list[int]:
    """The steps whose median time gives tokens/s: all but the first two (compilation, warm-up),
    if there are more."""
    steps = sorted(times)
    return steps[2:] or steps


def _print_table(everyone, ref, tokens, timed, n_steps, device, W) -> None:
    cuda = device.type == "cuda"
    head = ["rank", "device", "expert MiB", "param MiB", "AdamW MiB"]
    head += ["peak MiB (training)" if cuda else "peak RSS MiB", "tokens/s"]
    keys = ("rank", "device", "expert_mib", "param_mib", "optim_mib", "peak_mib", "tokens_per_s")
    table = [[m[k] for k in keys] for m in everyone]
    if ref is not None:
        rt = _timed_steps(ref["times"])
        ref["tokens_per_s"] = tokens / statistics.median(ref["times"][k] for k in rt)
        row = ["1 device, all experts", everyone[0]["device"]]
        row += [ref[k] for k in keys[2:5]]
        row += [ref["peak_mib"] if cuda else None, ref["tokens_per_s"]]
        table.append(row)
    print(
        f"\nmemory and speed, W={W}: parameters and AdamW state held by each rank; tokens/s = "
        f"global batch tokens / median step time over steps {timed[0]}..{timed[-1]}"
        + (" (the first two compile and warm up)" if len(timed) < n_steps else "")
    )
    print(tabulate(table, head, floatfmt=".1f", tablefmt="github", missingval="n/a"), flush=True)


def _replicas_agree(model, rank: int) -> bool:
    """The non-expert weights are the same on every rank (their gradients were all-reduced)."""
    flat = torch.cat(
        [p.detach().float().flatten() for p in model.parameters() if not isinstance(p, DTensor)]
    )
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    spread = float((hi - lo).max())
    _say(rank, f"non-expert weights, largest difference between ranks: {spread:.2e} (must be 0)")
    return spread == 0.0


def _report_check(s, losses, norms, ref) -> bool:
    """Losses within ``_RTOL`` at every step. Gradient norms within it at step 1 (the same weights
    on both sides); at later steps within 5x that in float32, and only printed in bfloat16 (a
    gradient norm amplifies the small differences of the weights, which bfloat16 makes large)."""
    rtol = _RTOL[s.dtype]

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    d_loss = max(rel(v, ref["losses"][k]) for k, v in losses.items())
    d_norm = max(rel(v, ref["norms"][k]) for k, v in norms.items())
    ok = d_loss <= rtol and all(map(math.isfinite, losses.values()))
    msg = [f"loss {d_loss:.2e} (tolerance {rtol:g})"]
    if 1 in norms:
        d_first = rel(norms[1], ref["norms"][1])
        ok = ok and d_first <= rtol
        msg.append(f"gradient norm at step 1 {d_first:.2e} (tolerance {rtol:g})")
    if s.dtype == "float32":
        ok = ok and d_norm <= 5 * rtol
        msg.append(f"gradient norm {d_norm:.2e} (tolerance {5 * rtol:g})")
    else:
        msg.append(f"gradient norm {d_norm:.2e} (not checked in {s.dtype})")
    print(
        f"check against the single-device model, steps {min(losses)}..{max(losses)}, largest "
        f"relative differences: " + ", ".join(msg) + (": PASSED" if ok else ": FAILED"),
        flush=True,
    )
    return ok


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_launch_args(p)
    p.add_argument("--steps", type=int, default=20, help="train up to this step (total)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU tests)")
    p.add_argument("--check", action="store_true", help="compare with the single-device model")
    p.add_argument("--save", metavar="DIR", help="torch.distributed.checkpoint directory")
    p.add_argument("--save-step", type=int, help="save after this step (default: the last)")
    p.add_argument("--resume", metavar="DIR", help="resume from a --save directory (any W)")
    p.add_argument("--inner", help="inner compiler (default: inductor on CUDA, else aot_eager)")
    p.add_argument(
        "--ref-inner", help="the --check model's compiler (default: --inner; eager: no compile)"
    )
    p.add_argument(
        "--ep",
        choices=("moe", "transformers"),
        default="moe",
        help="moe: shard_experts + the moe backend; transformers: its own EP + FSDP2 (5.21+)",
    )
    p.add_argument(
        "--sum-per-rank",
        action="store_true",
        help="moe backend: sum each token's slots on its experts' rank (top-k > W; fewer bytes)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the losses, memory, check as JSON")
    d = Settings()
    for f in dataclasses.fields(Settings):
        if f.name in ("seed", "corpus", "weight_decay", "dtype"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)))
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bfloat16 on CUDA")
    p.add_argument("--seed", type=int)
    p.add_argument("--corpus", help="a text file (bytes are the tokens); default: this file")
    args = p.parse_args(argv)
    base = dataclasses.asdict(d) | (_TINY if args.tiny else {})
    if not torch.cuda.is_available() or args.cpu:
        base["dtype"] = "float32"
    base["corpus"] = os.path.abspath(__file__)
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    base.update({k: v for k, v in given.items() if v is not None})
    if args.corpus:
        base["corpus"] = os.path.abspath(args.corpus)
    args.settings = Settings(**base)
    if args.ep == "transformers" and (args.save or args.resume):
        p.error("--save / --resume are for --ep moe (transformers saves with save_pretrained)")
    if args.save and args.resume and os.path.abspath(args.save) == os.path.abspath(args.resume):
        p.error("--save and --resume must be different directories")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        launch(run, args)
    except ProcessException as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
