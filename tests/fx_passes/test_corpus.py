"""The routing corpus (``_corpus.py``): every block compiled with the "moe" backend (aot_eager)
equals eager at W = 1 (output, input and parameter gradients), and the backend's verdict on it is
pinned in ``EXPECTED``, so that a change in what the pass does shows up as a deliberate change of
this table. Rewritten blocks and the hand-written expert-parallel ones are also checked at W = 2
(gloo) against the single-device block. The W = 1 runs go two at a time in spawned processes.

Outcomes:

* ``rewritten``: at least one ``moe_ops.dispatch`` in the compiled graphs.
* ``rejected``: left alone, and the backend said why (a warning, or a ``gm.meta["moe_rejected"]``
  entry); the reason must be non-empty.
* ``unnoticed``: left alone without a word (no warning, no rejected entry): the issue's contract
  ("rewritten or rejected with a reason a user can act on") is not met; marked xfail.
* ``crashed``: an exception escaped ``torch.compile`` (from the pass, or from Dynamo under
  ``compile_moe``'s capture flags); marked xfail.

``python3 examples/corpus_report.py`` prints the same table with reasons.
"""

from __future__ import annotations

import pytest

from tests.fx_passes import _corpus as C

EXPECTED = {
    "mixtral_ref": "rewritten",
    "deepseek_v3": "rejected",  # compile_moe: bincount(...).tolist() fails under the capture flags
    "olmoe": "rewritten",
    "jetmoe": "rewritten",
    "dbrx": "rejected",  # graph break in a loop: Dynamo skips the frame (compile_moe says so)
    "jamba": "rejected",  # same
    "qwen2_moe": "rewritten",
    "arctic": "rewritten",
    "grok1": "rewritten",  # batched: every expert on every row + a one-hot pick
    "megablocks_dmoe": "rewritten",  # sorted: recomputed perm // K, [E*I, H] viewed per expert
    "torchtitan": "rewritten",  # sorted: padded permute checked on split experts
    "torchtitan_score_before": "rejected",  # weights scale the expert input
    "nanomoe": "rejected",  # per-expert capacity: drops tokens in another order than moe_ops
    "makemoe_any_mask": "rewritten",  # semantic
    "sort_split_inverse": "rewritten",  # semantic
    "aria_tf453": "rewritten",  # sorted: tensor row offsets, a buffer filled by segment
    "aria_tf5_grouped_mm": "rewritten",
    "aria_tf5_eager": "rejected",
    "gshard": "rejected",  # per-expert capacity (see nanomoe)
    "switch_hf": "rejected",  # same
    "fairseq_top1": "rejected",  # same
    "tutel": "rejected",  # same
    "torchtitan_ep": "rewritten",  # at W = 1: sorted, as torchtitan
    # family ep by value (the check in a simulated world); at W = 1 no collective is left
    "megatron_ep": "rewritten",
    "fastmoe_top1_ep": "rewritten",
    # at W = 1 (no collectives there) the semantic family rewrites it; at W = 2 family ep
    # (by value) rewrites its own all_to_alls (tests/fx_passes/test_family_ep.py)
    "ship_ids_top2_ep": "rewritten",
    "deepspeed_top2_ep": "rejected",  # per-expert capacity (see nanomoe)
}

NAMES = sorted(C.CORPUS)
# hand-written EP blocks that family ep rewrites at W = 2 over their own collectives
EP_REWRITTEN_AT_W2 = {"megatron_ep", "fastmoe_top1_ep", "ship_ids_top2_ep"}


def test_table_covers_the_corpus():
    assert sorted(EXPECTED) == NAMES
    assert len(NAMES) >= 24
    assert sum(C.CORPUS[n].ep for n in NAMES) >= 4


@pytest.fixture(scope="module")
def w1_results():
    """W = 1 runs of the blocks, two at a time in spawned processes (compiling dominates; each
    block is independent): ``get(name)`` returns ``(ok, Outcome or traceback)``, having started
    the next block's run too."""
    with C.w1_pool(2) as pool:
        futures = {}

        def get(name):
            for n in NAMES[NAMES.index(name) : NAMES.index(name) + 2]:
                if n not in futures:
                    futures[n] = pool.submit(C.run_w1_safe, n)
            return futures[name].result()

        yield get


@pytest.mark.parametrize("name", NAMES)
def test_w1_equal_to_eager_and_outcome_pinned(w1_results, name):
    ok, outcome = w1_results(name)
    if not ok:
        pytest.fail(f"{name} at W = 1:\n{outcome}", pytrace=False)
    assert outcome.outcome == EXPECTED[name], (
        f"{name}: the backend's verdict changed from {EXPECTED[name]!r} to {outcome.outcome!r}"
        f" ({outcome.reason or outcome.families}); update EXPECTED if this is an improvement"
    )
    if outcome.outcome == "rejected":
        assert outcome.reason.strip(), f"{name}: rejected without a reason"
    if outcome.outcome in ("unnoticed", "crashed"):
        pytest.xfail(f"{outcome.outcome}: {outcome.reason or 'no warning, no rejected entry'}")


def test_deepseek_v3_reason_names_what_to_change(w1_results):
    """DeepSeek-V3 stays rejected (Dynamo cannot capture it), and the reason names the branch on
    the data-dependent counts and what to do with it."""
    ok, outcome = w1_results("deepseek_v3")
    assert ok, outcome
    assert "`if counts[i] == 0:`" in outcome.reason, outcome.reason
    assert "Remove that branch" in outcome.reason, outcome.reason


@pytest.mark.parametrize("name", NAMES)
def test_w2_gloo_equal_to_single_device(gloo_world, name):
    """Rewritten blocks, and every hand-written EP block, at W = 2 against the single-device
    block; blocks rewritten at W = 1 must be rewritten at W = 2 too, except hand-written EP ones
    (at W = 1 they hold no collectives) not in ``EP_REWRITTEN_AT_W2``. An EP block whose compile
    crashes is checked eagerly (the corpus block itself), then marked xfail."""
    entry = C.CORPUS[name]
    if not (entry.ep or EXPECTED[name] == "rewritten"):
        pytest.skip("not rewritten and not expert-parallel: W = 1 covers it")
    crashed = EXPECTED[name] == "crashed"
    results = gloo_world(2).run(C.w2_case, name, not crashed)
    if (EXPECTED[name] == "rewritten" and not entry.ep) or name in EP_REWRITTEN_AT_W2:
        assert all(r["rewritten"] for r in results), results
    if crashed:
        pytest.xfail("compile crashes (see the W = 1 test); the block itself is right eagerly")
