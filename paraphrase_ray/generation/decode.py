"""The decode loop behind ``generate_rows`` (``decode``): greedy (token-identical to HF greedy ``generate``) and
sampled candidates, with every decoding rule of ``rules.py`` applied per row and each row dropped from the batch
when it stops (what ``generate`` does not do). ``fast_greedy_applies`` / ``fast_sample_applies`` say when a config
can run here; everything else (beams, HF's generated-token repetition penalty, ``use_cache=False``) goes
through ``model.generate``.

``decode`` takes the batch's rules once (``rules.DecodeRules``: penalty, n-gram sizes, stops, pad, sampler,
engine knobs) and per-row data from the rows themselves (``rows.Row``: limit, source ids, source n-grams, guard).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from paraphrase_ray.config import GenerationConfig
from paraphrase_ray.generation.backends.cuda_graphs import graph_engine
from paraphrase_ray.generation.backends.llama_step import StaticKV, llama_step
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import DecodeRules, SourceRepetitionPenalty, ban_row, source_mask
from paraphrase_ray.models import cache_kwarg


def fast_greedy_applies(model, gen: GenerationConfig, tokenizer) -> bool:
    """True when ``decode`` gives exactly what greedy ``model.generate`` would for this config."""
    if gen.do_sample or gen.num_beams != 1 or gen.num_return_sequences != 1:
        return False
    if gen.repetition_penalty != 1.0:
        return False  # HF's generated-token penalty stays on HF's path
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        return False  # without eos HF keeps emitting tokens after a stop; not worth mirroring
    if model.config.is_encoder_decoder or cache_kwarg(model) is None:
        return False
    return not _hf_adds_processors(getattr(model, "generation_config", None))


def fast_sample_applies(model, gen: GenerationConfig, tokenizer) -> bool:
    """True when sampled candidates can run in our loop (``decode`` with ``DecodeRules.sampler``): plain ancestral
    sampling with temperature and top-p, the same rules as greedy, and no sampling defaults of the model's own
    generation config (top-k, min-p, typical-p...) that ``generate`` would add."""
    if not gen.do_sample or gen.num_beams != 1 or gen.repetition_penalty != 1.0:
        return False
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        return False
    if model.config.is_encoder_decoder or cache_kwarg(model) is None:
        return False
    hf = getattr(model, "generation_config", None)
    if hf is not None and any(getattr(hf, f, None) not in (None, 0, 1.0) for f in
                              ("top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")):
        return False
    return not _hf_adds_processors(hf)


def _hf_adds_processors(hf) -> bool:
    """True when the model's own generation config makes greedy ``generate`` add logits processors (the
    conditions of transformers' ``_get_logits_processor``); the fast loop implements none of them."""
    if hf is None:
        return False

    def g(name):
        return getattr(hf, name, None)

    return bool(
        g("guidance_scale") not in (None, 1) or (g("min_length") or 0) > 0 or (g("min_new_tokens") or 0) > 0
        or g("remove_invalid_values") is True
        or any(g(f) is not None for f in ("sequence_bias", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
                                          "exponential_decay_length_penalty", "suppress_tokens",
                                          "begin_suppress_tokens", "watermarking_config"))
    )


