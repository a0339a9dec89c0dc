"""``examples/train_ep.py``, its tiny configuration on CPU (2 layers): trained on 2 gloo ranks,
checked against the single-device model, checkpointed after step 2 and resumed on 1 rank.

Two runs of the example's command line (``--inner eager``: the backend's rewrite without
AOT autograd's tracing time, so both runs take well under a minute on 2 CPU cores):

1. W = 2: steps 1..4 with ``--check`` (losses and gradient norms of the single-device model, trained
   on rank 0 on the whole global batch), saved after step 2.
2. W = 1: resumed from that checkpoint, steps 3..4 with ``--check``: its losses equal the
   uninterrupted W = 2 run's (the resumed curve continues the first) and the single-device
   model's. Step 4's loss also depends on AdamW's restored state (step 3's update).

The ``--sum-per-rank`` run (1 layer) starts with this module and runs beside those: they leave a
core idle much of the time (the launcher waits, the W = 1 runs have one rank, and rank 1 waits
while rank 0 trains the single-device reference).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._dist import example_env, under_torchrun

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_ep.py"


class _Run:
    """The example's command line, started now; :meth:`result` waits for it. It runs in a session
    of its own, so that the ranks it spawns go with it when it has to be stopped."""

    def __init__(self, tmp_path: Path, name: str, *argv: str):
        self.out = tmp_path / f"{name}.json"
        self.log_path = tmp_path / f"{name}.log"
        self.cmd = [sys.executable, str(EXAMPLE), "--tiny", "--cpu", "--inner", "eager", "--check"]
        self.argv = argv
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*self.cmd, "--out", str(self.out), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=example_env(str(ROOT)),
                start_new_session=True,
            )

    def result(self, rc: int = 0, timeout: float = 600) -> tuple[dict | None, str]:
        try:
            returncode = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        log = self.log_path.read_text()
        cmd = " ".join(self.cmd + list(self.argv))
        assert returncode == rc, f"{cmd} exited {returncode}:\n{log}"
        return (json.loads(self.out.read_text()) if rc == 0 else None), log

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _run(tmp_path: Path, name: str, *argv: str, rc: int = 0) -> tuple[dict | None, str]:
    return _Run(tmp_path, name, *argv).result(rc)


@pytest.fixture(scope="module", autouse=True)
def _sum_per_rank_run(request, tmp_path_factory):
    """The run of :func:`test_train_ep_sum_per_rank_matches_single_device`, started when this
    module starts (when that test is selected)."""
    selected = any(
        item.module is request.module
        and item.name == "test_train_ep_sum_per_rank_matches_single_device"
        for item in request.session.items
    )
    if not selected or under_torchrun():
        yield None
        return
    argv = ("--world-size", "2", "--steps", "2", "--top-k", "4", "--sum-per-rank", "--layers", "1")
    run = _Run(tmp_path_factory.mktemp("train_ep_sum_per_rank"), "pr", *argv)
    yield run
    run.stop()


@pytest.mark.skipif(under_torchrun(), reason="starts its own gloo ranks; not under torchrun")
def test_train_ep_w2_matches_single_device_and_resumes_at_w1(tmp_path):
    ckpt = tmp_path / "ckpt"
    # A copy of the example as the corpus (its default), so that an edit of the example between
    # the two runs cannot change the data; the resumed run reads the path from the checkpoint.
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(EXAMPLE.read_bytes())
    a, log_a = _run(
        tmp_path,
        "w2",
        *("--world-size", "2", "--steps", "4", "--corpus", str(corpus), "--layers", "2"),
        *("--save", str(ckpt), "--save-step", "2"),
    )
    assert a["world_size"] == 2 and a["steps"] == [1, 2, 3, 4]
    assert a["check"] is True, log_a
    assert "PASSED" in log_a and "tok/s" in log_a
    ref = a["single_device"]
    for step, loss in a["losses"].items():
        assert loss == pytest.approx(ref["losses"][step], rel=1e-4), (step, log_a)
        assert a["grad_norms"][step] == pytest.approx(ref["norms"][step], rel=1e-3), (step, log_a)
    losses = [a["losses"][str(s)] for s in a["steps"]]
    assert losses[-1] < losses[0], log_a  # it trains
    # Each rank holds half of the experts (and their AdamW state); the rest is replicated.
    r0, r1 = a["ranks"]
    assert r0["expert_mib"] == pytest.approx(r1["expert_mib"])
    assert r0["expert_mib"] == pytest.approx(ref["expert_mib"] / 2)
    assert r0["param_mib"] - r0["expert_mib"] == pytest.approx(ref["param_mib"] - ref["expert_mib"])
    assert (ckpt / "train_ep.json").is_file() and (ckpt / ".metadata").is_file()

    b, log_b = _run(tmp_path, "w1", "--world-size", "1", "--steps", "4", "--resume", str(ckpt))
    assert "resumed from" in log_b and "after step 2" in log_b
    assert b["world_size"] == 1 and b["steps"] == [3, 4]
    assert b["check"] is True, log_b
    # The resumed run continues the uninterrupted W = 2 run's curve.
    for step in ("3", "4"):
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=1e-5), (log_a, log_b)
        assert b["grad_norms"][step] == pytest.approx(a["grad_norms"][step], rel=1e-4)
    assert b["ranks"][0]["expert_mib"] == pytest.approx(ref["expert_mib"])

    # A corpus that changed since the save is refused before anything trains.
    corpus.write_bytes(b"other bytes " * 64)
    _, log_c = _run(tmp_path, "c", "--world-size", "1", "--steps", "4", "--resume", str(ckpt), rc=1)
    assert "changed since the checkpoint" in log_c, log_c


@pytest.mark.skipif(under_torchrun(), reason="starts its own gloo ranks; not under torchrun")
def test_train_ep_sum_per_rank_matches_single_device(_sum_per_rank_run):
    """``--sum-per-rank`` with top-4 of the tiny model's experts at W = 2 (K > W: combine sums
    per rank): losses and gradient norms as on one device, within float32 rounding."""
    a, log = _sum_per_rank_run.result()
    assert a["check"] is True, log
    ref = a["single_device"]
    for step, loss in a["losses"].items():
        assert loss == pytest.approx(ref["losses"][step], rel=1e-4), (step, log)
        assert a["grad_norms"][step] == pytest.approx(ref["norms"][step], rel=1e-3), (step, log)
