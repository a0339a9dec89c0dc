"""MoE dispatch and combine as ``torch.library`` custom ops (namespace ``moe_ops``).

Importing this package registers the ops and does nothing else.
"""

from moe_ops._api import DispatchHandle, combine, dispatch
from moe_ops._comm import PeerInputError
from moe_ops._pipeline import chunked_moe

__all__ = ["DispatchHandle", "PeerInputError", "chunked_moe", "combine", "dispatch"]
