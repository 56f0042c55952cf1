"""A prompt we save loads in PEFT and gives the same logits as our forward pass."""

from __future__ import annotations

import torch

from paraphrase_ray.config import PromptConfig
from paraphrase_ray.prompt import SoftPrompt


def test_peft_loads_our_prompt_and_matches_logits(tiny, tmp_path):
    from peft import PeftModel

    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=6, init="random", seed=1))
    sp.save(tmp_path, "tiny", tiny.model)
    enc = tiny.tokenizer(["The cat sat on the mat.", "It rained."], return_tensors="pt", padding=True)
    with torch.no_grad():
        emb = tiny.model.get_input_embeddings()(enc["input_ids"])
        x = torch.cat([sp.expand(2, emb.dtype), emb], dim=1)
        mask = torch.cat([torch.ones(2, 6, dtype=torch.long), enc["attention_mask"]], dim=1)
        ours = tiny.model(inputs_embeds=x, attention_mask=mask).logits[:, 6:]
        peft_model = PeftModel.from_pretrained(tiny.model, str(tmp_path))
        theirs = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 6:]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
