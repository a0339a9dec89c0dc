"""Print what the "moe" backend does with each block of the routing corpus.

    python3 examples/corpus_report.py [--workers 2] [names ...]

The corpus (``tests/fx_passes/_corpus.py``) re-writes the routing of public MoE implementations
(Mixtral's reference, DeepSeek-V3, OLMoE, JetMoE, DBRX, Jamba, Qwen2-MoE, Arctic, Grok-1,
MegaBlocks, torchtitan, nanoMoE, GShard, Switch, fairseq, DeepSpeed, Tutel, hand-written expert
parallelism, ...) as small blocks. Each is compiled with ``fx_passes.moe_backend(inner=
"aot_eager")`` at W = 1 (``fullgraph=True`` where Dynamo can capture it, else
``fx_passes.compile_moe``), checked against eager (output and gradients), and reported as
rewritten, rejected (with the backend's reason), unnoticed (left alone without a word) or crashed
(an exception escaped compile). ``tests/fx_passes/test_corpus.py`` pins the same outcomes.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from tests.fx_passes import _corpus as C  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="corpus entries (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="processes compiling at once")
    parser.add_argument("--width", type=int, default=70, help="wrap reasons at this width")
    args = parser.parse_args()
    names = args.names or list(C.CORPUS)
    unknown = sorted(set(names) - set(C.CORPUS))
    if unknown:
        parser.error(f"unknown corpus entries {unknown}; known: {sorted(C.CORPUS)}")

    start = time.monotonic()
    with C.w1_pool(max(args.workers, 1)) as pool:
        results = {name: pool.submit(C.run_w1_safe, name) for name in names}
        rows, failed = [], 0
        for name in names:
            entry = C.CORPUS[name]
            ok, got = results[name].result()
            if ok:
                outcome = got.outcome
                if got.families:
                    outcome += f" ({', '.join(got.families)})"
                reason = got.reason
                if got.reason_from == "moe_rejected":
                    reason += " [debug log only]"
            else:
                failed += 1
                outcome = "FAILED"
                reason = got.strip().splitlines()[-1]
            rows.append(
                [
                    name + (" [EP]" if entry.ep else ""),
                    "\n".join(textwrap.wrap(entry.source, 34)),
                    entry.family,
                    outcome,
                    "\n".join(textwrap.wrap(reason, args.width)) or "-",
                ]
            )
    headers = ["model", "source", "family guess", "outcome", "reason"]
    print(tabulate(rows, headers=headers, tablefmt="simple_grid"))
    counts: dict[str, int] = {}
    for row in rows:
        key = row[3].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"{len(rows)} blocks: {summary} ({time.monotonic() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
