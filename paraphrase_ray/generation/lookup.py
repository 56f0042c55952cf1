"""Prompt-lookup drafting for greedy decoding of one row: draft from the source, verify in one forward pass.

Paraphrases reuse source tokens (names, numbers, short runs that n-gram blocking still allows), so the tokens
after the last generated one's latest occurrence in the source are a cheap guess at what comes next. Each
step feeds ``[pending token] + draft`` (1 + k tokens) through the model once and keeps the longest prefix of
the draft that greedy decoding would have chosen -- every rule applied at every position exactly as
``decode.decode`` applies it (``rules.ban_row``, the source penalty, the stops) -- plus the token
greedy picks after it; the KV cache is cropped back to what was kept. So the tokens are greedy's; only the
number of forward passes changes (``benchmarks/lookup_acceptance.py`` measures the acceptance on paraphrases).

Batch 1 only (the CLI's single text, Serve's single requests, per-row calls): in a batch, rows would keep
different numbers of draft tokens and the cache cannot be cropped per row, so batches use the plain loop.

Sliding-window layers (Gemma 3) keep only their last ``window - 1`` positions, so a rejected draft cannot be
cropped away once the window is full: their layers record past states (``activate_past_recording``) and crop
back to the window; where a transformers version cannot, ``applies`` is False and the plain loop runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from paraphrase_ray.generation.backends.llama_step import StaticKV, llama_step
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import DecodeRules, SourceRepetitionPenalty, ban_row, source_mask
from paraphrase_ray.models import cache_kwarg, sliding_window

NGRAM = 1  # match the last generated token: measured best on MRPC paraphrases (1.23 tokens kept per draft)


def applies(model: torch.nn.Module) -> bool:
    """True when lookup can crop this model's cache: no sliding-window layers, or layers that record past states."""
    if sliding_window(model) is None:
        return True
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer
    except ImportError:
        return False
    return hasattr(DynamicSlidingWindowLayer, "activate_past_recording")


def _record_past(cache) -> None:
    """Sliding-window layers keep what a crop needs (they crop back to the window after it)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def draft_tokens(generated: Sequence[int], source: Sequence[int], k: int, n: int = NGRAM) -> list[int]:
    """The ``k`` tokens that followed the latest occurrence in ``source`` of the last ``n`` generated tokens."""
    if k < 1 or len(generated) < n:
        return []
    tail = list(generated[-n:])
    for j in range(len(source) - n, -1, -1):
        if list(source[j : j + n]) == tail:
            return list(source[j + n : j + n + k])
    return []


@torch.no_grad()
def lookup_decode(
    model: torch.nn.Module,
    x: torch.Tensor,
    row: Row,
    rules: DecodeRules,
    past=None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Greedy tokens (1, steps) for one unpadded row ``x`` (1, L, d), the same as ``decode.decode`` gives.

    Drafts ``rules.lookup`` tokens at a time from ``row.source_ids``; every rule of ``rules`` applies at every
    position with the row's own limit, source n-grams and guard (``rules.sampler`` is not used: greedy only).
    ``stats`` (if given) accumulates ``passes`` (forward passes after the prefill), ``tokens`` and ``drafted``
    / ``accepted`` draft tokens. ``past``: a KV cache already holding this row's first positions (a shared
    prefix, ``prefix_cache.py``); x is then the rest of the row.
    """
    max_new, source, k = row.max_new_tokens, row.source_ids, rules.lookup
    ngrams = row.source_ngrams if rules.source_ngram_n else None
    guard = row.guard if rules.fact_guard else None
    key = cache_kwarg(model)
    params = inspect.signature(model.forward).parameters
    keep, pass_pos = "logits_to_keep" in params, "position_ids" in params
    stops, newlines = set(rules.stop_ids), set(rules.newline_ids)
    n_past = past.get_seq_length() if past is not None else 0
    kw = {"logits_to_keep": 1} if keep else {}
    if past is not None:
        kw[key] = past
        if pass_pos:
            kw["position_ids"] = torch.arange(n_past, n_past + x.shape[1], device=x.device)[None]
    res = model(inputs_embeds=x, use_cache=True, **kw)
    cache, length = res.get(key), n_past + x.shape[1]  # tokens in the cache
    _record_past(cache)
    # (1, vocab): True at the row's source ids, what the source penalty pushes down
    src_mask = source_mask([row], res.logits.shape[-1], x.device) if rules.penalty != 1.0 else None
    # decode steps without HF's per-layer overhead (backends/llama_step.py)
    lean = llama_step(model) if rules.use_lean else None
    if lean is not None:
        cache = StaticKV.from_hf(cache, max_new + k + 1)
    seq: list[int] = []
    has_text = False

    def choose(scores: torch.Tensor) -> int:  # scores (vocab,): one position, after every rule
        scores = scores.float().clone()
        ban_row(scores, seq, rules.no_repeat_ngram, ngrams, rules.source_ngram_n, guard)
        if src_mask is not None:
            scores = SourceRepetitionPenalty(src_mask, rules.penalty)(None, scores[None])[0]
        return int(scores.argmax())

    def take(t: int) -> bool:  # append greedy's token; True when the row stops here
        nonlocal has_text
        seq.append(t)
        is_nl = t in newlines
        done = t in stops or (is_nl and has_text) or len(seq) >= max_new
        has_text = has_text or not is_nl
        return done

    done = take(choose(res.logits[0, -1]))
    passes = drafted = accepted = 0
    while not done:
        draft = draft_tokens(seq, source, min(k, max_new - len(seq)))
        feed = [seq[-1], *draft]
        ids = torch.tensor([feed], device=x.device)
        # as decode.decode numbers them: an unpadded row's positions are 0, 1, 2, ...
        pos = torch.arange(length, length + len(feed), device=x.device)[None]
        if lean is not None:
            logits = lean(ids, pos, None, cache, keep=len(feed))[0]
        else:
            kw = {"logits_to_keep": len(feed)} if keep else {}
            if pass_pos:
                kw["position_ids"] = pos
            res = model(input_ids=ids, use_cache=True, **kw, **{key: cache})
            logits = res.logits[0, -len(feed) :]  # (1 + k, vocab): what follows each fed token
        passes, drafted = passes + 1, drafted + len(draft)
        kept = 0  # draft tokens confirmed (they are in the cache and in seq)
        for i in range(len(feed)):
            t = choose(logits[i])
            done = take(t)
            if done or i == len(draft) or t != draft[i]:
                break
            kept += 1
        accepted += kept
        length += 1 + kept  # the pending token and the confirmed drafts; the rest leaves the cache
        extra = len(feed) - 1 - kept
        if extra:
            cache.crop(-extra)
    if stats is not None:
        for name, v in (("passes", passes), ("tokens", len(seq)), ("drafted", drafted), ("accepted", accepted)):
            stats[name] = stats.get(name, 0) + v
    return torch.tensor([seq], device=x.device)
