"""The pass's entry point: :func:`fuse_moe_routing` finds, checks and rewrites MoE blocks.

For each family of ``families.FAMILIES`` (earlier families win) it asks ``find_patterns(gm,
rejects)`` for :class:`~fx_passes.match.MoEMatch` es, checks each one against its own rewrite on
small random inputs at W = 1 (``verify.verify_match``), and only then rewrites it
(``emit.rewrite_match``). Graphs of higher-order ops called from ``gm`` (checkpoint regions)
get the same treatment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
import torch.fx as fx
from torch.fx import Node

from fx_passes.emit import check_capacity, rewrite_match
from fx_passes.families import FAMILIES
from fx_passes.graph import check_removable
from fx_passes.group import resolve_group
from fx_passes.match import MoEMatch, Rejected, shard_info
from fx_passes.verify import verify_match

log = logging.getLogger("fx_passes")


def _subgraphs(gm: fx.GraphModule, example_inputs: Sequence[Any] | None):
    """Graphs of higher-order ops (``torch.utils.checkpoint`` regions, ``wrap``) called from
    ``gm``, each with the real values of its inputs where ``gm``'s inputs give them."""
    real = {}
    if example_inputs is not None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        real = dict(zip(phs, example_inputs, strict=False))
    seen = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], Node):
            continue
        attr = n.args[0]
        if attr.op != "get_attr" or attr.target in seen:
            continue
        sub = getattr(gm, attr.target, None)
        if isinstance(sub, fx.GraphModule):
            seen.add(attr.target)
            yield sub, [real.get(a) for a in n.args[1:]]


def fuse_moe_routing(
    gm: fx.GraphModule,
    *,
    group: dist.ProcessGroup | None = None,
    example_inputs: Sequence[Any] | None = None,
    verify: bool = True,
    capacity: int | str | None = None,
    strict: bool = False,
    sum_per_rank: bool = False,
    transport: str | None = None,
    low_memory: bool = False,
) -> list[MoEMatch]:
    """Rewrite every MoE block of ``gm`` (a Dynamo-level graph) into dispatch/combine, in place.

    Args:
        gm: the graph, as a torch.compile backend receives it (or any graph of torch-level calls).
        group: a ``ProcessGroup`` for expert parallelism; None means the default group when
            ``torch.distributed`` is initialized, else a single rank.
        example_inputs: the graph's inputs; real tensors let the W = 1 check use real weights.
        verify: check each match against its rewrite on random inputs (random weights too)
            before committing it.
        capacity: opt-in sync-free dispatch. None (default): ``moe_ops.dispatch``/``combine``,
            whose one device -> host sync reads the row counts. ``"worst-case"`` or an int ``C``:
            ``moe_ops.dispatch_fixed``/``combine_fixed`` (the ``capacity=`` mode of
            :func:`moe_ops.dispatch`, ``overflow="error"``): ``recv_x`` is ``[C, H]`` with zero
            padding rows past ``tokens_per_expert.sum()``, and no host read at all.
            ``"worst-case"`` is ``W * T * K`` rows: nothing can overflow, results are the default
            mode's. An int ``C`` fixes the rows (a static shape); more pairs than ``C`` for this
            rank raise (CPU) or fire a device-side assertion (CUDA). The local experts must run as
            ``torch._grouped_mm`` (bfloat16 ModuleList experts of linear layers and row-wise ops,
            or stacked experts with no ``tolist``/``split`` by counts); otherwise the block keeps
            the default ops, logged at warning level and kept in
            ``match.rewritten["capacity_fallback"]``.
        sum_per_rank: :func:`moe_ops.dispatch`'s option (default ops: K > W; capacity-mode
            ops: the padded or p2p transport, K > 1): combine sums each token's slots on the
            rank of their experts and one row per (token, rank) comes back; equal up to
            rounding, not bit for bit.
        transport: with ``capacity``, :func:`moe_ops.dispatch`'s transport (None: ``"padded"``
            at W > 1; ``"p2p"``: reads from the peers' CUDA symmetric memory, no NCCL call;
            CUDA and W > 1 only, else the block's rewrite fails with that reason).
        low_memory: :func:`moe_ops.dispatch`'s option (default ops, slot order): large
            payloads come back in rounds, 1.5x the payload at the peak instead of 3x, slower.
        strict: raise when matching, checking or rewriting a block fails with an exception
            (a ``RuntimeError`` naming the block, from the exception) instead of leaving the
            block alone with the exception as its reason.

    An exception while matching, checking or rewriting one candidate never escapes (unless
    ``strict``): the candidate is left as it is (the graph too), with the exception as the
    reason, logged at warning level.

    Returns the rewritten blocks (family, number of experts, module path); why other candidates
    were left alone is logged at debug level and kept in ``gm.meta["moe_rejected"]``.
    """
    check_capacity(capacity, "fx_passes.fuse_moe_routing", transport, low_memory)
    sharded = _mark_sharded(gm, example_inputs)
    rejects: list[Rejected] = []
    done: list[MoEMatch] = []
    for family in FAMILIES:
        try:
            found = family.find_patterns(gm, rejects)
        except Exception as e:  # noqa: BLE001 - a matcher's failure must not break the compile
            _failed(rejects, family.name, "", "the matcher failed", e, strict)
            continue
        for match in found:
            where = match.module_path or "<top>"
            own = match.own_group if match.own_group is not None else group
            step = "the check failed"
            try:
                why = check_removable(match) or _uneven(match, own)
                if why is None and verify and match.verify_at_w1:
                    why = verify_match(gm, match, example_inputs, capacity)
                if why is not None:
                    rejects.append(Rejected(match.family, match.module_path, why))
                    continue
                step = "the rewrite failed"
                rewrite_match(gm, match, own, capacity, sum_per_rank, transport, low_memory)
            except Exception as e:  # noqa: BLE001 - one block's failure must not break the compile
                _failed(rejects, match.family, match.module_path, step, e, strict)
                continue
            log.info(
                "fx_passes: rewrote MoE block %s (family %s, %d experts, %s)",
                where,
                match.family,
                match.num_experts,
                match.rewritten.get("experts"),
            )
            done.append(match)
    # a family's failure on a block that a later family rewrote is not the block's failure
    _raise_if_strict(rejects, strict, {m.module_path for m in done})
    for r in rejects:
        log.debug(
            "fx_passes: left %s (family %s) alone: %s", r.module_path or "<top>", r.family, r.reason
        )
    for sub, sub_inputs in _subgraphs(gm, example_inputs):
        done += fuse_moe_routing(
            sub,
            group=group,
            example_inputs=sub_inputs,
            verify=verify,
            capacity=capacity,
            strict=strict,
            sum_per_rank=sum_per_rank,
            transport=transport,
            low_memory=low_memory,
        )
        rejects += sub.meta.get("moe_rejected", [])
    gm.meta["moe_rejected"] = rejects
    _check_no_stand_in_read(sharded, rejects)
    return done


