"""Batched generation with soft prompts, where every row may carry a *different* prompt.

Rows are built as ``[prompt_i][prefix + source_i + separator]`` in embedding space and left-padded, so the
last position of every row is real and one ``generate(inputs_embeds=...)`` call serves many prompts at once
(what lets one Serve deployment host many prompts in one forward pass).

Copy control (the rules live in ``decoding.py``): with ``inputs_embeds`` Hugging Face's generated-token rules
see only generated tokens, never the source. Two rules see each row's own source: ``SourceNgramBlock`` (the default, n = 4) bans copying n
consecutive source tokens, so every source word stays available but long verbatim runs cannot happen; and
``SourceRepetitionPenalty`` (off by default) applies HF's repetition-penalty rule to the source's tokens, a
blunter lever that pushes the model off the source's names and numbers too (docs/BENCHMARKS.md, "Quality").

Fast path (the default): greedy decoding with the KV cache runs our own loop (``greedy_decode``) instead of
``model.generate``. It makes the same forward calls HF greedy makes (same position ids, mask and cache, logits
of the last position only) and applies the same source penalty and stopping rules, so the output is the same,
but it drops each row from the batch once it stops (at eos, at the end of its line, or at its own
``max_new_tokens``), where ``generate`` keeps computing every row until the slowest one ends, and it skips
``generate``'s per-step bookkeeping; it implements the same no-repeat n-gram bans too. Sampled candidates
(``num_candidates`` > 1, temperature / top-p) run in the same loop (``decode_loop.py``): each row is prefilled
once and its cache copied per candidate, where ``generate`` prefills every candidate. Beams, HF's
generated-token repetition penalty and ``use_cache=False`` go through ``model.generate`` unchanged.
Loop, rules and routing: ``decode_loop.py``; the shared-prefix cache: ``prefix_cache.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from paraphrase_ray.config import GenerationConfig, TemplateConfig
from paraphrase_ray.data import encode_chat, encode_source
from paraphrase_ray.errors import InputError
from paraphrase_ray.generation import prefix_cache
from paraphrase_ray.generation.backends.lowbit import generation_model
from paraphrase_ray.generation.decode import (  # noqa: F401
    fast_greedy_applies,
    fast_sample_applies,
    greedy_decode,
    make_sampler,
)
from paraphrase_ray.generation.fact_guard import FactGuard
from paraphrase_ray.generation.rules import (
    SourceNgramBlock,
    SourceRepetitionPenalty,
    StopAtLineEnd,
    newline_token_ids,
    skip_penalty_ids,
    source_ngrams,
    word_continuation_ids,
)
from paraphrase_ray.models import LoadedModel, cache_kwarg
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

ZERO_SHOT_INSTRUCTION = "Paraphrase the following sentence. Reply with the paraphrase only.\n\n{source}"


@dataclass
class Row:
    """One generation input: its prompt (None = no soft prompt), token ids, and the source ids to penalise."""

    prompt: SoftPrompt | None
    ids: list[int]
    source_ids: list[int]
    max_new_tokens: int
    # source (n-1)-gram -> the tokens that follow it in the source: what ``source_no_repeat_ngram_size`` bans
    source_ngrams: dict[tuple[int, ...], list[int]] | None = None
    guard: FactGuard | None = None  # bans inventing names / numbers (``generation.fact_guard``)
    head: tuple[int, ...] | None = None  # ids every row of this template starts with (prefix_cache.py)


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
    skip = prefix_cache.shared_prefix(rows) if (fast or sample) and gen.prefix_cache else 0
    past = None
    x, mask = build_batch(loaded, rows, skip)
    if skip:  # [prompt][head] from the cache; only the rest of each row is prefilled (prefix_cache.py)
        past, n_past = prefix_cache.prefix_kv(
            model, loaded.model.get_input_embeddings(), rows[0].prompt, rows[0].ids[:skip], len(rows), cache_kwarg(model)
        )
        mask = torch.cat([mask.new_ones(len(rows), n_past), mask], dim=1)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    src_mask = None
    if gen.source_repetition_penalty != 1.0:
        src_mask = torch.zeros(len(rows), vocab, dtype=torch.bool, device=loaded.device)
        for i, r in enumerate(rows):
            ids = [t for t in r.source_ids if t < vocab]
            if ids:
                src_mask[i, ids] = True
    stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    nl_ids = newline_token_ids(tok) if gen.stop_at_newline else []
    if fast and gen.prompt_lookup and len(rows) == 1:
        from paraphrase_ray.generation.lookup import (
            lookup_decode,  # one row: draft from its source, verify in one pass (same tokens)
        )

        r = rows[0]
        out = lookup_decode(
            model, x, r.max_new_tokens, r.source_ids, gen.prompt_lookup, src_mask, gen.source_repetition_penalty,
            stop_ids, nl_ids, gen.no_repeat_ngram_size, r.source_ngrams, gen.source_no_repeat_ngram_size, r.guard,
            past=past,
        )
    elif fast or sample:
        k = gen.num_return_sequences if sample else 1

        def each(values):  # one entry per output row: row i's k candidates are rows i*k .. i*k+k-1
            return [v for v in values for _ in range(k)]

        out = greedy_decode(
            model, x, mask, each(r.max_new_tokens for r in rows),
            src_mask.repeat_interleave(k, 0) if src_mask is not None else None, gen.source_repetition_penalty,
            stop_ids, nl_ids, tok.pad_token_id, gen.no_repeat_ngram_size,
            each(r.source_ngrams for r in rows) if gen.source_no_repeat_ngram_size else None,
            gen.source_no_repeat_ngram_size,
            each(r.guard for r in rows) if gen.fact_guard else None,
            past=past,
            sampler=make_sampler(gen, loaded.device) if sample else None,
            graphs=gen.cuda_graphs,
        )
    else:
        out = _hf_generate(loaded, x, mask, rows, gen, src_mask, stop_ids, nl_ids, use_cache, model)
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
    from paraphrase_ray.generation.backends.llama_step import lean_step

    model, path = generation_model(loaded, gen.quantize)
    tok = loaded.tokenizer
    greedy, sampled = fast_greedy_applies(model, gen, tok), fast_sample_applies(model, gen, tok)
    if not (greedy or sampled):
        return f"{path}+hf-generate"
    lean = lean_step(model) is not None
    lookup = bool(greedy and gen.prompt_lookup and n_rows == 1)
    parts = [path] + ["lean"] * lean + ["prefix-cache"] * gen.prefix_cache + ["lookup"] * lookup
    engine = None if lean or lookup else graph_engine(model, gen.cuda_graphs)
    if engine is not None:  # graphs once captured; a static cache stepped eagerly where capture is off or failed
        parts.append("cuda-graphs" if engine.capture and not engine.disabled else "static-cache")
    return "+".join(parts)


def _hf_generate(loaded, x, mask, rows, gen, src_mask, stop_ids, nl_ids, use_cache, model=None) -> torch.Tensor:
    """The reference path: ``model.generate`` (default ``loaded.model``) with our rules as HF processors."""
    tok, model = loaded.tokenizer, model if model is not None else loaded.model
    processors = LogitsProcessorList()
    if src_mask is not None:
        processors.append(SourceRepetitionPenalty(src_mask, gen.source_repetition_penalty))
    if gen.source_no_repeat_ngram_size:
        processors.append(SourceNgramBlock([r.source_ngrams or {} for r in rows], gen.source_no_repeat_ngram_size))
    if gen.fact_guard and all(r.guard is not None for r in rows):
        from paraphrase_ray.generation.fact_guard import FactGuardProcessor

        processors.append(FactGuardProcessor([r.guard for r in rows]))
    stopping = StoppingCriteriaList()
    if nl_ids:
        stopping.append(StopAtLineEnd(nl_ids, loaded.device))
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
            eos_token_id=stop_ids or None,
            pad_token_id=tok.pad_token_id,
            use_cache=use_cache,
        )  # (B * num_return_sequences, new_tokens): with inputs_embeds only new tokens come back


def clean_text(text: str) -> str:
    """The paraphrase is the first non-empty line of the continuation, trimmed."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def paraphrase(
    loaded: LoadedModel,
    sources: Sequence[str],
    prompts: SoftPrompt | None | Sequence[SoftPrompt | None],
    template: TemplateConfig,
    gen: GenerationConfig,
    batch_size: int = 16,
    max_source_tokens: int = 64,
    chat: bool = False,
    use_cache: bool = True,
    progress: bool = False,
) -> list[list[str]]:
    """Candidates for each source, in input order. ``prompts`` is one prompt for all rows or one per row.

    Rows are sorted by length before batching (less padding); output order is restored.
    """
    if isinstance(prompts, SoftPrompt) or prompts is None:
        prompts = [prompts] * len(sources)
    if len(prompts) != len(sources):
        raise InputError(f"{len(prompts)} prompts for {len(sources)} sources")
    for i, s in enumerate(sources):
        if not isinstance(s, str) or not s.strip():
            raise InputError(f"source {i} is empty; every text to paraphrase needs some words")
    rows = [row_for(loaded, s, p, template, gen, max_source_tokens, chat) for s, p in zip(sources, prompts)]
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
