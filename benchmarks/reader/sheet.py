"""Blind reading of paraphrases: dev rows, anonymous sheets, and per-system scores from readers' labels.

The reader's measure (rubric.md): each item is one (source, output) pair, labeled without knowing which system
wrote it. ``acceptable`` = meaning same or minor, nothing that matters added, nothing that matters dropped,
fluent, and reworded. Steps::

    python benchmarks/reader/sheet.py rows --out runs/reader/dev.jsonl          # MRPC dev rows + our own sentences
    python benchmarks/quality.py ... --data-file runs/reader/dev.jsonl --report runs/reader/X.json   # outputs
    python benchmarks/reader/sheet.py sheet --report A=runs/reader/a.json:tuned --report B=...:zero-shot-chat \\
        --human H --out runs/reader/sheet                                        # sheet.jsonl + key.json
    python benchmarks/reader/sheet.py score --key runs/reader/sheet/key.json --labels L1.jsonl [--labels L2.jsonl]

MRPC text is read from ../shared at run time and never written into the repository: the labeled set
(labels/*.jsonl) names MRPC rows by their id; our own sentences (own_sentences.jsonl) are ours.
The dev rows are the MRPC validation pairs that benchmarks/quality.py neither scores nor uses for model selection
(validation pairs 164 onwards, with the default split), so labeling them never touches the held-out test rows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MRPC = ROOT.parent / "shared" / "data" / "mrpc" / "train.jsonl"
DEV_START, DEV_ROWS = 164, 50  # quality.py: rows 0-99 scored, 100-163 validation loss
FIELDS = ("meaning", "added", "dropped", "fluent", "reworded")
MEANING = ("same", "minor", "changed")


def dev_rows() -> list[dict]:
    """MRPC dev rows (with their MRPC ids) then our own sentences; a reference only for MRPC rows."""
    sys.path.insert(0, str(ROOT))
    from paraphrase_ray.config import DataConfig
    from paraphrase_ray.data import load_pairs

    _, val, _ = load_pairs(DataConfig(sources=(str(MRPC),), val_fraction=0.1, seed=0))
    by_text = {}
    for line in MRPC.read_text().splitlines():
        r = json.loads(line)
        by_text[(r["source"].strip(), r["target"].strip())] = r["id"]
    rows = []
    for p in val[DEV_START : DEV_START + DEV_ROWS]:
        rows.append({"id": f"mrpc-{by_text.get((p.source, p.target), 'x')}", "source": p.source, "target": p.target})
    rows += [json.loads(ln) for ln in (HERE / "own_sentences.jsonl").read_text().splitlines() if ln.strip()]
    return rows


def acceptable(label: dict) -> bool:
    return (label["meaning"] in ("same", "minor") and not label["added"] and not label["dropped"]
            and label["fluent"] and label["reworded"])


def _outputs(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME=report.json:system' -> (NAME, {source: output}) from a benchmarks/quality.py --report file."""
    name, _, rest = spec.partition("=")
    path, _, system = rest.rpartition(":")
    rep = json.loads(Path(path).read_text())
    return name, {r["source"]: r["predictions"][system] for r in rep["rows"]}


def cmd_rows(args) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = dev_rows()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} dev rows to {out}", file=sys.stderr)
    return 0


