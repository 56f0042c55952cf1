"""Decoding rules that see each row's source: logits processors, bans and stopping, and the per-tokenizer
vocabulary scans they share.

With ``inputs_embeds`` generation Hugging Face's own rules see only the generated tokens, never the source, so
copy control lives here. Every rule exists twice with the same tokens: as an HF ``LogitsProcessor`` /
``StoppingCriteria`` (beams, HF's generated-token penalty: ``model.generate``) and as a plain function of one
row's generated ids that ``decode.decode`` and ``lookup.lookup_decode`` call (tests pin the two paths to
identical output).

- ``DecodeRules``: the rules and engine knobs of one batch (what is the same for every row), built once per batch
  from the ``GenerationConfig`` and the tokenizer; what differs per row (limit, source ids, source n-grams, fact
  guard) stays on ``rows.Row``.
- ``make_sampler``: HF's temperature and top-p warpers and a seeded draw, for sampled candidates in our loop.
- ``source_mask``: each row's source ids as a (rows, vocab) mask, what the source penalty pushes down.
- ``SourceNgramBlock`` / ``source_bans``: never copy n consecutive source tokens (default n = 4), never cutting
  a word (``word_continuation_ids`` are exempt).
- ``SourceRepetitionPenalty``: HF's repetition-penalty rule over the source's tokens (off by default).
- ``ngram_bans``: HF's no-repeat n-gram rule over the generated tokens.
- ``StopAtLineEnd``: stop at the first newline after some text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

if TYPE_CHECKING:
    from paraphrase_ray.config import GenerationConfig
    from paraphrase_ray.generation.rows import Row

_PER_TOKENIZER: dict[tuple[str, int], Any] = {}  # (what, id(tokenizer)) -> vocabulary scans, made once
_WORD_START_MARKERS = frozenset("Ġ▁Ċĉ")  # byte-level BPE space / newline / tab, SentencePiece space
# English function words: every paraphrase needs them, so penalising them only forces odd wording.
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for from with as and or but nor so if than that this these those it its is are "
    "was were be been being has have had do does did will would can could may might shall should must not no "
    "he she they we i you his her their our my your him them us who which what when where there here".split()
)


class SourceRepetitionPenalty(LogitsProcessor):
    """HF's repetition-penalty rule applied to each row's *source* token ids.

    ``mask`` is (batch, vocab) bool; HF expands rows for beams / num_return_sequences with repeat_interleave,
    so the mask is expanded the same way on first use.
    """

    def __init__(self, mask: torch.Tensor, penalty: float):
        self.mask, self.penalty = mask, penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = self.mask
        if mask.shape[0] != scores.shape[0]:
            mask = mask.repeat_interleave(scores.shape[0] // mask.shape[0], dim=0)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(mask[:, : scores.shape[1]], penalised, scores)


class StopAtLineEnd(StoppingCriteria):
    """Stop a row at a newline token once it has produced some text (leading newlines are skipped).

    With ``inputs_embeds`` generation, ``input_ids`` holds only the generated tokens: (rows, new_tokens).
    """

    def __init__(self, newline_ids: list[int], device: torch.device):
        self.nl = torch.tensor(newline_ids, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        is_nl = torch.isin(input_ids, self.nl)  # (rows, new)
        return is_nl[:, -1] & (~is_nl[:, :-1]).any(dim=1)


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of every token whose text contains a newline: generation stops at the end of the line."""
    return _per_tokenizer(
        "newline", tokenizer, lambda: [i for i, t in enumerate(_vocab_texts(tokenizer)) if "\n" in t]
    )


def _per_tokenizer(what: str, tokenizer, build: Callable[[], Any]) -> Any:
    key = (what, id(tokenizer))
    if key not in _PER_TOKENIZER:
        _PER_TOKENIZER[key] = build()
    return _PER_TOKENIZER[key]


def _vocab_texts(tokenizer) -> list[str]:
    """Each vocabulary id decoded on its own (one pass over the vocabulary, shared by the scans below)."""
    return _per_tokenizer(
        "texts", tokenizer, lambda: tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    )


