"""Batched generation with soft prompts, where every row may carry a *different* prompt.

Rows are built as ``[prompt_i][prefix + source_i + separator]`` in embedding space and left-padded, so the
last position of every row is real and one ``generate(inputs_embeds=...)`` call serves many prompts at once
(what lets one Serve deployment host many prompts in one forward pass).

Copy control (the rules live in ``rules.py``): with ``inputs_embeds`` Hugging Face's generated-token rules
see only generated tokens, never the source. Two rules see each row's own source: ``SourceNgramBlock`` (the default, n = 4) bans copying n
consecutive source tokens, so every source word stays available but long verbatim runs cannot happen; and
``SourceRepetitionPenalty`` (off by default) applies HF's repetition-penalty rule to the source's tokens, a
blunter lever that pushes the model off the source's names and numbers too (docs/BENCHMARKS.md, "Quality").

Fast path (the default): greedy decoding with the KV cache runs our own loop (``decode.decode``) instead of
``model.generate``. It makes the same forward calls HF greedy makes (same position ids, mask and cache, logits
of the last position only) and applies the same source penalty and stopping rules, so the output is the same,
but it drops each row from the batch once it stops (at eos, at the end of its line, or at its own
``max_new_tokens``), where ``generate`` keeps computing every row until the slowest one ends, and it skips
``generate``'s per-step bookkeeping; it implements the same no-repeat n-gram bans too. Sampled candidates
(``num_candidates`` > 1, temperature / top-p) run in the same loop (``decode.py``): each row is prefilled
once and its cache copied per candidate, where ``generate`` prefills every candidate. Beams, HF's
generated-token repetition penalty and ``use_cache=False`` go through ``model.generate`` unchanged.
Here: rows (``row_for``; the ``Row`` type is in ``rows.py``), batches and routing. The batch's rules are built
once per batch (``rules.DecodeRules.build``) and handed to whichever path runs; the loop: ``decode.py``; one-row
prompt lookup: ``lookup.py``; the shared-prefix cache: ``prefix_cache.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from paraphrase_ray.config import GenerationConfig, TemplateConfig
from paraphrase_ray.data import encode_chat, encode_source
from paraphrase_ray.errors import InputError
from paraphrase_ray.generation import lookup, prefix_cache
from paraphrase_ray.generation.backends.lowbit import generation_model
from paraphrase_ray.generation.decode import decode, fast_greedy_applies, fast_sample_applies
from paraphrase_ray.generation.fact_guard import FactGuard
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import (
    DecodeRules,
    SourceNgramBlock,
    SourceRepetitionPenalty,
    StopAtLineEnd,
    skip_penalty_ids,
    source_mask,
    source_ngrams,
    word_continuation_ids,
)
from paraphrase_ray.generation.word_guard import WordGuard
from paraphrase_ray.models import LoadedModel, cache_kwarg, sliding_window
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

ZERO_SHOT_INSTRUCTION = "Paraphrase the following sentence. Reply with the paraphrase only.\n\n{source}"


def row_for(
    loaded: LoadedModel,
    source: str,
    prompt: SoftPrompt | None,
    template: TemplateConfig,
    gen: GenerationConfig,
    max_source_tokens: int = 64,
    chat: bool = False,
) -> Row:
    """Encode one source. ``chat=True`` (zero-shot baseline only) wraps it in the model's chat template."""
    tok = loaded.tokenizer
    src_only = tok(source, add_special_tokens=False)["input_ids"]
    ids = _encode(tok, source, template, max_source_tokens, chat, len(src_only))
    limit = min(gen.max_new_tokens, int(gen.max_new_tokens_ratio * len(src_only)) + 8)
    penalised = src_only
    if gen.source_penalty_skip_common and gen.source_repetition_penalty != 1.0:
        common = skip_penalty_ids(tok)
        penalised = [t for t in src_only if t not in common]
    ngrams = None
    if gen.source_no_repeat_ngram_size:
        ngrams = source_ngrams(src_only, gen.source_no_repeat_ngram_size, word_continuation_ids(tok))
    guard = FactGuard(tok, source) if gen.fact_guard else None
    if gen.word_guard:  # bans content the source lacks, half-written words and stopping short (word_guard.py)
        guard = WordGuard(tok, source, gen.word_coverage, fact=guard)
    head = _template_head(tok, template, max_source_tokens, chat)
    return Row(prompt, ids, penalised, max(1, limit), ngrams, guard, head)


def _encode(tok, source: str, template: TemplateConfig, max_source_tokens: int, chat: bool,
            n_source: int | None = None) -> list[int]:
    if chat:  # the baseline's source is never cut (Serve's zero-shot accepts any length)
        n = n_source if n_source is not None else len(tok(source, add_special_tokens=False)["input_ids"])
        return encode_chat(tok, ZERO_SHOT_INSTRUCTION.format(source=""), source, "", n)
    return encode_source(tok, source, template, max_source_tokens)


