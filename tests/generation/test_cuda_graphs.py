"""The static-cache decode step (backends/cuda_graphs.py) gives the plain loop's tokens; its buckets are reused and bounded.

Capture needs CUDA; on CPU ``cuda_graphs: eager`` runs the very step the graph would replay (same buffers, same
StaticCache, same dummy rows), so these tests check everything but the replay itself. gpu_suite.sh measures
the replay on a GPU, and the engine checks every captured graph against the eager step before using it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.generation import prefix_cache
from paraphrase_ray.generation.backends import cuda_graphs as graph_step
from paraphrase_ray.generation.decode import decode
from paraphrase_ray.generation.generate import engine_label, generate_rows, row_for
from paraphrase_ray.generation.rows import Row
from paraphrase_ray.generation.rules import DecodeRules
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

T = TemplateConfig(prefix="Rewrite the next sentence in other words, keeping every fact: ")
SOURCES = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[:6]]
GEN = GenerationConfig(max_new_tokens=12, max_new_tokens_ratio=10.0, stop_at_newline=False, prompt_lookup=0)


def _bare(*limits):
    """Rows that carry only their length limits (the embeddings are built here, not from sources)."""
    return [Row.bare(n) for n in limits]


def _left_padded(model, tok, texts):
    enc = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros(len(enc), width, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
    return model.get_input_embeddings()(ids), mask


@torch.no_grad()
def test_static_step_gives_the_plain_loops_tokens_with_left_padding_and_mixed_lengths(tiny):
    x, mask = _left_padded(
        tiny.model, tiny.tokenizer, SOURCES[:3]
    )  # 3 rows -> a 4-row bucket (one dummy row)
    rows, kw = _bare(14, 6, 14), dict(pad_id=tiny.tokenizer.pad_token_id, stop_ids=[tiny.tokenizer.eos_token_id])
    plain = decode(tiny.model, x, mask, rows, DecodeRules(graphs="off", **kw))
    static = decode(tiny.model, x, mask, rows, DecodeRules(graphs="eager", **kw))
    assert torch.equal(plain, static)
    assert plain.shape[1] == 14 and (plain != tiny.tokenizer.pad_token_id).any()
    # the bucket: rows rounded up to a power of two, capacity to a multiple of 64
    engine = graph_step.graph_engine(tiny.model, "eager")
    cap = -(-(x.shape[1] + 14 + 1) // 64) * 64  # prompt + steps + 1, rounded up
    assert list(engine.buckets) == [(4, cap)] and not engine.capture


@torch.no_grad()
def test_static_step_on_a_llama_with_grouped_query_attention():
    from test_lowbit import tiny_llama

    model = tiny_llama(exact=False).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, model.config.hidden_size, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    rows, kw = _bare(10, 10), dict(pad_id=0, use_lean=False)
    assert torch.equal(
        decode(model, x, mask, rows, DecodeRules(graphs="off", **kw)),
        decode(model, x, mask, rows, DecodeRules(graphs="eager", **kw)),
    )


def test_through_generate_rows_prefix_cache_and_sampled_candidates(tiny):
    """The real entry point: the prefix cache's past is adopted into the static cache, and k sampled candidates
    per row (the cache copied k times before adoption) draw the same tokens as the plain loop at the same seed."""
    prefix_cache.clear()
    p = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="random", seed=1))
    rows = [row_for(tiny, s, p, T, GEN) for s in SOURCES]
    eager, off = (dataclasses.replace(GEN, cuda_graphs=m) for m in ("eager", "off"))
    assert generate_rows(tiny, rows, eager) == generate_rows(tiny, rows, off)
    sampled_eager = dataclasses.replace(eager.with_candidates(4), seed=3)
    sampled_off = dataclasses.replace(off.with_candidates(4), seed=3)
    torch.manual_seed(0)
    a = generate_rows(tiny, rows[:3], sampled_eager)
    torch.manual_seed(0)
    b = generate_rows(tiny, rows[:3], sampled_off)
    assert a == b and all(len(c) == 4 for c in a)
    assert engine_label(tiny, eager, len(rows)).endswith("+static-cache")
    assert "static-cache" not in engine_label(tiny, off, len(rows))
    assert "cuda-graphs" not in engine_label(tiny, GEN, len(rows))  # auto: CUDA only


@torch.no_grad()
def test_buckets_are_reused_and_bounded(tiny, monkeypatch):
    engine = graph_step.GraphEngine(tiny.model, capture=False)
    monkeypatch.setattr(graph_step, "MAX_BUCKETS", 2)
    x, mask = _left_padded(tiny.model, tiny.tokenizer, SOURCES[:2])
    out = tiny.model(inputs_embeds=x, attention_mask=mask, use_cache=True)
    n = x.shape[1]
    room = -(-n // 64) * 64 - n  # steps that fit the smallest capacity above n
    for extra in (1, room, room + 64, room + 128):  # the first bucket is reused, then evicted
        b = engine.start(out.past_key_values, mask, extra)
        assert b.get_seq_length() == n and b.rows == 2
        b.release()
    cap = n + room
    assert list(engine.buckets) == [(2, cap + 64), (2, cap + 128)]
    b = engine.start(out.past_key_values, mask, room)  # the smallest free bucket with room (<= 2x the need)
    assert b.cap == cap + 64 and list(engine.buckets) == [(2, cap + 128), (2, cap + 64)]
    other = engine.start(
        out.past_key_values, mask, room
    )  # b is in use (another thread's decode): never shared
    assert other is not b
    step = (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), None)
    for _ in range(b.cap - n):
        b.step(*step)
    with pytest.raises(RuntimeError, match="static cache full"):
        b.step(*step)


def test_graphs_off_where_they_cannot_apply(tiny):
    assert graph_step.graph_engine(tiny.model, "auto") is None  # a CPU model: no capture
    assert graph_step.graph_engine(tiny.model, "off") is None
    assert graph_step.row_bucket(1) == 1 and graph_step.row_bucket(3) == 4 and graph_step.row_bucket(64) == 64
    with pytest.raises(ConfigError, match="cuda_graphs"):
        GenerationConfig(cuda_graphs="always")


@torch.no_grad()
def test_a_graph_that_cannot_be_captured_falls_back_to_the_eager_static_step(tiny, monkeypatch, caplog):
    """Capture fails here (no CUDA): the engine records why, warns once, and decodes eagerly with the same tokens."""
    import paraphrase_ray.generation.decode as D

    engine = graph_step.GraphEngine(tiny.model, capture=True)
    monkeypatch.setattr(D, "graph_engine", lambda model, mode: engine)
    x, mask = _left_padded(tiny.model, tiny.tokenizer, SOURCES[:2])
    rows, kw = _bare(10, 10), dict(pad_id=tiny.tokenizer.pad_token_id)
    with caplog.at_level("WARNING", logger="paraphrase_ray.generation.backends.cuda_graphs"):
        fallback = decode(tiny.model, x, mask, rows, DecodeRules(**kw))
    assert engine.disabled and "CUDA graphs off" in caplog.text
    assert all(b.graph is None for b in engine.buckets.values())
    assert torch.equal(fallback, decode(tiny.model, x, mask, rows, DecodeRules(graphs="off", **kw)))


@torch.no_grad()
def test_a_batch_too_big_for_a_bucket_takes_the_plain_forward(tiny, monkeypatch):
    engine = graph_step.GraphEngine(tiny.model, capture=False)
    x, mask = _left_padded(tiny.model, tiny.tokenizer, SOURCES[:2])
    out = tiny.model(inputs_embeds=x, attention_mask=mask, use_cache=True)
    need = graph_step.cache_bytes(out.past_key_values, 2, 128)
    monkeypatch.setattr(graph_step, "MAX_BUCKET_BYTES", need - 1)
    assert engine.start(out.past_key_values, mask, 128 - x.shape[1]) is None and not engine.buckets
    monkeypatch.setattr(graph_step, "MAX_BUCKET_BYTES", need)
    monkeypatch.setattr(graph_step, "MAX_TOTAL_BYTES", need)  # room for one: the next evicts it
    engine.start(out.past_key_values, mask, 128 - x.shape[1]).release()
    engine.start(out.past_key_values, mask, 1)
    assert len(engine.buckets) == 1 and engine.bytes() <= need


@torch.no_grad()
def test_each_decode_hands_its_bucket_back(tiny):
    """decode releases its bucket when it ends (normally or not), so the next call reuses the graph."""
    engine = graph_step.graph_engine(tiny.model, "eager")
    x, mask = _left_padded(tiny.model, tiny.tokenizer, SOURCES[:2])
    rows, rules = _bare(6, 6), DecodeRules(pad_id=tiny.tokenizer.pad_token_id, graphs="eager")
    first = decode(tiny.model, x, mask, rows, rules)
    assert len(engine.buckets) == 1 and not any(b.busy for b in engine.buckets.values())
    broken = [dataclasses.replace(r, guard=object()) for r in rows]
    with pytest.raises(AttributeError):  # a decode that fails midway (a broken guard) still hands it back
        decode(tiny.model, x, mask, broken, dataclasses.replace(rules, fact_guard=True))
    assert not any(b.busy for b in engine.buckets.values())
    assert (
        torch.equal(first, decode(tiny.model, x, mask, rows, rules))
        and len(engine.buckets) == 1
    )


@torch.no_grad()
def test_a_reused_bucket_keeps_nothing_of_the_previous_decode(tiny):
    """Same bucket, other rows: no key, value or mask of the earlier decode leaks into the next one."""
    rows, kw = _bare(10, 10), dict(pad_id=tiny.tokenizer.pad_token_id)
    a = _left_padded(tiny.model, tiny.tokenizer, SOURCES[:2])
    b = _left_padded(
        tiny.model, tiny.tokenizer, [SOURCES[3][:60], SOURCES[4][:40]]
    )  # shorter: stale slots after
    decode(tiny.model, *a, rows, DecodeRules(graphs="eager", **kw))
    engine = graph_step.graph_engine(tiny.model, "eager")
    first = dict(engine.buckets)
    got = decode(tiny.model, *b, rows, DecodeRules(graphs="eager", **kw))
    assert dict(engine.buckets) == first  # the same bucket served both (a larger one fits: no new capture)
    assert torch.equal(got, decode(tiny.model, *b, rows, DecodeRules(graphs="off", **kw)))


def test_engines_go_with_their_model(tiny_model_dir):
    import gc
    import weakref

    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    x, mask = _left_padded(loaded.model, loaded.tokenizer, SOURCES[:2])
    with torch.no_grad():
        decode(loaded.model, x, mask, _bare(4, 4), DecodeRules(pad_id=0, graphs="eager"))
    assert graph_step.graph_engine(loaded.model, "eager").buckets
    ref = weakref.ref(loaded.model)
    del loaded, x, mask
    gc.collect()
    assert ref() is None  # nothing global keeps the model (or its static caches) alive


@torch.no_grad()
def test_sliding_window_models_take_the_plain_forward():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    model = MistralForCausalLM(cfg).eval()
    x, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long)
    rows = _bare(12, 12)  # past the window: a rolling cache would matter
    assert torch.equal(
        decode(model, x, mask, rows, DecodeRules(graphs="eager")), decode(model, x, mask, rows, DecodeRules(graphs="off"))
    )
    assert graph_step.graph_engine(model, "eager") is None  # told once, then not tried again
