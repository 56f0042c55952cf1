"""One generation input (``Row``): what ``generate.row_for`` builds from a source and the decode loop reads per row.

Its own module so that ``decode.py`` and ``lookup.py`` (which read a row's limit, source ids, source n-grams and
fact guard) and ``generate.py`` (which builds rows) can all import it without a cycle. What is the same for every
row of a batch lives in ``rules.DecodeRules`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paraphrase_ray.generation.fact_guard import FactGuard
    from paraphrase_ray.generation.word_guard import WordGuard
    from paraphrase_ray.prompt.soft_prompt import SoftPrompt


@dataclass
class Row:
    """One generation input: its prompt (None = no soft prompt), token ids, and the source ids to penalise."""

    prompt: SoftPrompt | None
    ids: list[int]
    source_ids: list[int]
    max_new_tokens: int
    # source (n-1)-gram -> the tokens that follow it in the source: what ``source_no_repeat_ngram_size`` bans
    source_ngrams: dict[tuple[int, ...], list[int]] | None = None
    guard: FactGuard | WordGuard | None = None  # bans inventing names / numbers (``fact_guard``), words too (``word_guard``)
    head: tuple[int, ...] | None = None  # ids every row of this template starts with (prefix_cache.py)
    # () -> True once nobody waits for this row any more (Serve: its request timed out or the caller left);
    # decode.decode stops the row at its next step
    should_stop: Callable[[], bool] | None = None

    @classmethod
    def bare(cls, max_new_tokens: int) -> Row:
        """A row that carries only its length limit: for decoding embeddings built elsewhere (benchmarks, tests),
        where the loop needs no source (no source penalty, n-grams or guard apply to it)."""
        return cls(None, [], [], max_new_tokens)