def decode(
    model: torch.nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    rows: Sequence[Row],
    rules: DecodeRules,
    k: int = 1,
    past=None,
) -> torch.Tensor:
    """Tokens (len(rows) x k, steps) for left-padded ``inputs_embeds`` x (B, L, d) and mask (B, L), one input row
    per ``rows`` entry; pad (``rules.pad_id``) after a stop. Greedy, or sampled where ``rules.sampler`` is set.

    ``k`` > 1: every input row gives k output rows (rows i*k .. i*k+k-1, k sampled candidates): the rows are
    prefilled once and their cache copied k times. ``past``: a KV cache that already holds the first
    ``mask.shape[1] - L`` positions of every row (a shared prefix, ``prefix_cache.py``); ``mask`` then covers
    those positions too and x only the rest. ``rules.use_lean``: decode steps through ``backends/llama_step.py``
    where it applies (Llama-architecture models on the low-bit kernel). ``rules.graphs``: otherwise, decode steps
    through a static cache replayed as CUDA graphs (``backends/cuda_graphs.py``; ``auto``: on CUDA; ``eager``: the
    same static-cache step uncaptured, any device; ``off``: the plain forward).

    Mirrors HF greedy ``generate`` call for call -- position ids from the mask's cumulative sum, the mask
    dropped when it is all ones, logits of the last position only, the cache grown by one token per step --
    and stops each row on its own: at a ``rules.stop_ids`` token (kept, like HF keeps eos), at a
    ``rules.newline_ids`` token after some text (``StopAtLineEnd``), or after its row's ``max_new_tokens``.
    Stopped rows leave the batch (their cache rows dropped) once they are a quarter of it, so the work per step
    shrinks as rows finish. The rules, per row: ``rules.penalty`` != 1 applies HF's repetition-penalty rule to
    the row's ``source_ids`` (``SourceRepetitionPenalty``); ``rules.no_repeat_ngram`` n > 0 bans any token that
    would repeat an n-gram of the row's own generated tokens (transformers' ``NoRepeatNGramLogitsProcessor``,
    which with ``inputs_embeds`` sees only the generated tokens too); ``rules.source_ngram_n`` bans copying a
    source n-gram of the row's ``source_ngrams`` (``SourceNgramBlock``); ``rules.fact_guard``: the row's
    ``guard`` bans inventing a name or number (``FactGuardProcessor``). A sampler draws after the same rules.
    A row may carry a ``should_stop`` callable (Serve sets one: the row's request timed out or its caller left);
    once it returns true the row stops at the next step, like a row at its limit.
    """
    # per output row (row i's k candidates are rows i*k .. i*k+k-1), as HF expands num_return_sequences
    max_new = [r.max_new_tokens for r in rows for _ in range(k)]
    source_ngrams = [r.source_ngrams for r in rows for _ in range(k)] if rules.source_ngram_n else None
    guards = [r.guard for r in rows for _ in range(k)] if rules.fact_guard else None
    checks = [r.should_stop for r in rows for _ in range(k)]
    checks = checks if any(checks) else None
    no_repeat_ngram, source_ngram_n, sampler = rules.no_repeat_ngram, rules.source_ngram_n, rules.sampler
    bsz, dev = len(max_new), x.device
    cache_key = cache_kwarg(model)
    fwd_params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}
    pass_pos = "position_ids" in fwd_params
    limits = torch.as_tensor(list(max_new), device=dev)
    steps = int(limits.max())
    out = torch.full((bsz, steps), rules.pad_id, dtype=torch.long, device=dev)
    stop_t = torch.as_tensor(list(rules.stop_ids), dtype=torch.long, device=dev)
    nl_t = torch.as_tensor(list(rules.newline_ids), dtype=torch.long, device=dev)
    active = torch.arange(bsz, device=dev)  # original row index of each row still in the batch
    has_text = torch.zeros(bsz, dtype=torch.bool, device=dev)  # a non-newline token was generated
    lim = limits  # per row still in the batch
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, L), as HF builds them
    attn = None if bool((mask == 1).all()) else mask

    kwargs = dict(extra, position_ids=pos[:, -x.shape[1] :]) if pass_pos else dict(extra)
    if past is not None:
        kwargs[cache_key] = past
    res = model(inputs_embeds=x, attention_mask=attn, use_cache=True, **kwargs)
    cache = res.get(cache_key)
    last = res.logits[:, -1]  # (B, vocab)
    # (B x k, vocab): True at each output row's source ids, what the source penalty pushes down (pruned with the rows)
    src = source_mask(rows, last.shape[-1], dev).repeat_interleave(k, 0) if rules.penalty != 1.0 else None
    # decode steps without HF's per-layer overhead (backends/llama_step.py)
    lean = llama_step(model) if rules.use_lean else None
    if lean is not None:
        cache = StaticKV.from_hf(cache, steps + 1)
    if k > 1:  # k candidates per row share its prefill: (B, ...) -> (k x B, ...)
        cache.batch_repeat_interleave(k)
        last, pos = last.repeat_interleave(k, 0), pos.repeat_interleave(k, 0)
        attn = attn.repeat_interleave(k, 0) if attn is not None else None
    graph = None
    if lean is None and (engine := graph_engine(model, rules.graphs)) is not None:
        # fixed rows: finished rows stay (no compaction). None: too big, or in use by another thread
        graph = engine.start(cache, attn, steps + 1)
    prunable = graph is None and hasattr(cache, "batch_select_indices")
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)
    seqs: list[list[int]] = [[] for _ in range(bsz)]  # generated ids per original row (only for n-gram bans)
    block = source_ngrams is not None
    guard = guards is not None and any(g is not None for g in guards)
    track = block or guard or bool(no_repeat_ngram)  # keep each row's generated ids
    n_steps = 0
    try:
        for step in range(steps):
            scores = last.float()  # (rows in batch, vocab), as HF copies them
            live = (~done).tolist()
            if block or guard or (no_repeat_ngram and step + 1 >= no_repeat_ngram):
                for j, r in enumerate(active.tolist()):
                    if live[j]:  # a finished row still in the batch (not compacted yet) needs no bans
                        ban_row(scores[j], seqs[r], no_repeat_ngram, source_ngrams[r] if block else None,
                                source_ngram_n, guards[r] if guard else None)
            if src is not None:
                scores = SourceRepetitionPenalty(src, rules.penalty)(None, scores)
            nxt = sampler(scores) if sampler is not None else scores.argmax(dim=-1)  # (rows in batch,)
            out[active[~done], step] = nxt[~done]
            n_steps = step + 1
            if track:
                for r, t, ok in zip(active.tolist(), nxt.tolist(), live):
                    if ok:
                        seqs[r].append(t)
            stop = lim <= n_steps
            if stop_t.numel():
                stop |= torch.isin(nxt, stop_t)
            if nl_t.numel():
                is_nl = torch.isin(nxt, nl_t)
                stop |= is_nl & has_text
                has_text = has_text | ~is_nl
            done = done | stop
            if checks is not None:
                gone = [j for j, r in enumerate(active.tolist()) if checks[r] is not None and checks[r]()]
                if gone:
                    done[gone] = True
            n_done = int(done.sum())  # one host sync per step, as in HF's loop
            if n_done == done.shape[0]:
                break
            # Drop finished rows once they are a quarter of the batch: compacting copies the whole KV cache, so
            # doing it whenever any row ends (every step, in a batch of 128 candidates) cost more than it saved.
            if prunable and n_done and 4 * n_done >= done.shape[0]:
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, nxt, pos, done, lim, has_text = (t[keep] for t in (active, nxt, pos, done, lim, has_text))
                attn = attn[keep] if attn is not None else None
                src = src[keep] if src is not None else None
            # (without pruning, stopped rows run on; rows never see each other, so their tokens change nothing)
            if attn is not None:
                attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            kwargs = dict(extra, position_ids=pos) if pass_pos else dict(extra)
            if lean is not None:
                last = lean(nxt[:, None], pos, attn, cache)[:, -1]
            elif graph is not None:
                last = graph.step(nxt[:, None], pos, attn)
            else:
                res = model(input_ids=nxt[:, None], attention_mask=attn, use_cache=True, **{cache_key: cache}, **kwargs)
                last = res.logits[:, -1]
    finally:
        if graph is not None:
            graph.release()  # the bucket may serve the next decode
    return out[:, :n_steps]
