"""Input checks shared by both modes' ops and the Python API.

Each check is local to a rank and needs no data (shapes, dtypes, devices), except
:func:`bad_id_error`, which describes bad expert ids once a rank knows it has some. The checks
return the error instead of raising it: a rank with bad input still takes part in the count
exchange, flagged bad, so that its peers raise too.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dispatch(
    x: Tensor, topk_idx: Tensor, num_experts: int, world_size: int
) -> Exception | None:
    """Shape/dtype/device checks that need no data; returns the error instead of raising it."""
    if x.dim() != 2:
        return ValueError(f"moe_ops.dispatch: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        return TypeError(f"moe_ops.dispatch: x must be floating point, got dtype {x.dtype}")
    if topk_idx.dtype not in INT_DTYPES:
        return TypeError(
            "moe_ops.dispatch: topk_idx must be an integer tensor of expert ids, "
            f"got dtype {topk_idx.dtype}"
        )
    if topk_idx.dim() != 2:
        return ValueError(
            f"moe_ops.dispatch: topk_idx must be [T, K] (or [T]), got shape {tuple(topk_idx.shape)}"
        )
    if topk_idx.shape[0] != x.shape[0]:
        return ValueError(
            f"moe_ops.dispatch: topk_idx has {topk_idx.shape[0]} rows but x has {x.shape[0]} "
            "tokens; "
            "expected one row of expert ids per token"
        )
    if topk_idx.device != x.device:
        return ValueError(
            f"moe_ops.dispatch: topk_idx is on {topk_idx.device} but x is on {x.device}; "
            "expected both on the same device"
        )
    if num_experts <= 0 or num_experts % world_size != 0:
        return ValueError(
            f"moe_ops.dispatch: num_experts must be a positive multiple of the group size "
            f"{world_size}, got {num_experts}"
        )
    return None


def bad_id_error(topk_idx: Tensor, num_experts: int) -> ValueError:
    ids = topk_idx.reshape(-1).to(torch.int64)
    bad = ids[(ids < -1) | (ids >= num_experts)]
    return ValueError(
        f"moe_ops.dispatch: topk_idx values must be expert ids in [0, {num_experts}) or -1 for an "
        f"unused slot; got {bad.numel()} out-of-range value(s), e.g. {bad[:4].tolist()}"
    )


def check_combine(
    expert_out: Tensor, topk_weights: Tensor | None, pair_pos: Tensor, num_rows
) -> Exception | None:
    """Checks of combine's inputs against the handle's ``pair_pos`` and its R (``num_rows``)."""
    if expert_out.dim() != 2:
        return ValueError(
            f"moe_ops.combine: expert_out must be 2-D [R, H'], got shape {tuple(expert_out.shape)}"
        )
    if expert_out.dtype not in FLOAT_DTYPES:
        return TypeError(
            f"moe_ops.combine: expert_out must be floating point, got {expert_out.dtype}"
        )
    rows = expert_out.shape[0]
    if isinstance(rows, int) and isinstance(num_rows, int) and rows != num_rows:
        return ValueError(
            f"moe_ops.combine: expert_out must have one row per row of recv_x (R={num_rows}), "
            f"got {rows} rows"
        )
    if expert_out.device != pair_pos.device:
        return ValueError(
            f"moe_ops.combine: expert_out is on {expert_out.device} but dispatch ran on "
            f"{pair_pos.device}; expected the same device"
        )
    if topk_weights is not None:
        if topk_weights.dtype not in FLOAT_DTYPES:
            return TypeError(
                f"moe_ops.combine: topk_weights must be floating point, got {topk_weights.dtype}"
            )
        if tuple(topk_weights.shape) != tuple(pair_pos.shape):
            return ValueError(
                f"moe_ops.combine: topk_weights must be [T, K] = {list(pair_pos.shape)} like the "
                f"topk_idx given to dispatch, got {list(topk_weights.shape)}"
            )
        if topk_weights.device != pair_pos.device:
            return ValueError(
                f"moe_ops.combine: topk_weights is on {topk_weights.device} but dispatch ran on "
                f"{pair_pos.device}; expected the same device"
            )
    return None
