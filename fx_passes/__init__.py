"""Find the expert routing of MoE models in FX graphs; rewrite it into ``moe_ops`` dispatch/combine.

The data's path, top to bottom:

* ``backend``: ``moe_backend`` (the ``"moe"`` entry point), ``compile_moe`` (compiles with
  Dynamo's data-dependent capture flags set) and ``explain`` (reuses the backend).
* ``fuse``: ``fuse_moe_routing(gm, group=None)``, the one entry point of the pass. It runs on the
  Dynamo-level graph inside the backend, before AOT autograd, so the ops' registered autograd
  gives the backward. It asks each family of ``families.FAMILIES`` for ``MoEMatch`` es
  (``match``: plain data), checks each one against its rewrite on random inputs at W = 1
  (``verify``), then replaces it with dispatch -> local experts -> combine (``emit``, with the
  expert computation from ``experts``). ``graph`` holds the node helpers all of them share,
  ``group`` the one resolver of ``group`` arguments.
* ``sharding.shard_experts`` keeps only a rank's experts' weights (DTensor ``Shard(0)`` for
  stacked experts); ``pretrained.load_pretrained_sharded`` loads a transformers checkpoint so.
"""

from fx_passes.backend import compile_moe, explain, moe_backend
from fx_passes.fuse import fuse_moe_routing
from fx_passes.match import MoEMatch, Rejected
from fx_passes.pretrained import load_pretrained_sharded
from fx_passes.sharding import ShardedExperts, shard_experts

__all__ = [
    "MoEMatch",
    "Rejected",
    "ShardedExperts",
    "compile_moe",
    "explain",
    "fuse_moe_routing",
    "load_pretrained_sharded",
    "moe_backend",
    "shard_experts",
]
