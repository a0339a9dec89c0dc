"""The routing families: one module per family, registered in :data:`FAMILIES`.

Each family module defines ``find_patterns(gm, rejects) -> list[MoEMatch]`` (see
``fx_passes.match``); ``fuse.fuse_moe_routing`` asks them in the order of :data:`FAMILIES`, and
a block matched by an earlier family is rewritten before later ones look. Shared pieces live in
``_body`` (expert computations on rows grouped by expert) and ``_walks`` (walks of a sorted
permutation); a family imports those, never another family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.fx as fx

from fx_passes.families import batched, ep, loop, semantic, sort
from fx_passes.match import MoEMatch, Rejected


class Family(NamedTuple):
    """A routing family: its name (in ``Rejected.family`` and logs) and its matcher."""

    name: str
    find_patterns: Callable[[fx.GraphModule, list[Rejected]], list[MoEMatch]]


FAMILIES: tuple[Family, ...] = (
    Family("ep", ep.find_patterns),
    Family("sorted", sort.find_patterns),
    Family("batched", batched.find_patterns),
    Family("loop", loop.find_patterns),
    Family("semantic", semantic.find_patterns),
    # hand-written EP by what it computes (any spelling, checked in a simulated world): after
    # every other family, so that it only sees blocks none of them rewrote
    Family("ep", ep.find_by_value),
)
