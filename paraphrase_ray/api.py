"""The Python API: a prompt directory (ours, one saved by PEFT, or a Hub repo) ready to paraphrase.

Example::

    from paraphrase_ray import Paraphraser

    p = Paraphraser.from_pretrained("runs/sweeps/quickstart/best")        # or a PEFT dir, or USER/NAME
    p.paraphrase(["It rained all day.", "The meeting was moved to Friday."])
    p.paraphrase(["It rained all day."], num_candidates=4, return_candidates=True)   # ranked, best first

``paraphrase_texts`` is the one generation path behind the API, ``paraphrase-ray paraphrase`` and its Ray Data
actors (``serve/batch.py``): the prompt's recorded template and decoding, candidates reranked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paraphrase_ray.config import DEFAULT_CANDIDATES, GenerationConfig, replace_nested
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER
from paraphrase_ray.models import LoadedModel
from paraphrase_ray.prompt.bundle import PromptBundle, load_prompt
from paraphrase_ray.prompt.directory import PromptMeta

if TYPE_CHECKING:
    from paraphrase_ray.evaluation.metrics import RowScore


def decoding_for(meta: PromptMeta, num_candidates: int = 1, **decoding: Any) -> GenerationConfig:
    """The prompt's recorded decoding with ``decoding`` overrides (GenerationConfig field names, None = keep),
    then ``num_candidates`` sampled candidates when it is above 1 (``GenerationConfig.with_candidates``)."""
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ConfigError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")
    gen = meta.generation
    for key, value in decoding.items():
        if value is not None:
            gen = replace_nested(gen, {key: value})  # unknown keys and wrong types named
    return gen.with_candidates(num_candidates)


def paraphrase_texts(
    loaded: LoadedModel,
    bundle: PromptBundle,
    texts: Sequence[str],
    gen: GenerationConfig,
    batch_size: int = 16,
    embedder: Any = None,
    progress: bool = False,
) -> list[list[str]]:
    """Candidates per text, best first. With several candidates per text, ``embedder`` (a SentenceTransformer,
    or a model name) ranks them: usable, then faithful, then acceptable to the reader's detector, then by
    objective (``metrics.rerank``)."""
    return _paraphrase(loaded, bundle, texts, gen, batch_size, embedder, progress, scored=False)[0]


def paraphrase_scored(
    loaded: LoadedModel, bundle: PromptBundle, texts: Sequence[str], gen: GenerationConfig, batch_size: int = 16,
    embedder: Any = None, progress: bool = False,
) -> tuple[list[list[str]], list[list[RowScore]]]:
    """``paraphrase_texts`` and every candidate's scores (same order): the fact check and the reader's-verdict
    flags (``added_words``, ``dropped_words``, ``garbled``, ``acceptable``) -- scored even for one candidate."""
    return _paraphrase(loaded, bundle, texts, gen, batch_size, embedder, progress, scored=True)


def _paraphrase(loaded, bundle, texts, gen, batch_size, embedder, progress, scored):
    from paraphrase_ray.generation.generate import paraphrase_rows, rows_for

    info = bundle.info
    rows = rows_for(loaded, list(texts), bundle.prompt, info.template, gen, info.max_source_tokens)
    cands = paraphrase_rows(loaded, rows, gen, batch_size, progress=progress)
    scores: list[list[RowScore]] = []
    if gen.num_return_sequences > 1 or scored:
        from paraphrase_ray.evaluation.embedder import load_embedder
        from paraphrase_ray.evaluation.metrics import rerank

        if embedder is None or isinstance(embedder, str):
            embedder = load_embedder(embedder or DEFAULT_EMBEDDER)
        cands, scores = rerank(list(texts), cands, embedder)
        if gen.rerank == "roundtrip" and gen.num_return_sequences > 1:
            from paraphrase_ray.evaluation.likelihood import rerank_roundtrip

            cands, scores = rerank_roundtrip(loaded, list(texts), cands, scores)
    return cands, scores


class Paraphraser:
    """A soft prompt on its frozen base model, loaded once, paraphrasing lists of texts.

    Build it with ``from_pretrained``; ``paraphrase`` runs the prompt's recorded template and decoding (the
    settings it was trained and scored with), which keyword arguments override.
    """

    def __init__(self, loaded: LoadedModel, bundle: PromptBundle, batch_size: int = 16, embedder: str = DEFAULT_EMBEDDER):
        self.loaded, self.bundle = loaded, bundle
        self.batch_size = batch_size
        self.embedder_name = embedder
        self._embedder = None  # loaded on the first call that ranks candidates

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        model: str | None = None,
        device: str = "auto",
        precision: str | None = None,
        batch_size: int = 16,
        embedder: str = DEFAULT_EMBEDDER,
    ) -> Paraphraser:
        """Load a prompt directory and its base model.

        Args:
            path_or_hub_id: a prompt directory written by ``train``/``tune``, one saved by PEFT
                (``adapter_config.json`` + ``adapter_model.safetensors``), a ``gs://`` URI of one (a sweep's
                ``best/``), or a Hub repo id ``USER/NAME`` (downloaded to the Hugging Face cache).
            model: the base model, overriding the one the prompt records (``base_model`` in
                ``paraphrase_ray.json``, else PEFT's ``base_model_name_or_path``).
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
            precision: ``auto``, ``bf16`` or ``fp32`` for the frozen weights (default: as trained).
            batch_size: rows per generation batch.
            embedder: sentence-transformers model that ranks candidates when ``num_candidates`` > 1.

        Raises ``PromptFileError`` (not a prompt directory, or made for a different model), ``ConfigError`` (no
        base model known: pass ``model``) and ``ModelLoadError`` (the base model cannot be loaded).
        """
        from paraphrase_ray.storage import is_uri, resolve_prompt_dir

        path = Path(path_or_hub_id).expanduser()
        if is_uri(str(path_or_hub_id)):  # gs://BUCKET/.../best: fetched to the local prompt cache
            path = resolve_prompt_dir(str(path_or_hub_id))
        elif not path.exists():
            from paraphrase_ray.prompt.hub import download_prompt

            path = download_prompt(str(path_or_hub_id))
        loaded, bundle = load_prompt(path, model, device, precision)
        return cls(loaded, bundle, batch_size, embedder)

    @property
    def meta(self) -> PromptMeta:
        """What the prompt directory records: base model, template, decoding, metrics."""
        return self.bundle.info

    @property
    def n_tokens(self) -> int:
        return self.bundle.prompt.n_tokens

    def paraphrase(
        self, texts: Sequence[str], num_candidates: int = DEFAULT_CANDIDATES, return_candidates: bool = False,
        only_accepted: bool = False, **decoding: Any,
    ) -> list[str] | list[list[str]] | list[str | None]:
        """One paraphrase per text, in order.

        Args:
            texts: the sentences to paraphrase (a list; each needs some words).
            num_candidates: K > 1 samples K candidates per text (temperature 0.8, top-p 0.95 unless ``decoding``
                says otherwise) and returns the best: usable, then faithful (no invented or dropped names and
                numbers), then by the BERT-iBLEU objective -- what ``paraphrase --num-candidates K`` does.
            return_candidates: return every text's candidates, best first (``list[list[str]]``).
            only_accepted: ``None`` in place of a paraphrase the reader's-verdict detector rejects (it adds or drops
                something that matters, breaks a word, changes a fact, or barely rewords): a clean set for training
                data. ``scored`` gives the flags themselves.
            **decoding: ``GenerationConfig`` fields, e.g. ``max_new_tokens=32``, ``num_beams=4``,
                ``source_no_repeat_ngram_size=0``; an unknown name or a wrong type is a ``ConfigError``.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}: wrap one text in a list")
        if not texts:
            return []
        gen = decoding_for(self.meta, num_candidates, **decoding)
        if gen.num_return_sequences > 1 and self._embedder is None:
            from paraphrase_ray.evaluation.embedder import load_embedder

            self._embedder = load_embedder(self.embedder_name)
        if only_accepted:
            cands, scores = self.scored(texts, num_candidates, **decoding)
            if return_candidates:
                return [[c for c, s in zip(cs, ss) if s.acceptable] for cs, ss in zip(cands, scores)]
            return [c[0] if s[0].acceptable else None for c, s in zip(cands, scores)]
        cands = paraphrase_texts(self.loaded, self.bundle, texts, gen, self.batch_size, self._embedder)
        return cands if return_candidates else [c[0] for c in cands]

    def scored(
        self, texts: Sequence[str], num_candidates: int = DEFAULT_CANDIDATES, **decoding: Any
    ) -> tuple[list[list[str]], list[list[RowScore]]]:
        """Every text's candidates, best first, with their scores: ``RowScore.acceptable`` and the flags
        (``added_words``, ``dropped_words``, ``garbled``, ``invented``, ``dropped``) say what a reader would object to."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}: wrap one text in a list")
        if not texts:
            return [], []
        gen = decoding_for(self.meta, num_candidates, **decoding)
        if self._embedder is None:
            from paraphrase_ray.evaluation.embedder import load_embedder

            self._embedder = load_embedder(self.embedder_name)
        return paraphrase_scored(self.loaded, self.bundle, texts, gen, self.batch_size, self._embedder)

    def __repr__(self) -> str:
        where = self.bundle.path or "?"
        return f"Paraphraser({str(where)!r}, model={self.loaded.name!r}, n_tokens={self.n_tokens})"
