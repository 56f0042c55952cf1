"""The lean decode step (backends/llama_step.py) against the Hugging Face forward of the same low-bit model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig
from paraphrase_ray.data import SAMPLE_PATH
from paraphrase_ray.generation.backends.llama_step import StaticKV, llama_step
from paraphrase_ray.generation.backends.lowbit import generation_model
from paraphrase_ray.generation.generate import build_batch, generate_rows, row_for
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

SOURCES = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[:4]]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_lean_logits_match_the_hf_forward_padded_batch_and_multi_token(smollm):
    model, path = generation_model(smollm, "auto")
    lean = llama_step(model)
    assert path == "q4" and lean is not None
    rows = [row_for(smollm, s, None, TemplateConfig(), GenerationConfig()) for s in SOURCES[:3]]
    x, mask = build_batch(smollm, rows)  # mixed lengths: left padding
    assert not bool(mask.all())
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        res = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    hf_cache = res.past_key_values
    kv = StaticKV.from_hf(hf_cache, 16)
    nxt, attn, p = res.logits[:, -1].argmax(-1), mask, pos[:, -1:]
    for _ in range(3):  # one token per row per step, with padding
        attn, p = torch.cat([attn, attn.new_ones(3, 1)], 1), p + 1
        with torch.no_grad():
            ref = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=p, past_key_values=hf_cache,
                        use_cache=True, logits_to_keep=1).logits[:, -1]
        ours = lean(nxt[:, None], p, attn, kv)[:, -1]
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
        nxt = ref.argmax(-1)
    # several tokens at once on one unpadded row (what a lookup verify pass feeds), causal among themselves
    x0, _ = build_batch(smollm, rows[:1])
    with torch.no_grad():
        c0 = model(inputs_embeds=x0, use_cache=True, logits_to_keep=1).past_key_values
        kv0 = StaticKV.from_hf(c0, 8)
        n0 = x0.shape[1]
        feed, fpos = torch.tensor([[504, 279, 3145, 28]]), torch.arange(n0, n0 + 4)[None]
        ref = model(input_ids=feed, position_ids=fpos, past_key_values=c0, use_cache=True, logits_to_keep=4).logits[0]
    ours = lean(feed, fpos, None, kv0, keep=4)[0]  # (4, vocab)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all() and kv0.length == n0 + 4
    kv0.crop(-3)  # what lookup does with rejected drafts
    assert kv0.length == n0 + 1


def test_greedy_lookup_and_sampled_tokens_equal_with_and_without_lean(smollm, monkeypatch):
    import paraphrase_ray.generation.decode as loop
    import paraphrase_ray.generation.lookup as lookup

    prompt = SoftPrompt.init(smollm.model, smollm.tokenizer, PromptConfig(n_tokens=6, init="vocab", seed=0))
    chat = TemplateConfig(prefix="Paraphrase the following sentence. Reply with the paraphrase only.\n\n", chat=True)
    gen = GenerationConfig(max_new_tokens=20)
    rows = [row_for(smollm, s, prompt, chat, gen) for s in SOURCES]
    cold = dataclasses.replace(gen, do_sample=True, num_return_sequences=2, temperature=1e-6)

    def run():
        return ([generate_rows(smollm, [r], gen)[0] for r in rows],  # lookup, batch 1
                generate_rows(smollm, rows, gen),  # greedy batch, padded
                generate_rows(smollm, rows[:2], cold))  # sampled candidates
    with_lean = run()
    calls = []
    real = llama_step
    monkeypatch.setattr(loop, "llama_step", lambda m: calls.append(1) and None)
    monkeypatch.setattr(lookup, "llama_step", lambda m: calls.append(1) and None)
    without = run()
    assert calls and real(generation_model(smollm, "auto")[0]) is not None
    assert with_lean == without
    from paraphrase_ray.generation.generate import engine_label  # what --stats and the summary line report

    assert engine_label(smollm, gen, 1) == "q4+lean+prefix-cache+lookup"
    assert engine_label(smollm, gen, 4) == engine_label(smollm, cold, 1) == "q4+lean+prefix-cache"
    assert engine_label(smollm, dataclasses.replace(gen, num_beams=2), 1) == "q4+hf-generate"
    assert with_lean[0] == with_lean[1] and with_lean[2] == [c * 2 for c in with_lean[1][:2]]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_tiny_llama_lean_step_matches_hf_forward_head_dim_16():
    """A 2-layer random Llama rounded to Q4_1 blocks (head_dim 16: the attention's scalar path, GQA 4:2), no
    embedded model needed: padded one-token steps and a causal multi-token pass against the HF forward."""
    from test_lowbit import tiny_llama

    from paraphrase_ray.generation.backends.lowbit import load_kernels, quantize_for_generation

    if load_kernels() is None:
        pytest.skip("low-bit kernel unavailable here")
    model, path = quantize_for_generation(tiny_llama(seed=3), "q4")
    lean = llama_step(model)
    assert path == "q4" and lean is not None
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = res.past_key_values
        kv = StaticKV.from_hf(cache, 8)
        nxt, p = res.logits[:, -1].argmax(-1), pos[:, -1:]
        for _ in range(3):
            mask, p = torch.cat([mask, mask.new_ones(2, 1)], 1), p + 1
            ref = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=p, past_key_values=cache,
                        use_cache=True).logits[:, -1]
            ours = lean(nxt[:, None], p, mask, kv)[:, -1]
            assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
            nxt = ref.argmax(-1)
        one = model(input_ids=ids[:1], use_cache=True).past_key_values  # row 0 alone, then 3 tokens at once
        kv1 = StaticKV.from_hf(one, 4)
        feed, fpos = torch.tensor([[5, 17, 42]]), torch.arange(7, 10)[None]
        ref = model(input_ids=feed, position_ids=fpos, past_key_values=one, use_cache=True).logits[0]
    ours = lean(feed, fpos, None, kv1, keep=3)[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