@functools.lru_cache(maxsize=64)
def _template_head(tok, template: TemplateConfig, max_source_tokens: int, chat: bool) -> tuple[int, ...]:
    return prefix_cache.head_of(*(_encode(tok, s, template, max_source_tokens, chat) for s in ("x", "Q")))


def build_batch(loaded: LoadedModel, rows: Sequence[Row], skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs_embeds (B, L, d_embed), attention_mask (B, L)) for rows with mixed prompts.

    ``skip`` > 0: only each row's ids after its first ``skip`` (a cached prefix, which holds the prompt too)."""
    model, dev = loaded.model, loaded.device
    embed = model.get_input_embeddings()
    parts = []
    for r in rows:
        e = embed(torch.tensor(r.ids[skip:], device=dev))  # (S_i, d_embed)
        if r.prompt is not None and not skip:
            e = torch.cat([r.prompt.weight.to(device=dev, dtype=e.dtype), e], dim=0)  # (P_i + S_i, d_embed)
        parts.append(e)
    width = max(p.shape[0] for p in parts)
    d = parts[0].shape[1]
    x = torch.zeros(len(rows), width, d, dtype=parts[0].dtype, device=dev)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
    for i, p in enumerate(parts):
        x[i, width - p.shape[0] :] = p
        mask[i, width - p.shape[0] :] = 1
    return x, mask


@torch.no_grad()
def generate_rows(
    loaded: LoadedModel, rows: Sequence[Row], gen: GenerationConfig, use_cache: bool = True
) -> list[list[str]]:
    """Generate ``gen.num_return_sequences`` candidates for each row of one batch (any prompts mixed)."""
    if not rows:
        return []
    tok = loaded.tokenizer
    model, _ = generation_model(loaded, gen.quantize)  # low-bit Linear layers on CPU unless quantize: none
    fast = use_cache and fast_greedy_applies(model, gen, tok)
    sample = use_cache and not fast and fast_sample_applies(model, gen, tok)  # K candidates in our loop too
    skip = prefix_cache.shared_prefix(rows, sliding_window(model)) if (fast or sample) and gen.prefix_cache else 0
    past = None
    x, mask = build_batch(loaded, rows, skip)
    if skip:  # [prompt][head] from the cache; only the rest of each row is prefilled (prefix_cache.py)
        past, n_past = prefix_cache.prefix_kv(
            model, loaded.model.get_input_embeddings(), rows[0].prompt, rows[0].ids[:skip], len(rows), cache_kwarg(model)
        )
        mask = torch.cat([mask.new_ones(len(rows), n_past), mask], dim=1)
    rules = DecodeRules.build(gen, tok, loaded.device, sample)  # the same for every row; per-row data: the rows
    if fast and rules.lookup and len(rows) == 1 and lookup.applies(model):
        out = lookup.lookup_decode(model, x, rows[0], rules, past=past)  # one row: draft from its source, verify
    elif fast or sample:
        out = decode(model, x, mask, rows, rules, gen.num_return_sequences if sample else 1, past=past)
    else:
        out = hf_generate(loaded, x, mask, rows, gen, rules, use_cache, model)
    k = gen.num_return_sequences
    results: list[list[str]] = []
    for i, r in enumerate(rows):
        cands = []
        for j in range(k):
            ids = out[i * k + j, : r.max_new_tokens].tolist()
            cands.append(clean_text(tok.decode(ids, skip_special_tokens=True)))
        results.append(cands)
    return results


def engine_label(loaded: LoadedModel, gen: GenerationConfig, n_rows: int) -> str:
    """What generation runs, for ``--stats`` and the summary line: the weights (``q4`` / ``int8`` / ``fp32``)
    and the engine parts that apply, e.g. ``q4+lean+prefix-cache+lookup`` or ``fp32+hf-generate`` (beams)."""
    from paraphrase_ray.generation.backends.cuda_graphs import graph_engine
    from paraphrase_ray.generation.backends.llama_step import llama_step

    model, path = generation_model(loaded, gen.quantize)
    tok = loaded.tokenizer
    greedy, sampled = fast_greedy_applies(model, gen, tok), fast_sample_applies(model, gen, tok)
    if not (greedy or sampled):
        return f"{path}+hf-generate"
    lean = llama_step(model) is not None
    drafts = bool(greedy and gen.prompt_lookup and n_rows == 1 and lookup.applies(model))
    parts = [path] + ["lean"] * lean + ["prefix-cache"] * gen.prefix_cache + ["lookup"] * drafts
    engine = None if lean or drafts else graph_engine(model, gen.cuda_graphs)
    if engine is not None:  # graphs once captured; a static cache stepped eagerly where capture is off or failed
        parts.append("cuda-graphs" if engine.capture and not engine.disabled else "static-cache")
    return "+".join(parts)


