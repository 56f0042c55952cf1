"""SoftPrompt: init strategies, freezing, PEFT-format save/load and its failure modes."""

from __future__ import annotations

import json

import pytest
import torch

from paraphrase_ray.config import PromptConfig, RunConfig, TrainConfig
from paraphrase_ray.errors import PromptFileError
from paraphrase_ray.prompt.soft_prompt import SoftPrompt, frequent_token_ids, trainable_parameters
from paraphrase_ray.training.trainer import train


def test_vocab_init_copies_common_token_embeddings(tiny):
    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=7, init="vocab", vocab_top_k=50))
    table = tiny.model.get_input_embeddings().weight.float()
    # the tiny tokenizer's special tokens are ids 0-3; the 50 "most common" are the 50 lowest ids after them
    assert tiny.tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "!"]
    common = set(range(4, 54))
    assert set(frequent_token_ids(tiny.tokenizer, table.shape[0], 50).tolist()) == common
    assert sp.weight.shape == (7, tiny.embed_dim) == (7, 16)  # word_embed_proj_dim, not hidden_size (32)
    for row in sp.weight:
        matches = (table == row).all(dim=1).nonzero().flatten().tolist()
        assert matches and set(matches) & common
    assert not set(common) & set(tiny.tokenizer.all_special_ids)


def test_random_inits_have_the_requested_scale(tiny):
    r = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=50, init="random"))
    assert r.weight.abs().max() <= 0.5 and r.weight.abs().max() > 0.4
    rs = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=50, init="random_std"))
    table_std = tiny.model.get_input_embeddings().weight.std().item()
    assert rs.weight.std().item() == pytest.approx(table_std, rel=0.25)


def test_text_init_repeats_or_cuts_the_text(tiny):
    text = "Paraphrase the following sentence:"
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = tiny.model.get_input_embeddings().weight.float()
    long = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=len(ids) + 3, init="text", init_text=text))
    assert torch.equal(long.weight[: len(ids)], table[ids])
    assert torch.equal(long.weight[len(ids) :], table[ids[:3]])
    short = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=2, init="text", init_text=text))
    assert torch.equal(short.weight, table[ids[:2]])


def test_init_is_deterministic_by_seed(tiny):
    a = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(init="vocab", seed=3))
    b = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(init="vocab", seed=3))
    c = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(init="vocab", seed=4))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_only_the_prompt_trains_and_base_weights_stay_bit_identical(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    assert all(not p.requires_grad for p in tiny.model.parameters())
    cfg = RunConfig(model="tiny", prompt=PromptConfig(n_tokens=5),
                    train=TrainConfig(steps=4, eval_every=2, lr=0.1, progress=False, warmup_steps=0))
    result = train(tiny, cfg, out_dir=tmp_path / "p")
    assert trainable_parameters(result.prompt, tiny.model) == 5 * tiny.embed_dim
    assert [n for n, p in tiny.model.named_parameters() if p.requires_grad] == []
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    init = SoftPrompt.init(tiny.model, tiny.tokenizer, cfg.prompt)
    assert not torch.equal(init.weight, result.prompt.weight)  # the prompt did move


def test_save_load_roundtrip_and_peft_layout(tiny, tmp_path):
    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4))
    sp.save(tmp_path, "my-base", tiny.model, {"metrics": {"objective": 0.5}})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4 and cfg["token_dim"] == 16
    meta = json.loads((tmp_path / "paraphrase_ray.json").read_text())
    assert meta["base_model"] == "my-base" and meta["metrics"]["objective"] == 0.5
    loaded = SoftPrompt.load(tmp_path, expected_dim=16)
    assert torch.equal(loaded.weight, sp.weight)


def test_load_rejects_wrong_width_corrupt_and_missing(tiny, tmp_path):
    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4))
    sp.save(tmp_path / "ok", "base", tiny.model)
    with pytest.raises(PromptFileError, match="embedding width 16 .* 32 wide"):
        SoftPrompt.load(tmp_path / "ok", expected_dim=32)
    with pytest.raises(PromptFileError, match="not found"):
        SoftPrompt.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    sp.save(bad, "base", tiny.model)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(PromptFileError, match="truncated or corrupt"):
        SoftPrompt.load(bad)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"prompt_embeddings": sp.weight}, pickled / "adapter_model.bin")
    with pytest.raises(PromptFileError, match="no adapter_model.safetensors"):
        SoftPrompt.load(pickled)
