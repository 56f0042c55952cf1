"""A detector of the careful reader's verdict: what an output added, what it dropped, which words it broke.

Sentence cosine barely moves when a clause is added or dropped ("..., she said" gone; "and officials tried to hide
it" added), and the fact check (``text.check``) sees only names and numbers. The reader rejects both. So each row
is also compared word by word, as BERTScore compares tokens, but on content words and with idf-like weights:

- Words are letter/digit runs, lower-cased; a *content* word is one that is not a function word. Function words
  are the most frequent words of English in ``wordfreq`` (Zipf frequency >= ``FUNCTION_ZIPF``: "the", "of",
  "would", "will"...), except negations, which always matter ("not", "never", ...).
- A source content word is *kept* when the output has a counterpart: the same word, the same stem (plural, tense,
  "-ly"), or a word whose embedding (the sentence embedder on the word alone) has cosine >= ``SYNONYM_COS``
  ("bought" ~ "purchased"). ``dropped`` lists the source content words without one; ``added`` the output
  content words without a counterpart in the source.
- ``garbled`` lists output words that are not words: absent from ``wordfreq``'s English list and from the source
  (a name the source spells is fine however rare; "premiumes", "prideful" of a broken n-gram ban are not). Words
  with a capital or a digit are left to the fact check.
- Weights: rarer words matter more: ``8 - zipf`` (a name ~7, "officials" ~3.3, "said" 2). ``recall`` is the
  weighted share of source content kept, ``precision`` the weighted share of output content with a counterpart.

``acceptable`` (the estimate of the reader's verdict): not empty, not a copy, faithful (``text.check``), no
garbled word, recall >= ``MIN_RECALL``, precision >= ``MIN_PRECISION``, and reworded (self-BLEU <
``MAX_SELF_BLEU``). Measured against two blind readers (benchmarks/reader/, docs/BENCHMARKS.md "Quality"): the
``added`` / ``dropped`` flags catch what readers flag (recall 0.97 / 0.98, precision 0.68 / 0.72), but
``acceptable`` does not yet pick the rows readers accept: meaning changes that keep the content words ("fixes" ->
"could potentially fix", the speaker swapped) pass it, and true synonyms a single-word embedding misses ("rest" ->
"remainder") fail it. Treat it as a filter that flags, not as a reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paraphrase_ray.evaluation.embedder import EmbeddingCache, encode_unique
from paraphrase_ray.text import WORD, is_content, stem, weight, words, zipf

SYNONYM_COS = 0.68  # MiniLM on single words: bought~purchased 0.91, company~firm 0.70, aunt~cousin 0.66, higher~lower 0.79 (!)
# Strict on purpose: on 200 blind-read items (docs/BENCHMARKS.md, "Quality") looser settings accepted 15-55 rows
# the readers rejected; at 0.95 it accepts 5 (2.5%, the readers' own rate), still not the readers' rows.
MIN_RECALL = 0.95
MIN_PRECISION = 0.95
MAX_SELF_BLEU = 60.0
_ANTONYMS = frozenset(  # pairs the embedder puts close together but a reader reads as opposite
    frozenset(p) for p in (("higher", "lower"), ("high", "low"), ("rise", "fall"), ("rose", "fell"),
                           ("increase", "decrease"), ("up", "down"), ("more", "less"), ("before", "after"),
                           ("buy", "sell"), ("bought", "sold"), ("win", "lose"), ("won", "lost"),
                           ("early", "late"), ("earlier", "later"), ("above", "below"), ("gain", "loss"))
)


@dataclass(frozen=True)
class Verdict:
    """The word-level comparison of one (source, output) row."""

    added: tuple[str, ...]  # output content words with no counterpart in the source
    dropped: tuple[str, ...]  # source content words with no counterpart in the output
    garbled: tuple[str, ...]  # output words that are not English words and not in the source
    recall: float  # weighted share of the source's content kept, [0, 1]
    precision: float  # weighted share of the output's content that has a counterpart, [0, 1]


def _counterparts(mine: Sequence[str], theirs: Sequence[str], emb: dict[str, np.ndarray]) -> list[bool]:
    """For each word of ``mine``: does ``theirs`` hold the same word, its stem, or a near synonym?"""
    exact, stems = set(theirs), {stem(w) for w in theirs}
    out = []
    for w in mine:
        ok = w in exact or stem(w) in stems
        if not ok and w in emb:
            ok = any(
                w2 in emb and float(emb[w] @ emb[w2]) >= SYNONYM_COS and frozenset((w, w2)) not in _ANTONYMS
                for w2 in theirs
            )
        out.append(ok)
    return out


def _weighted(ws: Sequence[str], kept: Sequence[bool]) -> float:
    total = sum(weight(w) for w in ws)
    return sum(weight(w) for w, k in zip(ws, kept) if k) / total if total else 1.0


def verdicts(
    sources: Sequence[str], outputs: Sequence[str], embedder, cache: EmbeddingCache | None = None
) -> list[Verdict]:
    """One ``Verdict`` per (source, output) row; every distinct content word is embedded once."""
    src_w = [[w for w in words(s) if is_content(w)] for s in sources]
    out_w = [[w for w in words(o) if is_content(w)] for o in outputs]
    vocab = sorted({w for ws in (*src_w, *out_w) for w in ws if w.isalpha()})
    emb = encode_unique(embedder, vocab, 256, cache) if vocab and embedder is not None else {}
    rows = []
    for s, o, sw, ow in zip(sources, outputs, src_w, out_w, strict=True):
        kept = _counterparts(sw, ow, emb)
        backed = _counterparts(ow, sw, emb)
        source_words = set(words(s))
        garbled = tuple(
            w for w in WORD.findall(o)
            if w.isalpha() and w.islower() and len(w) > 2 and w not in source_words and zipf(w.lower()) == 0.0
        )
        rows.append(Verdict(
            added=tuple(dict.fromkeys(w for w, b in zip(ow, backed) if not b)),
            dropped=tuple(dict.fromkeys(w for w, k in zip(sw, kept) if not k)),
            garbled=tuple(dict.fromkeys(garbled)),
            recall=_weighted(sw, kept),
            precision=_weighted(ow, backed),
        ))
    return rows


def acceptable(v: Verdict, self_bleu: float, usable: bool, faithful: bool) -> bool:
    """The estimate of a careful reader's verdict (module doc)."""
    return (usable and faithful and not v.garbled and v.recall >= MIN_RECALL and v.precision >= MIN_PRECISION
            and self_bleu < MAX_SELF_BLEU)