def _uneven(match: MoEMatch, group: dist.ProcessGroup | None) -> str | None:
    """Why ``match``'s experts cannot be split evenly over ``group``, or None."""
    world_size = resolve_group(group)[1]
    if match.num_experts % world_size:
        return (
            f"{match.num_experts} experts, not a multiple of the group size {world_size}: "
            f"use a group whose size divides the number of experts"
        )
    return None


def _failed(
    rejects: list[Rejected], family: str, path: str, step: str, e: Exception, strict: bool
) -> None:
    """Record (or with ``strict`` raise) that ``step`` failed on the block at ``path``."""
    rejects.append(Rejected(family, path, f"{step}: {type(e).__name__}: {e}", error=e))
    _raise_if_strict(rejects[-1:], strict)
    log.warning(
        "fx_passes: MoE block %s (family %s) left as it is: %s",
        path or "<top>",
        family,
        step,
        exc_info=e,
    )


def _raise_if_strict(
    rejects: list[Rejected], strict: bool, rewritten: set[str] = frozenset()
) -> None:
    """With ``strict``, raise for the first rejection that an exception caused, unless its block
    (module path) is among ``rewritten``."""

    def inside(path: str) -> bool:
        return any(path == d or (d and path.startswith(d + ".")) for d in rewritten)

    failed = (
        next((r for r in rejects if r.error is not None and not inside(r.module_path)), None)
        if strict
        else None
    )
    if failed is not None:
        raise RuntimeError(
            f"fx_passes: MoE block {failed.module_path or '<top>'} (family {failed.family}): "
            f"{failed.reason}. Pass strict=False to leave such blocks as they are."
        ) from failed.error


def _mark_sharded(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> list[Node]:
    """Set ``meta["moe_shard"]`` on the placeholders that hold stand-ins of sharded experts."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reals = list(example_inputs) if example_inputs is not None else []
    out = []
    for i, p in enumerate(phs):
        grapharg = p.meta.get("grapharg")
        v = reals[i] if i < len(reals) else getattr(grapharg, "example", None)
        info = shard_info(v)
        if info is not None:
            p.meta["moe_shard"] = info
            out.append(p)
    return out


def _check_no_stand_in_read(sharded: list[Node], rejects: list[Rejected]) -> None:
    """A sharded expert's stand-in read by code the pass left alone would compute on zeros."""
    for p in sharded:
        if p.users:
            info = p.meta["moe_shard"]
            why = "; ".join(f"{r.module_path or '<top>'}: {r.reason}" for r in rejects)
            raise ValueError(
                f"fx_passes: {info.name} is sharded by shard_experts (experts "
                f"{info.local_experts.start}..{info.local_experts.stop - 1} of "
                f"{info.num_experts} on this rank), but the graph still reads it after the "
                f"pass: the MoE block that uses it was not rewritten"
                + (f" ({why})" if why else "")
                + ". Without the rewrite this rank has no values for other ranks' experts."
            )
