"""Gemma scales its input embeddings by sqrt(d_model) inside the embedding module: a prompt lives in the module's
output space (what ``embed(ids)`` gives and PEFT prepends), so init, explain and PEFT must all use that space.
On the tiny random Gemma 3 of conftest (d = 32: scale ~5.66); the real gemma3-270m is not needed."""

from __future__ import annotations

import math

import pytest
import torch

from paraphrase_ray.config import PromptConfig
from paraphrase_ray.prompt.explain import explain_prompt
from paraphrase_ray.prompt.soft_prompt import SoftPrompt, embedding_scale


def test_scale_is_measured_from_the_module(tiny_gemma, tiny):
    assert embedding_scale(tiny_gemma.model.get_input_embeddings()) == pytest.approx(math.sqrt(32), rel=1e-6)
    assert embedding_scale(tiny.model.get_input_embeddings()) == 1.0  # a plain nn.Embedding


@pytest.mark.parametrize("init", ["vocab", "text"])
def test_token_inits_are_rows_as_the_model_embeds_them(tiny_gemma, init):
    emb = tiny_gemma.model.get_input_embeddings()
    sp = SoftPrompt.init(tiny_gemma.model, tiny_gemma.tokenizer, PromptConfig(n_tokens=4, init=init, seed=2))
    with torch.no_grad():
        table = emb(torch.arange(emb.weight.shape[0]))  # (V, d), scaled
    # every prompt vector is one embedded token (not the raw, 5.66x shorter table row)
    dist = torch.cdist(sp.weight.detach(), table, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert dist.max() < 1e-4 * table.norm(dim=1).median()
    exp = explain_prompt(sp, emb, tiny_gemma.tokenizer, top_k=1, metric="l2")  # the module: its scaled table
    assert all(p["neighbours"][0]["distance"] < 1e-3 for p in exp["positions"])
    assert exp["embedding_norm_median"] == pytest.approx(table.norm(dim=1).median().item(), rel=1e-4)


def test_random_std_matches_the_embedded_scale(tiny_gemma):
    emb = tiny_gemma.model.get_input_embeddings()
    sp = SoftPrompt.init(tiny_gemma.model, tiny_gemma.tokenizer, PromptConfig(n_tokens=64, init="random_std"))
    scaled_std = emb.weight.std().item() * embedding_scale(emb)
    assert sp.weight.std().item() == pytest.approx(scaled_std, rel=0.15)


def test_peft_reads_our_gemma_prompt_with_the_same_logits(tiny_gemma, tmp_path):
    from peft import PeftModel

    sp = SoftPrompt.init(tiny_gemma.model, tiny_gemma.tokenizer, PromptConfig(n_tokens=5, init="vocab", seed=1))
    sp.save(tmp_path, "tiny-gemma", tiny_gemma.model)
    enc = tiny_gemma.tokenizer(["The cat sat on the mat by the door.", "It rained."], return_tensors="pt",
                               padding=True)
    with torch.no_grad():
        emb = tiny_gemma.model.get_input_embeddings()(enc["input_ids"])
        x = torch.cat([sp.expand(2, emb.dtype), emb], dim=1)
        mask = torch.cat([torch.ones(2, 5, dtype=torch.long), enc["attention_mask"]], dim=1)
        ours = tiny_gemma.model(inputs_embeds=x, attention_mask=mask).logits[:, 5:]
        theirs = PeftModel.from_pretrained(tiny_gemma.model, str(tmp_path))(**enc).logits[:, 5:]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
