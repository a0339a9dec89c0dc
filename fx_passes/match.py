"""What a routing-family matcher hands to the rewrite: :class:`MoEMatch` and its expert bodies.

How a family plugs in
---------------------
A family module (``families.loop``, ``families.sort``, ...) defines::

    def find_patterns(gm: fx.GraphModule, rejects: list[Rejected]) -> list[MoEMatch]

listed in ``families.FAMILIES``. It looks at the Dynamo-level graph (torch-level calls:
``torch.topk``, ``torch.where``, ``Tensor.index_add_``, ``torch._C._nn.linear``) and, for each MoE
block it is sure about, returns one :class:`MoEMatch`; for each candidate it is not sure about it
appends a :class:`Rejected` with the reason (logged at debug level, shown by ``explain``). It must
not mutate the graph: ``fuse.fuse_moe_routing`` checks every match against its rewrite on small
random inputs at W = 1 (``verify``) and only then rewrites it (``emit.rewrite_match``).

A match names, in the original graph:

* ``x``: the ``[T, H]`` rows the experts read (the node the per-expert gathers index into).
* ``topk_idx``: ``[T, K]`` (or ``[T]``) integer global expert ids.
* ``topk_weights``: ``[T, K]`` floating weights applied to each slot's expert output, or None when
  the code applies none. The rewrite applies them in ``combine``; the matcher must leave the
  multiplication out of the expert body (weights applied to the expert *input* are not
  expressible: reject such blocks).
* ``output``: the node whose value is the routed sum ``[T, H']``; its uses after ``last_write``
  (or all its uses when ``last_write`` is None) are replaced by the rewrite's result.
  ``base`` is what that sum was accumulated onto (a shared expert's output, say), or None for
  zeros; the rewrite emits ``base + combine(...)`` then.
* ``remove``: every node the rewrite deletes (the in-place ``index_add_``/``setitem`` writes
  included: the rewrite removes nodes deliberately, never with ``eliminate_dead_code``). Each
  user of a removed node must itself be removed, or be a use of ``output`` after ``last_write``.
* ``body``: the expert computation, one of

  - :class:`ModuleListExperts`: one :class:`ExpertSubgraph` per expert (ModuleList experts):
    the rows the expert reads, its output before any routing weight, and the nodes between. When
    all experts have the same structure of linear layers and row-wise ops the rewrite stacks the
    local experts' weights and emits ``torch._grouped_mm`` (bf16), else it runs each local expert
    on its segment of ``torch.split(recv_x, tokens_per_expert.tolist())``.
  - :class:`StackedExperts`: parameters ``[E, ...]`` indexed by expert plus an ``emit`` callback
    that builds the expert computation over rows grouped by local expert; the rewrite hands it the
    parameters sliced to this rank's experts (or as they are when already ``[E/W, ...]``).

Shape letters: T tokens, H hidden (H' expert output), K top-k, E experts, W ranks, E_l = E / W
local experts, R rows received by this rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What the stand-in of an expert parameter sharded by ``fx_passes.shard_experts`` carries
    (``stand_in._moe_shard``): the parameter's dotted name, E, this rank's experts, the group it
    was sharded over, and ``param``, the DTensor parameter holding the local rows of a stacked
    ``[E, ...]`` parameter (None for a ModuleList expert that another rank owns). The pass puts
    it in ``placeholder.meta["moe_shard"]``.
    """

    name: str
    num_experts: int
    local_experts: range
    group_name: str
    param: Any = None


def shard_info(value: object) -> ShardInfo | None:
    """The :class:`ShardInfo` of a sharded parameter's stand-in, None for anything else."""
    return getattr(value, "_moe_shard", None) if isinstance(value, torch.Tensor) else None


@dataclasses.dataclass
class Rejected:
    """A candidate block a family looked at and left alone, and why.

    ``error`` is the exception that made the pass give up on the block (a failure while
    matching, checking or rewriting it), None when the pass decided so itself.
    """

    family: str
    module_path: str
    reason: str
    error: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass
class ExpertSubgraph:
    """One expert of a ModuleList, as it appears in the original graph.

    ``input`` is the ``[n_e, H]`` node of rows routed to this expert (e.g. ``x[token_idx]``),
    ``output`` the ``[n_e, H']`` expert result before any routing weight, ``nodes`` every node on
    a path from ``input`` to ``output`` (``input`` excluded, ``output`` included) in graph order.
    Anything else those nodes read (parameters, constants) is captured as-is.
    """

    expert: int
    input: Node
    output: Node
    nodes: list[Node]


@dataclasses.dataclass
class ModuleListExperts:
    """Per-expert subgraphs; ``experts[e]`` is global expert ``e``."""

    experts: list[ExpertSubgraph]


EmitFn = Callable[[fx.Graph, Node, Node, list[Node]], Node]


@dataclasses.dataclass
class StackedExperts:
    """Experts as stacked parameters ``[E, ...]`` (or ``[E/W, ...]`` when already sharded).

    ``emit(graph, recv_x_RH, tokens_per_expert_El, local_params) -> expert_out_RH'`` inserts (at
    the graph's current insertion point) the expert computation over ``recv_x`` whose rows are
    grouped by local expert (``tokens_per_expert`` int64 ``[E_l]``; ``experts.grouped_offsets``
    turns it into int32 cumulative offsets), with ``local_params[i]`` the ``[E_l, ...]`` slice of
    ``params[i]``. It must set ``meta["val"]``/``meta["example_value"]`` on what it creates
    (``graph.call`` does). To read the counts on the host (split sizes), read
    ``experts.host_counts(tokens_per_expert)``: the CPU copy dispatch's one sync already made, so
    the block does not sync again.
    """

    params: list[Node]
    emit: EmitFn


@dataclasses.dataclass
class MoEMatch:
    """One MoE block a family is sure about (see the module docstring for each field)."""

    family: str
    module_path: str
    num_experts: int
    x: Node
    topk_idx: Node
    topk_weights: Node | None
    output: Node
    remove: list[Node]
    body: ModuleListExperts | StackedExperts
    base: Node | None = None
    last_write: Node | None = None
    rewritten: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Whether the rewrite checks the block against its W = 1 rewrite on random inputs first. A
    # block holding the user's own collectives (family E) cannot run alone, so it relies on its
    # exact structural match instead.
    verify_at_w1: bool = True
    # The group the block's own collectives use (family E): the rewrite runs over it rather
    # than over the pass's ``group``.
    own_group: Any = None

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "module": self.module_path,
            "num_experts": self.num_experts,
            "body": "ModuleList" if isinstance(self.body, ModuleListExperts) else "stacked",
            **self.rewritten,
        }