def cmd_sheet(args) -> int:
    rows = dev_rows()
    systems = dict(_outputs(s) for s in args.report)
    items = []
    for r in rows:
        for name, outs in systems.items():
            if r["source"] in outs:
                items.append((r["id"], name, r["source"], outs[r["source"]]))
        if args.human and "target" in r:
            items.append((r["id"], args.human, r["source"], r["target"]))
    # one item per distinct (row, output): systems that wrote the same text share its labels ("also" in the key), so
    # the reader reads it once and no repeated text hints that two systems agree
    merged: dict[tuple[str, str], list] = {}
    for rid, name, src, o in items:
        merged.setdefault((rid, o), [rid, [], src, o])[1].append(name)
    items = list(merged.values())
    random.Random(args.seed).shuffle(items)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet = [{"item": f"i{n:03d}", "source": s, "output": o} for n, (_, _, s, o) in enumerate(items)]
    key = {f"i{n:03d}": {"row": rid, "system": names[0], **({"also": names[1:]} if names[1:] else {}), "output": o}
           for n, (rid, names, _, o) in enumerate(items)}
    (out / "sheet.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in sheet))
    (out / "key.json").write_text(json.dumps(key, indent=1, ensure_ascii=False))
    print(f"{len(items)} items from {len(systems) + bool(args.human)} systems -> {out}/sheet.jsonl", file=sys.stderr)
    return 0


def read_labels(path: str) -> dict[str, dict]:
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        lab = json.loads(line)
        missing = [f for f in ("item", *FIELDS) if f not in lab]
        if missing or lab["meaning"] not in MEANING:
            raise SystemExit(f"error: {path}:{n}: needs item, {', '.join(FIELDS)} (meaning in {MEANING}); got {lab}")
        out[lab["item"]] = lab
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def read_key(path: str) -> dict[str, dict]:
    """item -> {"row", "system", "output"}; a stored key (labels/*_key.json) names MRPC outputs by row only, and the
    output is the row's MRPC target, read from ../shared here."""
    data = json.loads(Path(path).read_text())
    items = data.get("items", data)
    if any("output" not in v for v in items.values()):
        targets = {r["id"]: r.get("target") for r in dev_rows()}
        items = {i: {**v, "output": v.get("output", targets.get(v["row"]))} for i, v in items.items()}
    return items


def systems_of(entry: dict) -> list[str]:
    """The systems that wrote a key entry's output (one item may stand for several: ``cmd_sheet``)."""
    return [entry["system"], *entry.get("also", ())]


def cmd_score(args) -> int:
    key = read_key(args.key)
    readers = [read_labels(p) for p in args.labels]
    verdict = {}  # item -> acceptable (first reader, or the consensus "both accept" with two)
    for item in key:
        votes = [acceptable(r[item]) for r in readers if item in r]
        if votes:
            verdict[item] = all(votes) if args.consensus else votes[0]
    if len(readers) >= 2:
        both = [i for i in key if i in readers[0] and i in readers[1]]
        agree = sum(acceptable(readers[0][i]) == acceptable(readers[1][i]) for i in both)
        fields = {f: sum(readers[0][i][f] == readers[1][i][f] for i in both) for f in FIELDS}
        po = agree / len(both) if both else float("nan")
        p1 = sum(acceptable(readers[0][i]) for i in both) / max(1, len(both))
        p2 = sum(acceptable(readers[1][i]) for i in both) / max(1, len(both))
        pe = p1 * p2 + (1 - p1) * (1 - p2)
        kappa = (po - pe) / (1 - pe) if pe < 1 else float("nan")
        print(json.dumps({"agreement": {"items": len(both), "acceptable_agree": agree, "kappa": round(kappa, 3),
                                        **{f"{f}_agree": v for f, v in fields.items()}}}))
    per = defaultdict(dict)  # system -> row -> acceptable
    for item, ok in verdict.items():
        for name in systems_of(key[item]):
            per[name][key[item]["row"]] = ok
    first = readers[0]
    for name, rows in sorted(per.items()):
        items = [i for i in verdict if name in systems_of(key[i])]

        def rate(f: str, items: list[str] = items) -> float:
            return sum(bool(first[i][f]) for i in items if i in first) / max(1, len(items))

        print(json.dumps({"system": name, "n": len(rows), "acceptable": round(sum(rows.values()) / len(rows), 3),
                          "meaning_kept": round(sum(first[i]["meaning"] != "changed" for i in items) / len(items), 3),
                          "fluent": round(rate("fluent"), 3), "reworded": round(rate("reworded"), 3),
                          "adds": round(rate("added"), 3), "drops": round(rate("dropped"), 3)}))
    names = sorted(per)
    for a in names:
        for b in names:
            if a < b:
                common = set(per[a]) & set(per[b])
                wins = sum(per[a][r] and not per[b][r] for r in common)
                losses = sum(per[b][r] and not per[a][r] for r in common)
                print(json.dumps({"pair": [a, b], "rows": len(common), "a_only": wins, "b_only": losses,
                                  "sign_test_p": round(sign_test(wins, losses), 4)}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows", help="write the dev rows (MRPC dev split + our own sentences)")
    r.add_argument("--out", required=True)
    s = sub.add_parser("sheet", help="shuffle systems' outputs into an anonymous sheet and a private key")
    s.add_argument("--report", action="append", required=True, metavar="NAME=REPORT.json:SYSTEM")
    s.add_argument("--human", metavar="NAME", help="also the MRPC reference as a system of this name")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    c = sub.add_parser("score", help="per-system reader scores, paired sign tests and reader agreement")
    c.add_argument("--key", required=True)
    c.add_argument("--labels", action="append", required=True)
    c.add_argument("--consensus", action="store_true", help="acceptable only when every reader accepts")
    args = p.parse_args(argv)
    return {"rows": cmd_rows, "sheet": cmd_sheet, "score": cmd_score}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
