"""Would prompt-lookup drafting pay on paraphrases? The exact acceptance rate, from greedy outputs alone.

Prompt-lookup decoding drafts the next k tokens by finding the last n generated tokens in the source (here:
the source text's tokens) and proposing what followed them there; one forward pass verifies the draft and keeps
the longest prefix that greedy decoding would have produced, plus the one token greedy produces after it. The
kept prefix is exactly the agreement between the draft and the greedy continuation, so replaying drafting over
the greedy outputs of a quality report gives the acceptance an implementation would see (up to float ties),
without building it first.

    python benchmarks/lookup_acceptance.py runs/quality/k1.json --system tuned

Prints, per (n, k): drafts attempted, tokens accepted per draft, forward passes per generated token (1.0 = no
gain; a verify pass of k+1 tokens costs about one decode step on a memory-bound CPU, so 1 / that ratio is the
best case speed-up).
"""

from __future__ import annotations

import argparse
import json
import sys


def draft(generated: list[int], source: list[int], n: int, k: int) -> list[int]:
    """The k tokens that followed the latest occurrence in ``source`` of the last ``n`` generated tokens."""
    if len(generated) < n:
        return []
    tail = generated[-n:]
    for j in range(len(source) - n, -1, -1):
        if source[j : j + n] == tail:
            return source[j + n : j + n + k]
    return []


def replay(outputs: list[list[int]], sources: list[list[int]], n: int, k: int) -> dict[str, float]:
    """Forward passes drafting would take to produce each output, vs one pass per token."""
    passes = tokens = drafts = accepted = 0
    for out, src in zip(outputs, sources, strict=True):
        i = 0
        while i < len(out):
            d = draft(out[:i], src, n, k)
            m = 0
            while m < len(d) and i + m < len(out) and d[m] == out[i + m]:
                m += 1
            drafts += bool(d)
            accepted += m
            i += m + 1  # the accepted prefix, then greedy's own token from the same pass
            passes += 1
        tokens += len(out)
    return {
        "n": n, "k": k, "tokens": tokens, "drafts": drafts,
        "accepted_per_draft": round(accepted / max(1, drafts), 3),
        "passes_per_token": round(passes / max(1, tokens), 3),
        "best_case_speedup": round(tokens / max(1, passes), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a quality / evaluate report JSON with rows[].source and rows[].predictions")
    ap.add_argument("--system", default="tuned", help="whose predictions to replay")
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer of the base model")
    args = ap.parse_args(argv)
    from paraphrase_ray.models import load_model

    tok = load_model(args.model, "fp32", "cpu").tokenizer
    rows = json.loads(open(args.report).read())["rows"]
    sources = [tok(r["source"], add_special_tokens=False)["input_ids"] for r in rows]
    outputs = [tok(r["predictions"][args.system], add_special_tokens=False)["input_ids"] for r in rows]
    for n in (1, 2, 3):
        for k in (2, 4, 8):
            print(json.dumps({"system": args.system, "rows": len(rows), **replay(outputs, sources, n, k)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
