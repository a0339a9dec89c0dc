"""One candidate at a time: a matcher's failure on one block leaves that block alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from torch.fx import Node

from fx_passes.graph import module_path
from fx_passes.match import MoEMatch, Rejected

A = TypeVar("A")


def each_candidate(
    family: str,
    anchors: Iterable[A],
    match_one: Callable[[A], MoEMatch | str | None],
    rejects: list[Rejected],
    where: Callable[[A], Node] = lambda a: a,
) -> list[MoEMatch]:
    """``match_one(a)`` for every anchor ``a``: a match is kept, a string is a rejection's
    reason, None means "not this family's block". An exception rejects that candidate (module
    path of ``where(a)``), with the exception kept in ``Rejected.error``."""
    matches: list[MoEMatch] = []
    for a in anchors:
        try:
            got = match_one(a)
        except Exception as e:  # noqa: BLE001 - one candidate's failure is that candidate's
            reason = f"the matcher failed: {type(e).__name__}: {e}"
            rejects.append(Rejected(family, module_path(where(a)), reason, error=e))
            continue
        if isinstance(got, str):
            rejects.append(Rejected(family, module_path(where(a)), got))
        elif got is not None:
            matches.append(got)
    return matches