def skip_penalty_ids(tokenizer) -> frozenset[int]:
    """Ids the source penalty skips (``source_penalty_skip_common``): tokens without a letter or digit
    (punctuation, spaces, newlines) and function words.

    Penalising them does not stop copying (content words and their order do), but it does push down the final
    period every source contains and the eos after it, so the model runs on past the end of its sentence.
    """
    return _per_tokenizer("common", tokenizer, lambda: frozenset(
        i for i, t in enumerate(_vocab_texts(tokenizer))
        if not any(c.isalnum() for c in t) or t.strip().lower() in FUNCTION_WORDS
    ))


def source_ngrams(
    ids: Sequence[int], n: int, exempt: frozenset[int] = frozenset()
) -> dict[tuple[int, ...], list[int]]:
    """{(n-1)-gram of ``ids``: [tokens that follow it]}: a generated run matching a key may not go on with them.

    ``exempt`` tokens are never banned: with ``word_continuation_ids`` a word the model has started to copy
    is finished whole, and the ban falls on the next word ("Gary Nicklaus" no longer comes out "Gary Nicklup").
    """
    out: dict[tuple[int, ...], list[int]] = {}
    for j in range(len(ids) - n + 1):
        if ids[j + n - 1] not in exempt:
            out.setdefault(tuple(ids[j : j + n - 1]), []).append(ids[j + n - 1])
    return out


def word_continuation_ids(tokenizer) -> frozenset[int]:
    """Ids of tokens that continue a word: their vocabulary string starts with a letter or digit, where a
    word-initial token carries the tokenizer's space marker ("Ġ" in byte-level BPE, "▁" in SentencePiece)."""
    def build() -> frozenset[int]:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        # the markers are letters to str.isalnum() ("Ġ" is U+0120), so they are named
        return frozenset(
            i for i, t in enumerate(pieces) if t and t[0].isalnum() and t[0] not in _WORD_START_MARKERS
        )

    return _per_tokenizer("continuation", tokenizer, build)


