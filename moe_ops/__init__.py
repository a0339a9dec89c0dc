"""MoE dispatch and combine as ``torch.library`` custom ops (namespace ``moe_ops``).

Importing this package registers the ops and does nothing else.
"""

from moe_ops._api import DispatchHandle, combine, dispatch
from moe_ops._comm import PeerInputError
from moe_ops._kernels import use_kernels

__all__ = ["DispatchHandle", "PeerInputError", "combine", "dispatch", "use_kernels"]
