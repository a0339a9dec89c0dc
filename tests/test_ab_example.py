"""``examples/ab_dispatch_combine.py`` on 2 gloo ranks: another tree (this one, copied) is renamed,
registers its ops beside the installed ones, agrees with them bit for bit and gets timed; both
trees with ``sum_per_rank=True`` (K = 3 > W: equal up to rounding) and the seed PR's algorithm
(forward only) beside them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._dist import run_example, under_torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(under_torchrun(), reason="starts its own gloo ranks; not under torchrun")
def test_ab_example_runs_two_trees():
    argv = ["--tree", f"copy={ROOT}", "--sum-per-rank", "--seed", "--world-size", "2", "--cpu"]
    argv += ["--iters", "2", "--warmup", "1", "--shapes", "40,16,3,4"]
    lines = run_example(ROOT, "ab_dispatch_combine.py", argv).splitlines()
    header = next(line for line in lines if line.startswith("| shape"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [
        "this",
        "copy",
        "per_rank",
        "copy_per_rank",
        "seed",
        "copy / this",
        "per_rank / this",
        "copy_per_rank / this",
        "seed / this",
    ], header
    rows = [line for line in lines if line.startswith("| T=40 H=16 top-3/4")]
    assert len(rows) == 2, lines  # fwd and fwd+bwd
    ratio = r"\d+\.\d+"
    for row in rows:
        _, name, *cells = [c.strip() for c in row.strip("|").split("|")]
        # the copy of this tree and sum_per_rank (both trees): timed both passes
        assert all(re.fullmatch(ratio, c) for c in cells[-4:-1]), row
        # the seed PR's algorithm has no backward
        assert re.fullmatch(ratio, cells[-1]) if name == "fwd" else cells[-1] == "n/a", row