class SourceNgramBlock(LogitsProcessor):
    """Ban each row's source n-grams: -inf on a token that would end an n-gram copied from its source.

    ``input_ids`` are the generated tokens only (``inputs_embeds`` generation); HF expands rows for beams /
    num_return_sequences with repeat_interleave, so row r of the scores belongs to source row r // k.
    """

    def __init__(self, ngrams: list[dict[tuple[int, ...], list[int]]], n: int):
        self.ngrams, self.n = ngrams, n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = scores.shape[0] // len(self.ngrams)
        for r, seq in enumerate(input_ids.tolist()):
            banned = source_bans(seq, self.ngrams[r // k], self.n)
            if banned:
                scores[r, banned] = -float("inf")
        return scores


def source_bans(seq: list[int], ngrams: dict[tuple[int, ...], list[int]], n: int) -> list[int]:
    if len(seq) < n - 1:
        return []
    return ngrams.get(tuple(seq[len(seq) - n + 1 :]), [])


def ngram_bans(seq: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in ``seq`` (the last n-1 tokens as its prefix)."""
    if len(seq) + 1 < n:
        return []
    prefix = seq[len(seq) - n + 1 :]
    return [seq[j + n - 1] for j in range(len(seq) - n + 1) if seq[j : j + n - 1] == prefix]


def ban_row(scores: torch.Tensor, seq: list[int], no_repeat_ngram: int = 0,
            ngrams: dict[tuple[int, ...], list[int]] | None = None, ngram_n: int = 0, guard: Any = None) -> None:
    """Every ban of one row after its generated tokens ``seq``, in place on its scores (vocab,): no-repeat
    n-grams, source n-grams, and the guard (``FactGuard`` / ``WordGuard``), which wins where the others would ban every token."""
    banned = ngram_bans(seq, no_repeat_ngram) if no_repeat_ngram else []
    if ngram_n and ngrams:
        banned += source_bans(seq, ngrams, ngram_n)
    if guard is not None:
        scores[guard.bans_tensor(seq, scores.device, scores.shape[0])] = -float("inf")
        if banned:  # the guard may leave only tokens an n-gram rule bans ("the F" + "BI" twice): the guard wins
            before = scores[banned].clone()
            scores[banned] = -float("inf")
            if bool(torch.isinf(scores).all()):
                scores[banned] = before
        return
    if banned:
        scores[banned] = -float("inf")


def source_mask(rows: Sequence[Row], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(rows), vocab) bool: True at each row's ``source_ids`` (ids >= vocab dropped), what
    ``SourceRepetitionPenalty`` penalises."""
    mask = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids = [t for t in r.source_ids if t < vocab]
        if ids:
            mask[i, ids] = True
    return mask


def make_sampler(gen: GenerationConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """scores (rows, vocab) -> sampled ids (rows,): HF's temperature and top-p warpers in HF's order, then one
    multinomial draw per row from a generator seeded with ``gen.seed`` (one per call: reproducible per batch).

    Not the same draws as ``generate``: our loop drops finished rows, so later rows consume the generator
    differently; the distribution per step is the same (tests/generation/test_sampling.py)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    g = torch.Generator(device=device).manual_seed(gen.seed)
    warpers = [TemperatureLogitsWarper(gen.temperature)] if gen.temperature != 1.0 else []
    if gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(gen.top_p))

    def draw(scores: torch.Tensor) -> torch.Tensor:
        for w in warpers:
            scores = w(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=g).squeeze(1)

    return draw


@dataclass(frozen=True)
class DecodeRules:
    """What every row of one batch is decoded with: the rules, the stops, the sampler and the engine knobs.

    The defaults apply no rule at all (plain greedy to each row's limit, pad id 0), so a test or benchmark names
    only the rules it wants; ``build`` makes the ones a ``GenerationConfig`` asks for. Per-row data (limit,
    source ids, source n-grams, fact guard) stays on ``rows.Row``: the decode loop pairs the two.
    """

    penalty: float = 1.0  # HF's repetition-penalty rule over each row's source ids (1.0: off)
    no_repeat_ngram: int = 0  # n > 0: no n-gram of the row's own generated tokens twice
    source_ngram_n: int = 0  # n > 0: no n consecutive source tokens copied (the rows' ``source_ngrams``)
    fact_guard: bool = False  # the rows' guard (``FactGuard`` / ``WordGuard``) bans inventing a name or number
    stop_ids: tuple[int, ...] = ()  # a row stops at (and keeps) one of these, as HF stops at eos
    newline_ids: tuple[int, ...] = ()  # ...or at one of these after some text (``StopAtLineEnd``)
    pad_id: int = 0  # fills a row's tokens after it stopped
    # scores (rows, vocab) -> ids (rows,) (``make_sampler``): draw each token after the rules; None: argmax.
    # It carries its own seeded generator, so one ``DecodeRules`` with a sampler serves one batch.
    sampler: Callable[[torch.Tensor], torch.Tensor] | None = None
    lookup: int = 0  # prompt-lookup draft tokens per verify pass (``lookup.py``; one greedy row only)
    use_lean: bool = True  # decode steps through ``backends/llama_step.py`` where it applies
    graphs: str = "auto"  # otherwise ``backends/cuda_graphs.py``: auto (on CUDA) | eager | off

    def __post_init__(self) -> None:  # lists given by callers become tuples (frozen all the way down)
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        object.__setattr__(self, "newline_ids", tuple(self.newline_ids))

    @classmethod
    def build(cls, gen: GenerationConfig, tokenizer, device: torch.device, sample: bool = False) -> DecodeRules:
        """The rules ``gen`` asks for with this tokenizer's eos, pad and newline ids; ``sample``: with a sampler
        seeded from ``gen`` on ``device`` (sampled candidates in our loop) instead of the argmax."""
        return cls(
            penalty=gen.source_repetition_penalty,
            no_repeat_ngram=gen.no_repeat_ngram_size,
            source_ngram_n=gen.source_no_repeat_ngram_size,
            fact_guard=gen.fact_guard or gen.word_guard,
            stop_ids=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else (),
            newline_ids=newline_token_ids(tokenizer) if gen.stop_at_newline else (),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            sampler=make_sampler(gen, device) if sample else None,
            lookup=gen.prompt_lookup,
            graphs=gen.cuda_graphs,
        )
