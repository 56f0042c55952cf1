"""Paraphrase quality metrics and the sweep objective. No Ray here: this runs in-process anywhere.

Per (source, reference, prediction) row:

- ``adequacy``: cosine similarity of the sentence-transformers embeddings of prediction and source, in [-1, 1].
- ``ref_similarity``: the same against the human reference (``None`` without one).
- ``self_bleu``: sentence BLEU (0..100) of the prediction against the source: how much wording was copied.
- ``ref_bleu``: sentence BLEU of the prediction against the reference (``None`` without one).
- ``ibleu``: ``0.8 * ref_bleu - 0.2 * self_bleu`` (Sun & Zhou 2012), in [-20, 80] (``None`` without a reference).
- ``copy``: the prediction equals the source up to case, whitespace and final punctuation.
- ``empty``: the prediction holds no letter or digit ("", whitespace, a lone ".").
- ``faithful``: no name or number in the prediction that the source lacks, and no source number dropped
  (``text.check``; ``invented`` / ``dropped`` list what broke it).
- ``objective``: BERT-iBLEU (Niu et al. 2021), the weighted harmonic mean of adequacy (clipped to [0, 1]) and
  novelty ``1 - self_bleu / 100``, beta 4; 0 for copies and empty outputs; multiplied by ``UNFAITHFUL_WEIGHT``
  (0.5) when the row is not faithful. Always in [0, 1].
- ``success``: adequacy >= 0.75, self-BLEU < 60, not empty and not a copy; ``faithful_success``: success and
  faithful -- the rate a user who augments data with these paraphrases cares about.

Why faithfulness is a factor and not a term: an embedding hardly moves when "Thursday" becomes "Wednesday" or
"El Paso" becomes "El Pines", so without it the sweep, rerank and leaderboard all reward a wrong paraphrase.
Halving is a clear penalty that keeps the ranking among unfaithful rows (a near-miss still beats garbage) while
any faithful paraphrase with objective > x/2 outranks an unfaithful one scoring x.

Why this objective and not similarity alone: the cheapest way for a small LM to maximise embedding similarity
to the source is to copy it (cosine 1.0), and copying is exactly what an untuned or badly tuned soft prompt
does. A sweep that maximises adequacy would crown the copier. Novelty alone is maximised by any unrelated
sentence. A harmonic mean is high only when *both* terms are high (it is dominated by the smaller one), so a
copy (novelty 0) and an unrelated sentence (adequacy ~0.1) both score near 0 while a real paraphrase
(adequacy ~0.85, self-BLEU ~20) scores ~0.8. Beta 4 weights adequacy more: changing words is easy, keeping
meaning is not. It needs no reference, so the same number ranks Serve's candidates at request time.
Copies and empty outputs are forced to 0: a copy that changes only case or punctuation has a lower (case-
sensitive) BLEU without being a paraphrase, and an empty output keeps no meaning (its adequacy is 0).

BLEU is sacrebleu's sentence BLEU (13a tokenisation, case-sensitive, ``exp`` smoothing, effective order), the
standard implementation, so numbers compare with published self-BLEU / iBLEU; it is exact and deterministic.
Embeddings are computed once per distinct string per call (sources repeat when Serve reranks candidates).
Scores of a row do not depend on the other rows except for float rounding of padded batches (< 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from paraphrase_ray.errors import InputError
from paraphrase_ray.evaluation.embedder import EmbeddingCache, encode_unique
from paraphrase_ray.evaluation.verdict import acceptable, verdicts
from paraphrase_ray.text import check as check_facts
from paraphrase_ray.text import is_copy, is_empty, sentence_bleu

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

IBLEU_ALPHA = 0.8
BETA = 4.0
SUCCESS_ADEQUACY = 0.75
SUCCESS_MAX_SELF_BLEU = 60.0
UNFAITHFUL_WEIGHT = 0.5
SUMMARY_KEYS = (
    "n",
    "adequacy",
    "ref_similarity",
    "self_bleu",
    "ref_bleu",
    "ibleu",
    "copy_rate",
    "empty_rate",
    "objective",
    "success_rate",
    "faithful_rate",
    "faithful_success_rate",
    "acceptable_rate",
    "garbled_rate",
)

@dataclass(frozen=True)
class RowScore:
    """Scores of one prediction. Reference fields are ``None`` when the row has no reference."""

    adequacy: float  # cosine(pred, source), [-1, 1]; 0.0 for an empty prediction
    ref_similarity: float | None  # cosine(pred, reference), [-1, 1]
    self_bleu: float  # BLEU(pred, source), [0, 100]
    ref_bleu: float | None  # BLEU(pred, reference), [0, 100]
    ibleu: float | None  # alpha * ref_bleu - (1 - alpha) * self_bleu, [-20, 80]
    copy: bool
    empty: bool
    objective: float  # BERT-iBLEU x (1, or UNFAITHFUL_WEIGHT when not faithful), [0, 1]
    success: bool
    faithful: bool = True
    invented: tuple[str, ...] = ()  # names / numbers in the prediction that the source lacks
    dropped: tuple[str, ...] = ()  # source numbers missing from the prediction
    # the reader's verdict, estimated word by word (verdict.py)
    added_words: tuple[str, ...] = ()  # content words of the prediction with no counterpart in the source
    dropped_words: tuple[str, ...] = ()  # content words of the source with no counterpart in the prediction
    garbled: tuple[str, ...] = ()  # words of the prediction that are not words ("premiumes")
    content_recall: float = 1.0  # weighted share of the source's content kept
    content_precision: float = 1.0  # weighted share of the prediction's content backed by the source
    acceptable: bool = False  # what a careful reader would accept (verdict.acceptable)

    @property
    def faithful_success(self) -> bool:
        return self.success and self.faithful

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faithful_success": self.faithful_success}


def _check_texts(name: str, values: Any, allow_empty: bool, allow_none: bool = False) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if v is None and allow_none:
            continue
        if not isinstance(v, str):
            raise InputError(f"{name}[{i}] must be a string, got {type(v).__name__}: {v!r:.80}")
        if not allow_empty and not v.strip():
            raise InputError(f"{name}[{i}] is empty; every {name[:-1]} needs some text")


def validate_triples(
    sources: Sequence[str], references: Sequence[str | None] | None, predictions: Sequence[str]
) -> None:
    """Raise ValueError naming the problem if the inputs cannot be scored.

    Sources and references must be non-empty strings; predictions may be empty (that is a measured failure).
    ``references`` is None (no references) or one entry per row, where a None entry means "no reference".
    """
    _check_texts("sources", sources, allow_empty=False)
    _check_texts("predictions", predictions, allow_empty=True)
    if len(sources) == 0:
        raise InputError("nothing to score: sources and predictions are empty lists")
    if len(predictions) != len(sources):
        raise InputError(
            f"got {len(sources)} sources but {len(predictions)} predictions; pass one per source"
        )
    if references is not None:
        _check_texts("references", references, allow_empty=False, allow_none=True)
        if len(references) != len(sources):
            raise InputError(
                f"got {len(sources)} sources but {len(references)} references; pass one per source, or None"
            )


# ---------------------------------------------------------------------------------------------- per-row parts

def bert_ibleu(adequacy: float, self_bleu: float, beta: float = BETA) -> float:
    """Weighted harmonic mean of clip(adequacy, 0, 1) and novelty = 1 - self_bleu/100, in [0, 1]."""
    a = min(1.0, max(0.0, adequacy))
    novelty = 1.0 - min(100.0, max(0.0, self_bleu)) / 100.0
    if a <= 0.0 or novelty <= 0.0:
        return 0.0
    return (beta + 1.0) / (beta / a + 1.0 / novelty)


# ---------------------------------------------------------------------------------------------- scoring


def _cos(emb: dict[str, np.ndarray], a: str, b: str) -> float:
    if a == b:
        return 1.0  # skip float noise for exact copies
    return min(1.0, max(-1.0, float(np.dot(emb[a], emb[b]))))


def score_rows(
    sources: Sequence[str],
    references: Sequence[str | None] | None,
    predictions: Sequence[str],
    embedder: SentenceTransformer,
    batch_size: int = 64,
    cache: EmbeddingCache | None = None,
) -> list[RowScore]:
    """Score each (source, reference, prediction) row. ``references=None`` leaves the reference fields None.

    Serve reranks with ``score_rows([src] * k, None, candidates, embedder)`` and sorts by ``objective``.
    ``cache`` reuses embeddings of texts seen before (the Evaluator keeps one for the sweep's fixed sources).
    """
    validate_triples(sources, references, predictions)
    refs: Sequence[str | None] = references if references is not None else [None] * len(sources)
    # Empty predictions are not embedded: their similarities are 0 by definition (below).
    texts = [*sources, *(r for r in refs if r is not None), *(p for p in predictions if not is_empty(p))]
    emb = encode_unique(embedder, texts, batch_size, cache)
    words = verdicts(sources, predictions, embedder)  # words embedded apart from the texts' cache

    rows = []
    for src, ref, pred, v in zip(sources, refs, predictions, words, strict=True):
        empty = is_empty(pred)
        copy = is_copy(src, pred)
        # An empty output (no letter or digit) keeps no meaning and no wording: all its overlaps are 0.
        adequacy = 0.0 if empty else _cos(emb, pred, src)
        self_bleu = 0.0 if empty else sentence_bleu(pred, src)
        ref_sim = ref_bleu = ibleu = None
        if ref is not None:
            ref_sim = 0.0 if empty else _cos(emb, pred, ref)
            ref_bleu = 0.0 if empty else sentence_bleu(pred, ref)
            ibleu = IBLEU_ALPHA * ref_bleu - (1.0 - IBLEU_ALPHA) * self_bleu
        facts = check_facts(src, pred)
        objective = 0.0 if (empty or copy) else bert_ibleu(adequacy, self_bleu)
        if not facts.faithful:
            objective *= UNFAITHFUL_WEIGHT
        success = (
            not empty and not copy and adequacy >= SUCCESS_ADEQUACY and self_bleu < SUCCESS_MAX_SELF_BLEU
        )
        ok = acceptable(v, self_bleu, usable=not (empty or copy), faithful=facts.faithful)
        rows.append(
            RowScore(adequacy, ref_sim, self_bleu, ref_bleu, ibleu, copy, empty, objective, success,
                     facts.faithful, facts.invented, facts.dropped, v.added, v.dropped, v.garbled,
                     v.recall, v.precision, ok)
        )
    return rows


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[RowScore]) -> dict[str, float]:
    """Means over rows. Reference keys average the rows that have a reference; NaN when none has one."""
    if not rows:
        raise InputError("summarize() needs at least one scored row")
    with_ref = [r for r in rows if r.ref_bleu is not None]
    return {
        "n": len(rows),
        "adequacy": _mean([r.adequacy for r in rows]),
        "ref_similarity": _mean([r.ref_similarity for r in with_ref]),  # type: ignore[misc]
        "self_bleu": _mean([r.self_bleu for r in rows]),
        "ref_bleu": _mean([r.ref_bleu for r in with_ref]),  # type: ignore[misc]
        "ibleu": _mean([r.ibleu for r in with_ref]),  # type: ignore[misc]
        "copy_rate": _mean([float(r.copy) for r in rows]),
        "empty_rate": _mean([float(r.empty) for r in rows]),
        "objective": _mean([r.objective for r in rows]),
        "success_rate": _mean([float(r.success) for r in rows]),
        "faithful_rate": _mean([float(r.faithful) for r in rows]),
        "faithful_success_rate": _mean([float(r.faithful_success) for r in rows]),
        "acceptable_rate": _mean([float(r.acceptable) for r in rows]),
        "garbled_rate": _mean([float(bool(r.garbled)) for r in rows]),
    }


def score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``summarize(score_rows(...))`` with ``score_rows``'s arguments: the dict a Tune trial reports."""
    return summarize(score_rows(*args, **kwargs))


def rank_candidates(scores: Sequence[RowScore]) -> list[int]:
    """Candidate indices best first: usable (not a copy, not empty) before the rest, then faithful before not,
    then acceptable to the reader's detector (nothing added or dropped, no broken word) before not, then by
    objective. Faithfulness and the verdict are hard tiers, not only factors: a wrong fact is wrong, and a
    candidate that drops "she said" is not rescued by its novelty."""
    return sorted(
        range(len(scores)),
        key=lambda i: (scores[i].copy or scores[i].empty, not scores[i].faithful, not scores[i].acceptable,
                       -scores[i].objective),
    )


def rerank(
    sources: Sequence[str], candidates: Sequence[Sequence[str]], embedder: SentenceTransformer, batch_size: int = 64
) -> tuple[list[list[str]], list[list[RowScore]]]:
    """Each source's candidates ordered best first (``rank_candidates``), with their scores in the same order."""
    flat_src = [s for s, cands in zip(sources, candidates, strict=True) for _ in cands]
    flat = score_rows(flat_src, None, [c for cands in candidates for c in cands], embedder, batch_size)
    out_c, out_s, i = [], [], 0
    for cands in candidates:
        row = flat[i : i + len(cands)]
        order = rank_candidates(row)
        out_c.append([cands[j] for j in order])
        out_s.append([row[j] for j in order])
        i += len(cands)
    return out_c, out_s
