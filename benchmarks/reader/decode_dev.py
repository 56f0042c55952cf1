"""Decode the reader's dev rows with one prompt and any decoding overrides, into a report ``sheet.py`` reads.

``benchmarks/quality.py --data-file`` scores whole systems with its own decoding flags; this runs one system with
any ``GenerationConfig`` field set (``--set word_guard=true``), through the product's path (``api.paraphrase_scored``:
generation, then the rerank of ``metrics.rerank`` when K > 1), and records the detector's flags per row::

    python benchmarks/reader/decode_dev.py --prompt-dir runs/quality/prompt --system W -k 8 \\
        --set word_guard=true --out runs/reader/w.json
    python benchmarks/reader/sheet.py sheet --report W=runs/reader/w.json:W ...

The rows file is ``sheet.py rows``'s output (MRPC text is read from ../shared at run time, never stored here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-dir", required=True)
    p.add_argument("--rows", default="runs/reader/dev.jsonl", help="sheet.py rows output")
    p.add_argument("--system", required=True, help="the name the report gives these outputs")
    p.add_argument("-k", "--num-candidates", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="GenerationConfig override")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from paraphrase_ray.api import Paraphraser, decoding_for, paraphrase_scored

    rows = [json.loads(x) for x in Path(args.rows).read_text().splitlines() if x.strip()]
    rows = rows[: args.limit] if args.limit else rows
    para = Paraphraser.from_pretrained(args.prompt_dir)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    gen = decoding_for(para.meta, args.num_candidates, **{k: _value(v) for k, v in overrides.items()})
    t0 = time.perf_counter()
    cands, scores = paraphrase_scored(para.loaded, para.bundle, [r["source"] for r in rows], gen, 8,
                                      para.embedder_name, progress=True)
    seconds = time.perf_counter() - t0
    out = {"system": args.system, "decoding": overrides, "num_candidates": args.num_candidates,
           "seconds_per_row": round(seconds / len(rows), 2), "rows": []}
    for r, c, s in zip(rows, cands, scores, strict=True):
        best = s[0]
        out["rows"].append({"id": r["id"], "source": r["source"], "predictions": {args.system: c[0]},
                            "flags": {"added": list(best.added_words), "dropped": list(best.dropped_words),
                                      "garbled": list(best.garbled), "acceptable": best.acceptable}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    acc = sum(x["flags"]["acceptable"] for x in out["rows"])
    print(f"{len(rows)} rows, {seconds / len(rows):.2f} s/row, detector accepts {acc} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
