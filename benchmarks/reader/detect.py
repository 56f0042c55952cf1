"""The detector (evaluation/verdict.py, through metrics.score_rows) against blind readers' labels.

    python benchmarks/reader/detect.py --key runs/reader/sheet1/key.json --labels L1.jsonl --labels L2.jsonl

For every sheet item: the detector's ``acceptable`` and the readers' (``--consensus``: acceptable only when both
readers accept; otherwise the first reader). Prints precision (of the rows the detector accepts, the share the
reader accepts), recall (of the rows the reader accepts, the share the detector accepts), per-flag agreement, and
the same for the old metrics (success, faithful success) so the gain is visible; ``--sweep`` also lists the
precision/recall of other thresholds (what the defaults in verdict.py were chosen from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sheet import acceptable, dev_rows, read_key, read_labels  # noqa: E402


def pr(pred: list[bool], truth: list[bool]) -> dict:
    tp = sum(p and t for p, t in zip(pred, truth))
    return {"accepts": sum(pred), "precision": round(tp / max(1, sum(pred)), 3),
            "recall": round(tp / max(1, sum(truth)), 3), "agreement": round(sum(p == t for p, t in zip(pred, truth)) / len(pred), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", required=True)
    p.add_argument("--labels", action="append", required=True)
    p.add_argument("--consensus", action="store_true")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args(argv)
    from paraphrase_ray.evaluation import verdict
    from paraphrase_ray.evaluation.embedder import load_embedder
    from paraphrase_ray.evaluation.metrics import score_rows

    key = read_key(args.key)
    readers = [read_labels(x) for x in args.labels]
    src = {r["id"]: r["source"] for r in dev_rows()}
    items = [i for i in key if all(i in r for r in readers)]
    truth = [all(acceptable(r[i]) for r in readers) if args.consensus else acceptable(readers[0][i]) for i in items]
    emb = load_embedder()
    scores = score_rows([src[key[i]["row"]] for i in items], None, [key[i]["output"] for i in items], emb)
    out = {"items": len(items), "reader_accepts": sum(truth),
           "detector": pr([s.acceptable for s in scores], truth),
           "success": pr([s.success for s in scores], truth),
           "faithful_success": pr([s.faithful_success for s in scores], truth)}
    first = readers[0]
    out["flags"] = {
        "added": pr([bool(s.added_words) for s in scores], [first[i]["added"] for i in items]),
        "dropped": pr([bool(s.dropped_words or s.dropped) for s in scores], [first[i]["dropped"] for i in items]),
        "garbled_vs_not_fluent": pr([bool(s.garbled) for s in scores], [not first[i]["fluent"] for i in items]),
    }
    print(json.dumps(out, indent=1))
    if args.sweep:
        vs = verdict.verdicts([src[key[i]["row"]] for i in items], [key[i]["output"] for i in items], emb)
        for rmin in (0.6, 0.7, 0.8, 0.9):
            for pmin in (0.6, 0.7, 0.8, 0.9):
                for sb in (60.0, 75.0, 90.0):
                    pred = [(not (s.copy or s.empty)) and s.faithful and not v.garbled and v.recall >= rmin
                            and v.precision >= pmin and s.self_bleu < sb for s, v in zip(scores, vs)]
                    print(json.dumps({"min_recall": rmin, "min_precision": pmin, "max_self_bleu": sb, **pr(pred, truth)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
