"""Prompt-lookup drafting (lookup.py) gives decode.decode's tokens, with fewer forward passes when drafts hit."""

from __future__ import annotations

import dataclasses
import json

import pytest

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.generation.decode import decode
from paraphrase_ray.generation.generate import (
    build_batch,
    generate_rows,
    row_for,
)
from paraphrase_ray.generation.lookup import draft_tokens, lookup_decode
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import DecodeRules, newline_token_ids
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

T = TemplateConfig()
SOURCES = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[:6]]


def test_draft_tokens_follow_the_latest_match():
    src = [5, 6, 7, 5, 8, 9]
    assert draft_tokens([1, 5], src, 2) == [8, 9]  # the latest 5 in the source
    assert draft_tokens([1, 9], src, 3) == []  # nothing follows it
    assert draft_tokens([4], src, 3) == [] and draft_tokens([], src, 3) == [] and draft_tokens([5], src, 0) == []


def _free_run(tiny, prompt, source, n=20):
    """The model's own greedy continuation of ``source``: as a 'source' to draft from, it is often right."""
    x, mask = build_batch(tiny, [row_for(tiny, source, prompt, T, GenerationConfig())])
    ids = decode(tiny.model, x, mask, [Row.bare(n)], DecodeRules(pad_id=tiny.tokenizer.pad_token_id))[0].tolist()
    return tiny.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("rules", ["defaults", "no-blocking", "penalty-and-no-repeat-2"])
def test_lookup_gives_the_plain_loops_tokens(tiny, rules):
    prompts = [SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=n, init="random", seed=n))
               for n in (3, 6)]
    gen = GenerationConfig(max_new_tokens=20, max_new_tokens_ratio=10.0, stop_at_newline=False)
    if rules == "no-blocking":  # drafts copied from the source are then allowed, and get accepted
        gen = dataclasses.replace(gen, source_no_repeat_ngram_size=0, fact_guard=False, no_repeat_ngram_size=0)
    if rules == "penalty-and-no-repeat-2":
        gen = dataclasses.replace(gen, source_repetition_penalty=1.3, no_repeat_ngram_size=2)
    tok = tiny.tokenizer
    stats: dict = {}
    cases = [(s, [prompts[0], prompts[1], None][i % 3], None) for i, s in enumerate(SOURCES)]  # mixed prompts
    cases += [(s, prompts[0], _free_run(tiny, prompts[0], s)) for s in SOURCES]  # drafts that greedy agrees with
    for i, (source, prompt, drafts_from) in enumerate(cases):
        row = row_for(tiny, source, prompt, T, gen)
        if drafts_from and drafts_from.strip():  # the model reads `source`; bans and drafts come from its free run
            row = dataclasses.replace(row_for(tiny, drafts_from, prompt, T, gen), ids=row.ids)
        x, mask = build_batch(tiny, [row])
        # gen's rules, eos and the newline ids, 4 draft tokens per verify pass
        rules = dataclasses.replace(DecodeRules.build(gen, tok, x.device), newline_ids=newline_token_ids(tok), lookup=4)
        plain = decode(tiny.model, x, mask, [row], rules)[0].tolist()
        fast = lookup_decode(tiny.model, x, row, rules, stats=stats)[0].tolist()
        plain = plain[: len(fast)] if len(plain) > len(fast) and all(t == tok.pad_token_id for t in plain[len(fast):]) else plain
        assert fast == plain, (rules, i)
    assert stats["tokens"] > 0 and stats["passes"] < stats["tokens"]
    if rules == "no-blocking":
        assert stats["accepted"] > 0 and stats["passes"] + stats["accepted"] <= stats["tokens"]


def test_generate_rows_uses_lookup_for_one_row_only(tiny, monkeypatch):
    import paraphrase_ray.generation.lookup as lookup

    calls = []
    real = lookup.lookup_decode
    monkeypatch.setattr(lookup, "lookup_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="random", seed=1))
    gen = GenerationConfig(max_new_tokens=12, prompt_lookup=4)
    rows = [row_for(tiny, s, p, T, gen) for s in SOURCES[:3]]
    alone = [generate_rows(tiny, [r], gen)[0] for r in rows]
    assert len(calls) == 3
    batched = generate_rows(tiny, rows, gen)  # a batch: the plain loop, the same text
    assert len(calls) == 3 and batched == alone
    assert alone == [generate_rows(tiny, [r], dataclasses.replace(gen, prompt_lookup=0))[0] for r in rows]
