"""The prefix KV cache (prefix_cache.py): the same tokens as prefilling every row whole, and never stale."""

from __future__ import annotations

import dataclasses
import json

import torch

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.generation import prefix_cache
from paraphrase_ray.generation.generate import generate_rows, row_for
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

T = TemplateConfig(prefix="Rewrite the next sentence in other words, keeping every fact: ")
SOURCES = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[:8]]
GEN = GenerationConfig(max_new_tokens=12, max_new_tokens_ratio=10.0, stop_at_newline=False)
OFF = dataclasses.replace(GEN, prefix_cache=False)


def _prompt(tiny, n=4, seed=1):
    return SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=n, init="random", seed=seed))


def _spy_prefill(monkeypatch):
    """Lengths of every prefill (the first forward of each generation call) and of every prefix computed."""
    import paraphrase_ray.generation.generate as G
    import paraphrase_ray.generation.lookup as L

    seen = {"prefix": []}
    real_kv = prefix_cache.prefix_kv

    def kv(model, embed, prompt, ids, batch, key):
        seen["prefix"].append(len(ids))
        return real_kv(model, embed, prompt, ids, batch, key)

    monkeypatch.setattr(prefix_cache, "prefix_kv", kv)
    return seen, G, L


def test_template_head_is_what_every_row_starts_with(tiny):
    rows = [row_for(tiny, s, None, T, GEN) for s in SOURCES]
    head = rows[0].head
    assert all(r.head == head for r in rows)
    assert len(head) >= 10 and all(list(r.ids[: len(head)]) == list(head) for r in rows)
    assert tiny.tokenizer.decode(head).startswith("<s>Rewrite the next sentence")
    # one source word is never part of it
    assert prefix_cache.shared_prefix(rows) == len(head) and len(head) < min(len(r.ids) for r in rows)


def test_same_tokens_with_and_without_the_cache_batch_and_single(tiny, monkeypatch):
    prefix_cache.clear()
    seen, _, _ = _spy_prefill(monkeypatch)
    p = _prompt(tiny)
    rows = [row_for(tiny, s, p, T, GEN) for s in SOURCES]
    for gen_on, gen_off in ((GEN, OFF), (dataclasses.replace(GEN, prompt_lookup=0),
                                         dataclasses.replace(OFF, prompt_lookup=0))):
        single = [generate_rows(tiny, [r], gen_on)[0] for r in rows]
        assert single == [generate_rows(tiny, [r], gen_off)[0] for r in rows]
    batched = generate_rows(tiny, rows, GEN)  # mixed lengths: [prefix][pad][rest] keeps HF's positions
    assert batched == generate_rows(tiny, rows, OFF) == single
    n_head = len(rows[0].head)
    assert seen["prefix"] and set(seen["prefix"]) == {n_head}  # the cache was used, for the head only
    assert any(text.strip() for cands in batched for text in cands)


def test_a_prompt_changed_in_place_is_never_served_stale(tiny):
    prefix_cache.clear()
    p = _prompt(tiny, n=5, seed=3)
    row = row_for(tiny, SOURCES[0], p, T, GEN)
    before = generate_rows(tiny, [row], GEN)
    with torch.no_grad():
        p.weight.mul_(-3.0)  # what a training step does to the prompt between two evaluations
    after = generate_rows(tiny, [row], GEN)
    assert after == generate_rows(tiny, [row], OFF)
    assert after != before  # the prompt matters to this tiny model: a stale cache would have kept `before`


def test_rows_with_different_prompts_share_no_prefix(tiny):
    a, b = _prompt(tiny, seed=1), _prompt(tiny, seed=2)
    rows = [row_for(tiny, SOURCES[0], a, T, GEN), row_for(tiny, SOURCES[1], b, T, GEN)]
    assert prefix_cache.shared_prefix(rows) == 0
    assert prefix_cache.shared_prefix([rows[0], row_for(tiny, SOURCES[1], None, T, GEN)]) == 0
    same_values = SoftPrompt(a.weight.detach().clone())  # another object, equal values: shared
    assert prefix_cache.shared_prefix([rows[0], row_for(tiny, SOURCES[1], same_values, T, GEN)]) > 0
    assert generate_rows(tiny, rows, GEN) == generate_rows(tiny, rows, OFF)


def test_the_lru_keeps_a_bounded_number_of_prefixes(tiny, monkeypatch):
    prefix_cache.clear()
    monkeypatch.setattr(prefix_cache, "MAX_ENTRIES", 2)
    for seed in range(4):
        generate_rows(tiny, [row_for(tiny, SOURCES[0], _prompt(tiny, seed=seed), T, GEN)], GEN)
    from paraphrase_ray.generation.backends.lowbit import generation_model

    model, _ = generation_model(tiny, GEN.quantize)
    assert len(prefix_cache._CACHES[model]) == 2


def test_embedded_chat_model_same_text_with_the_cache(smollm):
    """The product path: the chat template's ~40-token head plus a soft prompt, the q4 kernel, lookup on."""
    prefix_cache.clear()
    chat = TemplateConfig(prefix="Paraphrase the following sentence. Reply with the paraphrase only.\n\n", chat=True)
    p = SoftPrompt.init(smollm.model, smollm.tokenizer, PromptConfig(n_tokens=8, init="vocab", seed=0))
    gen = GenerationConfig(max_new_tokens=24)
    rows = [row_for(smollm, s, p, chat, gen) for s in SOURCES[:3]]
    assert len(rows[0].head) > 30 and prefix_cache.shared_prefix(rows) == len(rows[0].head)
    off = dataclasses.replace(gen, prefix_cache=False)
    assert [generate_rows(smollm, [r], gen)[0] for r in rows] == [generate_rows(smollm, [r], off)[0] for r in rows]
    assert generate_rows(smollm, rows, gen) == generate_rows(smollm, rows, off)
