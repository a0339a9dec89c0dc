"""Find the expert routing of MoE models in FX graphs; rewrite it into ``moe_ops`` dispatch/combine.

Design (see ``_match`` for what a family matcher must fill in):

* ``fuse_moe_routing(gm, group=None)`` (in ``rewrite``) is the one entry point. It runs on the
  Dynamo-level graph inside the backend, before AOT autograd, so the ops' registered autograd
  gives the backward. Each family module (``family_loop`` for the per-expert loops A and C,
  ``family_batched`` B, ``family_sorted`` D, ``family_ep`` E) exposes
  ``find_patterns(gm, rejects) -> list[MoEMatch]``; the rewrite checks each match on random
  inputs at W = 1 and then replaces it with dispatch -> local experts -> combine.
* ``backend`` holds the torch.compile backend (``moe_backend``, the ``"moe"`` entry point),
  ``compile_moe`` (compiles with Dynamo's data-dependent capture flags set) and ``explain``.
* ``sharding.shard_experts`` keeps only a rank's experts' weights (DTensor ``Shard(0)`` for
  stacked experts); ``pretrained.load_pretrained_sharded`` loads a transformers checkpoint so.
"""

from fx_passes._match import MoEMatch, Rejected
from fx_passes.backend import compile_moe, explain, moe_backend
from fx_passes.pretrained import load_pretrained_sharded
from fx_passes.rewrite import fuse_moe_routing
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
