"""Sliding-window attention (Gemma 3) through every cache path: the same tokens as Hugging Face ``generate``.

The tiny random Gemma 3 of conftest has a window of 8 positions; every sequence here is several times longer, so
a path that kept keys outside the window, lost keys inside it, or counted pads differently would change tokens.
The paths: our loop (``decode``), the shared-prefix cache (single rows and padded batches), prompt lookup (its
crops), sampled candidates with and without the prefix cache; the static caches (``StaticKV`` of the lean Llama
step, the CUDA-graph buckets) decline the model and fall back to the plain forward.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import WINDOW

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.generation import lookup, prefix_cache
from paraphrase_ray.generation.backends.cuda_graphs import graph_engine
from paraphrase_ray.generation.backends.llama_step import StaticKV, llama_step
from paraphrase_ray.generation.generate import (
    build_batch,
    clean_text,
    engine_label,
    generate_rows,
    hf_generate,
    row_for,
)
from paraphrase_ray.generation.rules import DecodeRules
from paraphrase_ray.models import sliding_window
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

T = TemplateConfig(prefix="Rewrite the next sentence in other words: ")
# sources of different lengths (a batch of them is padded) -- every row far longer than the window
SOURCES = [" ".join(json.loads(line)["source"].split()[: 3 + 2 * i])
           for i, line in enumerate(SAMPLE_PATH.read_text().splitlines()[:6])]
# no copy bans: the random model's drafts from the source then get checked (and mostly rejected: crops)
GEN = GenerationConfig(max_new_tokens=20, max_new_tokens_ratio=10.0, stop_at_newline=False,
                       source_no_repeat_ngram_size=0, fact_guard=False, quantize="none")
PATHS = {
    "loop": dict(prompt_lookup=0, prefix_cache=False),
    "loop+prefix-cache": dict(prompt_lookup=0),
    "lookup": dict(prefix_cache=False),
    "lookup+prefix-cache": {},
}


def _rows(loaded, gen=GEN):
    prompt = SoftPrompt.init(loaded.model, loaded.tokenizer, PromptConfig(n_tokens=3, init="random", seed=1))
    return [row_for(loaded, s, prompt, T, gen) for s in SOURCES]


def _hf(loaded, rows, gen=GEN, model=None) -> list[str]:
    """HF ``generate`` without a KV cache: every step attends over the whole sequence through HF's own masks."""
    x, mask = build_batch(loaded, rows)
    out = hf_generate(loaded, x, mask, rows, gen, DecodeRules.build(gen, loaded.tokenizer, loaded.device), False, model)
    return [clean_text(loaded.tokenizer.decode(o[: r.max_new_tokens], skip_special_tokens=True)) for o, r in zip(out, rows)]


def test_the_window_is_found_and_matters(tiny_gemma, tiny):
    assert sliding_window(tiny_gemma.model) == WINDOW and sliding_window(tiny.model) is None
    rows = _rows(tiny_gemma)
    assert min(r.prompt.n_tokens + len(r.ids) for r in rows) > 4 * WINDOW
    assert len({len(r.ids) for r in rows}) > 1  # a batch of them is padded
    # the same weights attending to everything give other tokens: a path that ignored the window would show
    model = tiny_gemma.model
    wide = type(model)(_no_window(model.config)).eval()
    wide.load_state_dict(model.state_dict())
    assert _hf(tiny_gemma, rows) != _hf(tiny_gemma, rows, model=wide)


def _no_window(cfg):
    c = type(cfg).from_dict(cfg.to_dict())
    c.sliding_window, c.layer_types = 10_000, ["full_attention"] * c.num_hidden_layers
    return c


@pytest.mark.parametrize("path", list(PATHS))
def test_every_cache_path_gives_hf_tokens_past_the_window(tiny_gemma, path):
    prefix_cache.clear()
    gen = dataclasses.replace(GEN, **PATHS[path])
    rows = _rows(tiny_gemma, gen)
    ref_single = [_hf(tiny_gemma, [r])[0] for r in rows]
    assert _hf(tiny_gemma, rows) == ref_single  # HF itself: padding does not change a row's tokens
    assert [generate_rows(tiny_gemma, [r], gen)[0][0] for r in rows] == ref_single
    assert [c[0] for c in generate_rows(tiny_gemma, rows, gen)] == ref_single  # padded batch
    assert sum(len(tiny_gemma.tokenizer(t)["input_ids"]) for t in ref_single) > 3 * len(rows)  # real continuations


def test_padded_batches_past_the_window_share_no_prefix(tiny_gemma):
    rows = _rows(tiny_gemma)
    head = len(rows[0].head)
    assert prefix_cache.shared_prefix(rows) == head  # no window given: the cache would be used...
    assert prefix_cache.shared_prefix(rows, WINDOW) == 0  # ...but pads between prefix and rest would shift the window
    same_length = [r for r in rows if len(r.ids) == len(rows[-1].ids)]
    assert len(same_length) >= 2 and prefix_cache.shared_prefix(same_length, WINDOW) == head  # no pads: exact
    assert prefix_cache.shared_prefix(rows, 10_000) == head  # everything fits the window: exact


def test_lookup_crops_a_full_window(tiny_gemma, monkeypatch):
    """Lookup runs on the window model (drafts rejected after the window is full: the crop records past states)."""
    assert lookup.applies(tiny_gemma.model)
    calls = []
    real = lookup.lookup_decode
    monkeypatch.setattr(lookup, "lookup_decode", lambda *a, **k: calls.append(k.get("stats")) or real(*a, **k))
    rows = _rows(tiny_gemma)
    assert generate_rows(tiny_gemma, rows[:1], GEN)[0][0] == _hf(tiny_gemma, rows[:1])[0]
    assert calls  # the lookup path ran
    assert engine_label(tiny_gemma, GEN, 1) == "fp32+prefix-cache+lookup"


def test_sampled_candidates_with_and_without_the_prefix_cache(tiny_gemma):
    prefix_cache.clear()
    gen = dataclasses.replace(GEN, do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=3, seed=5)
    rows = _rows(tiny_gemma, gen)
    on = generate_rows(tiny_gemma, rows[-2:], gen)  # two rows of one length: the prefix cache is used
    off = generate_rows(tiny_gemma, rows[-2:], dataclasses.replace(gen, prefix_cache=False))
    assert on == off and len(on[0]) == 3
    assert generate_rows(tiny_gemma, rows, gen) == generate_rows(tiny_gemma, rows, dataclasses.replace(gen, prefix_cache=False))


def test_static_caches_decline_sliding_windows(tiny_gemma):
    model = tiny_gemma.model
    rows = _rows(tiny_gemma)
    x, _ = build_batch(tiny_gemma, rows[:1])
    with torch.no_grad():
        cache = model(inputs_embeds=x, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="full-attention layers only"):
        StaticKV.from_hf(cache, 4)  # its buffers would attend to every cached position
    assert llama_step(model) is None
    assert graph_engine(model, "eager") is None  # no static-cache bucket: the plain forward
    eager = dataclasses.replace(GEN, cuda_graphs="eager", prompt_lookup=0)
    assert "static-cache" not in engine_label(tiny_gemma, eager, len(rows))
    assert [c[0] for c in generate_rows(tiny_gemma, rows, eager)] == [_hf(tiny_gemma, [r])[0] for r in rows]
