"""Paired comparison of two ``benchmarks/quality.py --report`` runs on the same rows (issue 26: the same recipe
trained in bf16 and in fp32). Rows are paired by source and reference; prints, per key, both rates, the rows only
one run got right and the exact two-sided sign test, and the mean paired difference of the objective.

    python benchmarks/quality.py --train-precision fp32 --no-zero-shot --eval-rows 100 \\
        --prompt-dir runs/quality/fp32 --report runs/quality/fp32.json
    python benchmarks/quality.py --train-precision bf16 --no-zero-shot --eval-rows 100 \\
        --prompt-dir runs/quality/bf16 --report runs/quality/bf16.json
    python benchmarks/precision_pair.py runs/quality/fp32.json runs/quality/bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import paired_sign_test  # noqa: E402

KEYS = ("faithful_success", "success", "acceptable")


def merged(a: dict, b: dict, system: str) -> dict:
    """One report whose rows hold ``system``'s scores of run a as "a" and of run b as "b"."""
    key = lambda r: (r["source"], r["reference"])  # noqa: E731
    theirs = {key(r): r for r in b["rows"]}
    rows = [{"scores": {"a": r["scores"][system], "b": theirs[key(r)]["scores"][system]}}
            for r in a["rows"] if key(r) in theirs]
    if len(rows) != len(a["rows"]) or len(rows) != len(b["rows"]):
        raise SystemExit(f"the reports score different rows ({len(a['rows'])} vs {len(b['rows'])}, {len(rows)} shared)")
    return {"rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="report of run a (e.g. fp32)")
    ap.add_argument("b", help="report of run b (e.g. bf16)")
    ap.add_argument("--system", default="tuned")
    args = ap.parse_args()
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    rep = merged(a, b, args.system)
    for run, r in (("a", a), ("b", b)):
        print(json.dumps({"run": run, "path": getattr(args, run), "train_precision": r["budget"].get("train_precision"),
                          "best_val_loss": r["budget"].get("best_val_loss")}))
    for k in KEYS:
        if all(k in row["scores"]["a"] for row in rep["rows"]):
            print(paired_sign_test(rep, "a", "b", k))
    diffs = [row["scores"]["b"]["objective"] - row["scores"]["a"]["objective"] for row in rep["rows"]]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"objective: mean b - a = {statistics.mean(diffs):+.4f} (sd {sd:.4f}, se {sd / len(diffs) ** 0.5:.4f}, "
          f"n = {len(diffs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