def hf_generate(
    loaded: LoadedModel,
    x: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[Row],
    gen: GenerationConfig,
    rules: DecodeRules,
    use_cache: bool = True,
    model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The reference path: ``model.generate`` (default ``loaded.model``) with our rules as HF processors.

    ``rules`` gives the source rules and the stops (as for ``decode``); ``gen`` what HF does itself (beams,
    sampling, its generated-token penalty and no-repeat n-grams)."""
    tok, model = loaded.tokenizer, model if model is not None else loaded.model
    processors = LogitsProcessorList()
    if rules.penalty != 1.0:  # (B, vocab) source mask; HF expands it per beam / candidate (repeat_interleave)
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        processors.append(SourceRepetitionPenalty(source_mask(rows, vocab, loaded.device), rules.penalty))
    if rules.source_ngram_n:
        processors.append(SourceNgramBlock([r.source_ngrams or {} for r in rows], rules.source_ngram_n))
    if rules.fact_guard and all(r.guard is not None for r in rows):
        from paraphrase_ray.generation.fact_guard import FactGuardProcessor

        processors.append(FactGuardProcessor([r.guard for r in rows]))
    stopping = StoppingCriteriaList()
    if rules.newline_ids:
        stopping.append(StopAtLineEnd(list(rules.newline_ids), loaded.device))
    max_new = max(r.max_new_tokens for r in rows)
    if gen.do_sample:
        torch.manual_seed(gen.seed)
    with warnings.catch_warnings():
        # n-gram bans over the generated tokens only are what we want (the source is penalised separately)
        warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
        return model.generate(
            inputs_embeds=x,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=gen.do_sample,
            num_beams=gen.num_beams,
            num_return_sequences=gen.num_return_sequences,
            temperature=gen.temperature if gen.do_sample else None,
            top_p=gen.top_p if gen.do_sample else None,
            top_k=None,
            repetition_penalty=gen.repetition_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            logits_processor=processors,
            stopping_criteria=stopping,
            eos_token_id=list(rules.stop_ids) or None,
            pad_token_id=tok.pad_token_id,
            use_cache=use_cache,
        )  # (B * num_return_sequences, new_tokens): with inputs_embeds only new tokens come back


def clean_text(text: str) -> str:
    """The paraphrase is the first non-empty line of the continuation, trimmed."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def rows_for(
    loaded: LoadedModel,
    sources: Sequence[str],
    prompts: SoftPrompt | None | Sequence[SoftPrompt | None],
    template: TemplateConfig,
    gen: GenerationConfig,
    max_source_tokens: int = 64,
    chat: bool = False,
) -> list[Row]:
    """One ``row_for`` per source, checked first: ``prompts`` is one prompt for all rows or one per row, and no
    source may be empty. What ``paraphrase`` runs; ``paraphrase_rows`` batches them."""
    if isinstance(prompts, SoftPrompt) or prompts is None:
        prompts = [prompts] * len(sources)
    if len(prompts) != len(sources):
        raise InputError(f"{len(prompts)} prompts for {len(sources)} sources")
    for i, s in enumerate(sources):
        if not isinstance(s, str) or not s.strip():
            raise InputError(f"source {i} is empty; every text to paraphrase needs some words")
    return [row_for(loaded, s, p, template, gen, max_source_tokens, chat) for s, p in zip(sources, prompts)]


def paraphrase_rows(loaded: LoadedModel, rows: Sequence[Row], gen: GenerationConfig, batch_size: int = 16,
                    use_cache: bool = True, progress: bool = False) -> list[list[str]]:
    """Candidates for each row, in input order, ``batch_size`` rows per ``generate_rows`` call. ``use_cache=False``:
    HF's uncached ``generate`` (the reference path); ``progress``: a progress bar over the batches.

    Rows are sorted by length before batching (less padding); output order is restored.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids) + (rows[i].prompt.n_tokens if rows[i].prompt else 0))
    results: list[list[str]] = [[] for _ in rows]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for idx in batches:
        for i, cands in zip(idx, generate_rows(loaded, [rows[i] for i in idx], gen, use_cache)):
            results[i] = cands
    return results


def paraphrase(loaded: LoadedModel, sources: Sequence[str], prompts: SoftPrompt | None | Sequence[SoftPrompt | None],
               template: TemplateConfig, gen: GenerationConfig, batch_size: int = 16, **row: Any) -> list[list[str]]:
    """Candidates for each source, in input order. ``prompts`` is one prompt for all rows or one per row; ``row``
    takes ``rows_for``'s ``max_source_tokens`` and ``chat`` (zero-shot baseline only: each source wrapped in the
    model's chat template).

    ``rows_for`` then ``paraphrase_rows``: call those two for a progress bar or the uncached reference path.
    """
    return paraphrase_rows(loaded, rows_for(loaded, sources, prompts, template, gen, **row), gen, batch_size)
