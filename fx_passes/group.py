"""The process group the rewrite runs over: the one resolver of ``group`` arguments."""

from __future__ import annotations

import torch.distributed as dist


def resolve_group(group: dist.ProcessGroup | None) -> tuple[str, int, int]:
    """``(group_name, world_size, rank)``; None means the default group if initialized."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return "", 1, 0
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"fx_passes: group must be a ProcessGroup or None, got {type(group).__name__}"
        )
    if group.size() == 1:
        return "", 1, 0
    return group.group_name, group.size(), group.rank()


def group_by_name(name: str) -> dist.ProcessGroup | str:
    """The ``ProcessGroup`` a collective in the graph names (``group_name``), or why not."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except Exception as e:  # noqa: BLE001 - an unknown name means "not sure"
        return f"the all_to_all's group {name!r} is unknown here ({e})"
