"""``examples/host_time_per_function.py`` on 2 gloo ranks: it times the package's functions and
finds the collectives a d+c makes (three in the forward, K > W included: the token rows carry
their slots; two more in the backward)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._dist import run_example, under_torchrun

ROOT = Path(__file__).resolve().parents[1]


def _tables(log: str) -> dict[str, dict[str, int]]:
    """Each table's heading (the shape) -> calls per function."""
    tables, calls = {}, None
    for line in log.splitlines():
        if m := re.match(r"T=\d+ H=\d+ (top-\d+/\d+), (fwd\+bwd|fwd):", line):
            calls = tables.setdefault(f"{m[1]} {m[2]}", {})
        elif calls is not None and line.startswith("| ") and not line.startswith("| function"):
            name, _, n = (c.strip() for c in line.strip("|").split("|"))
            calls[name] = int(n)
    return tables


@pytest.mark.skipif(under_torchrun(), reason="starts its own gloo ranks; not under torchrun")
@pytest.mark.parametrize("backward", [False, True])
def test_host_time_example_counts_the_collectives(backward):
    argv = ["--world-size", "2", "--cpu", "--iters", "2", "--warmup", "1", "--top", "100"]
    argv += ["--shapes", "40,16,2,4;40,16,3,4", *(["--backward"] if backward else [])]
    log = run_example(ROOT, "host_time_per_function.py", argv)
    tables = _tables(log)
    which = "fwd+bwd" if backward else "fwd"
    assert set(tables) == {f"top-2/4 {which}", f"top-3/4 {which}"}, log
    for calls in tables.values():
        assert calls["dist.all_to_all_single"] == (5 if backward else 3), log
        assert calls["_ops._dispatch_group"] == 1 and calls["_comm.read_to_host"] == 1
