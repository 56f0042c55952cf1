"""Shared fixtures: tiny random models built from configs (no downloads) and the embedded SmolLM2.

``tiny_model_dir`` is a real Hugging Face model directory (config.json + safetensors + tokenizer), so tests
exercise the same ``load_model(path)`` path users take with a local directory. Its OPT config has
``word_embed_proj_dim`` (16) != ``hidden_size`` (32), like OPT-350m, so prompt sizing is checked everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SHARED_MRPC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mrpc" / "train.jsonl"


def build_tiny_tokenizer(out_dir: Path):
    """Byte-level BPE (vocab ~300) trained on the bundled sample; adds a BOS like OPT's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from paraphrase_ray.data import SAMPLE_PATH

    texts = []
    for line in SAMPLE_PATH.read_text().splitlines():
        row = json.loads(line)
        texts += [row["source"], row["target"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts + ["Paraphrase:\n"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_opt(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, init_std=0.3,  # larger than default so a prompt can move the loss
    )
    model = OPTForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture()
def tiny(tiny_model_dir):
    """A freshly loaded (uncached) tiny OPT in fp32 on CPU."""
    from paraphrase_ray.models import load_model

    return load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (first use converts the GGUF once, ~45 s on 2 cores)."""
    from paraphrase_ray.models import load_model

    return load_model("smollm2-135m", precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def mrpc_path() -> Path:
    if not SHARED_MRPC.is_file():
        pytest.skip(f"{SHARED_MRPC} not present (CI places ../shared beside the checkout)")
    return SHARED_MRPC


# Fixtures that load the embedded 135M model or start a real Ray (or Serve): every test that uses one, directly
# or through another fixture, is marked slow, so `pytest -m "not slow"` is the fast inner loop.
SLOW_FIXTURES = frozenset({"smollm", "ray_cluster", "server", "client", "app_url"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
