"""The LM round-trip features (evaluation/likelihood.py) against every blind-labeled sheet.

    python benchmarks/reader/lm_detect.py --sheets 1 2 3 4 --out runs/reader/lm_features.jsonl

For each labeled item (both readers' labels, stored in labels/sheetN_*): the word-level verdict and the LM
round-trip features. Prints, per feature, the ROC AUC against the readers' consensus (acceptable only when both
accept) and against each field a reader labels (meaning kept, nothing added, nothing dropped, fluent), so a
feature is kept for what it measures, not for a threshold tuned on 20 positives; then the precision/recall of
rule combinations, with the sheets as folds (a rule's thresholds chosen on three sheets, scored on the fourth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sheet import acceptable, dev_rows, read_key, read_labels  # noqa: E402

LABELS = HERE / "labels"


def auc(scores: list[float], truth: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney)."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def load_items(sheets: list[int]) -> list[dict]:
    src = {r["id"]: r["source"] for r in dev_rows()}
    items = []
    for n in sheets:
        key = read_key(str(LABELS / f"sheet{n}_key.json"))
        readers = [read_labels(str(LABELS / f"sheet{n}_r{k}.jsonl")) for k in (1, 2)]
        for i, v in key.items():
            if not all(i in r for r in readers):
                continue
            labs = [r[i] for r in readers]
            items.append({
                "sheet": n, "item": i, "system": v["system"], "row": v["row"], "source": src[v["row"]],
                "output": v["output"], "acceptable": all(acceptable(x) for x in labs),
                "meaning_kept": all(x["meaning"] != "changed" for x in labs),
                "not_added": not any(x["added"] for x in labs), "not_dropped": not any(x["dropped"] for x in labs),
                "fluent": all(x["fluent"] for x in labs), "reworded": all(x["reworded"] for x in labs),
            })
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sheets", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="runs/reader/lm_features.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    items = load_items(args.sheets)
    if out.is_file():  # features are deterministic: computed once per (model, item)
        cached = {(r["sheet"], r["item"]): r for r in map(json.loads, out.read_text().splitlines())}
    else:
        cached = {}
    todo = [it for it in items if (it["sheet"], it["item"]) not in cached]
    if todo:
        from dataclasses import asdict

        from paraphrase_ray.evaluation.embedder import load_embedder
        from paraphrase_ray.evaluation.likelihood import round_trips
        from paraphrase_ray.evaluation.metrics import score_rows
        from paraphrase_ray.models import load_model

        loaded = load_model(args.model)
        rt = round_trips(loaded, [it["source"] for it in todo], [it["output"] for it in todo])
        sc = score_rows([it["source"] for it in todo], None, [it["output"] for it in todo], load_embedder())
        for it, r, s in zip(todo, rt, sc):
            cached[(it["sheet"], it["item"])] = {
                **it, **asdict(r), "self_bleu": s.self_bleu, "faithful": s.faithful, "word_recall": s.content_recall,
                "word_precision": s.content_precision, "garbled": bool(s.garbled), "detector": s.acceptable,
                "copy": s.copy, "adequacy": s.adequacy,
            }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(v) + "\n" for v in cached.values()))
        tmp.replace(out)
    rows = [cached[(it["sheet"], it["item"])] for it in items]
    feats = ["fwd", "bwd", "pmi_out", "pmi_src", "pmi_out_min", "pmi_src_min", "word_recall", "word_precision",
             "adequacy"]
    targets = ["acceptable", "meaning_kept", "not_added", "not_dropped", "fluent"]
    print(f"{len(rows)} items, {sum(r['acceptable'] for r in rows)} acceptable to both readers")
    print("AUC".ljust(16) + "".join(t.rjust(14) for t in targets))
    for f in feats:
        print(f.ljust(16) + "".join(f"{auc([r[f] for r in rows], [r[t] for r in rows]):14.3f}" for t in targets))
    # rules: hard gates (faithful, no garble, not a copy, self-BLEU < 60) + thresholds on two features, chosen on
    # the other sheets (leave-one-sheet-out): report the pooled held-out precision / recall
    gate = [r["faithful"] and not r["garbled"] and not r["copy"] and r["self_bleu"] < 60 for r in rows]
    pairs = [("pmi_src_min", "pmi_out_min"), ("bwd", "fwd"), ("pmi_src", "pmi_out"), ("pmi_src_min", "fwd")]
    for fa, fb in pairs:
        qa = sorted({round(r[fa], 1) for r in rows})
        qb = sorted({round(r[fb], 1) for r in rows})
        grid = list(itertools.product(qa[:: max(1, len(qa) // 30)], qb[:: max(1, len(qb) // 30)]))
        tp = fp = fn = 0
        for held in args.sheets:
            train = [i for i, r in enumerate(rows) if r["sheet"] != held]
            test = [i for i, r in enumerate(rows) if r["sheet"] == held]

            def f1(ta, tb, idx, fa=fa, fb=fb):
                pred = [gate[i] and rows[i][fa] >= ta and rows[i][fb] >= tb for i in idx]
                t = sum(p and rows[i]["acceptable"] for p, i in zip(pred, idx))
                prec = t / max(1, sum(pred))
                rec = t / max(1, sum(rows[i]["acceptable"] for i in idx))
                return 2 * prec * rec / max(1e-9, prec + rec)

            ta, tb = max(grid, key=lambda g: f1(*g, train))
            for i in test:
                pred = gate[i] and rows[i][fa] >= ta and rows[i][fb] >= tb
                tp += pred and rows[i]["acceptable"]
                fp += pred and not rows[i]["acceptable"]
                fn += (not pred) and rows[i]["acceptable"]
        print(f"rule {fa} & {fb} (held-out sheets): accepts {tp + fp}, precision {tp / max(1, tp + fp):.2f}, "
              f"recall {tp / max(1, tp + fn):.2f}")
    d = [r["detector"] for r in rows]
    tp = sum(a and r["acceptable"] for a, r in zip(d, rows))
    print(f"shipped detector: accepts {sum(d)}, precision {tp / max(1, sum(d)):.2f}, "
          f"recall {tp / max(1, sum(r['acceptable'] for r in rows)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
