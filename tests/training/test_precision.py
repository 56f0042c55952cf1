"""Training precision (paraphrase_ray/training/precision.py): the probe's decision is honoured and recorded, bf16
training reaches the fp32 run's loss, and generation after bf16 training in the same process is still exact.

The decision is forced through the threshold (``decide(threshold=...)`` or ``$PARAPHRASE_RAY_BF16_MIN_SPEEDUP``):
the real probe runs on this CPU's real kernels every time; only the bar it must clear is set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from paraphrase_ray.config import GenerationConfig, PromptConfig, RunConfig, TemplateConfig, TrainConfig
from paraphrase_ray.data import SAMPLE_PATH, load_pairs
from paraphrase_ray.models import LoadedModel, freeze
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.training import precision as prec
from paraphrase_ray.training.loss import validation_loss
from paraphrase_ray.training.trainer import train

BF16, FP32 = "0", "1e9"  # thresholds: any measured speedup clears 0x, none clears 1e9x


def cfg(steps: int = 8, precision: str = "auto", **kw) -> RunConfig:
    base = dict(steps=steps, eval_every=max(1, steps // 2), lr=0.3, batch_size=8, progress=False, warmup_steps=0,
                early_stop_patience=None, precision=precision)
    base.update(kw)
    return RunConfig(model="tiny", prompt=PromptConfig(n_tokens=4, init="random"), train=TrainConfig(**base))


def test_decide_honours_the_threshold_and_records_the_probe(tiny):
    rows = 64
    on, off = (prec.decide(tiny, "auto", rows, threshold=t) for t in (0.0, math.inf))
    assert (on.dtype, off.dtype) == ("bf16", "fp32")
    assert on.probe is off.probe is not None  # one probe per process and shape, cached
    p = on.probe
    assert p.fp32_ms > 0 and p.bf16_ms > 0 and p.speedup == pytest.approx(p.fp32_ms / p.bf16_ms)
    assert (p.d_model, p.d_ff, p.rows) == (32, 64, rows) and p.threads == torch.get_num_threads()
    assert on.label == f"bf16 (probe: {p.speedup:.2f}x fp32, threshold 0x)"
    assert off.record()["probe"]["speedup"] == round(p.speedup, 2)
    # without a threshold, shapes this small are not worth a probe; explicit choices are kept as asked
    small = prec.decide(tiny, "auto", rows)
    assert small.dtype == "fp32" and "too small" in small.why and small.probe is None
    assert prec.decide(tiny, "bf16", rows).label == "bf16 (asked)"
    assert prec.decide(tiny, "fp32", rows).label == "fp32 (asked)"


def test_the_default_threshold_picks_by_the_measured_ratio(tiny, monkeypatch):
    monkeypatch.delenv(prec.MIN_SPEEDUP_ENV, raising=False)
    rows = 2 * prec.MAX_PROBE_ROWS  # capped: the probe measures MAX_PROBE_ROWS rows
    d = prec.decide(dataclass_with_dims(tiny, 256, 1024), "auto", rows)
    assert d.probe is not None and d.probe.rows == prec.MAX_PROBE_ROWS
    assert d.dtype == ("bf16" if d.probe.speedup >= prec.MIN_SPEEDUP else "fp32")
    assert d.why == f"probe: {d.probe.speedup:.2f}x fp32"


def test_a_threshold_that_is_not_a_number_is_a_config_error(tiny, monkeypatch):
    from paraphrase_ray.errors import ConfigError

    monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, "fast")
    with pytest.raises(ConfigError, match=prec.MIN_SPEEDUP_ENV):
        prec.decide(tiny, "auto", 64)


def dataclass_with_dims(loaded: LoadedModel, d: int, ff: int) -> LoadedModel:
    """``loaded`` as the probe sees a model of width ``d`` and MLP width ``ff`` (only the shape is read)."""
    import dataclasses

    fake = nn.Module()
    fake.config = type("Cfg", (), {"hidden_size": d, "intermediate_size": ff})()
    return dataclasses.replace(loaded, model=fake)


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
def test_train_honours_the_decision_and_records_it(tiny, tmp_path, monkeypatch, forced):
    monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, BF16 if forced == "bf16" else FP32)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    result = train(tiny, cfg(), out_dir=tmp_path / "p")
    assert result.precision.dtype == forced and result.precision.why.startswith("probe: ")
    assert result.metrics()["precision"] == result.precision.label
    assert all(e["precision"] == result.precision.label for e in result.history)  # what trials report
    meta = json.loads((tmp_path / "p" / "paraphrase_ray.json").read_text())
    assert meta["train_precision"] == result.precision.label
    assert meta["train_precision_probe"]["speedup"] == round(result.precision.probe.speedup, 2)
    assert meta["metrics"]["precision"] == result.precision.label
    # what ran: bf16 trains on a copy with bf16 Linear layers; the loaded fp32 model is never touched
    module = prec.training_module(tiny, result.precision)
    kinds = {type(m) for m in module.modules()} & {nn.Linear, prec.Bf16Linear}
    assert kinds == ({prec.Bf16Linear} if forced == "bf16" else {nn.Linear})
    assert (module is tiny.model) == (forced == "fp32")
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in tiny.model.named_parameters())


def test_the_train_command_prints_and_saves_the_precision(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from paraphrase_ray.cli.main import main

    monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, BF16)
    out = tmp_path / "p"
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2", "--eval-every", "2",
                 "--n-tokens", "3", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["precision"].startswith("bf16 (probe: ")
    meta = json.loads((out / "paraphrase_ray.json").read_text())
    assert meta["train_precision"] == summary["precision"] and meta["train_config"]["precision"] == "auto"
    from paraphrase_ray.prompt.directory import PromptMeta

    info = PromptMeta.read(out)  # generation does not inherit the training dtype: auto = exact fp32 on CPU
    assert info.precision == "auto" and info.train_precision == summary["precision"]


def test_bf16_training_reaches_the_fp32_loss(tiny, monkeypatch):
    """Same seed, steps and batches; each prompt's validation loss measured on the fp32 weights. Tolerance:
    0.02 nats (~1% of the loss); the training itself moves the loss by ~15x that, so a bf16 run that learned
    less or differently fails."""
    train_pairs, val_pairs, _ = load_pairs(cfg().data)
    runs = {}
    for forced, threshold in (("bf16", BF16), ("fp32", FP32)):
        monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, threshold)
        runs[forced] = train(tiny, cfg(steps=30), train_pairs=train_pairs, val_pairs=val_pairs)
        assert runs[forced].precision.dtype == forced
    from paraphrase_ray.data import encode_pair

    enc = [encode_pair(tiny.tokenizer, p, TemplateConfig(), 64, 64) for p in val_pairs]

    def fp32_val(weight):
        return validation_loss(tiny.model, SoftPrompt(weight), enc, 16, "cpu", tiny.tokenizer.pad_token_id)

    init = SoftPrompt.init(tiny.model, tiny.tokenizer, cfg().prompt).weight
    start, bf16, fp32 = fp32_val(init), fp32_val(runs["bf16"].prompt.weight), fp32_val(runs["fp32"].prompt.weight)
    assert start - fp32 > 0.3  # training moved the loss far more than the tolerance
    assert abs(bf16 - fp32) < 0.02, (start, bf16, fp32)
    assert abs(runs["bf16"].best_val_loss - runs["fp32"].best_val_loss) < 0.02
    # bf16 really ran: the bf16 steps' losses differ from the fp32 steps' (bf16 rounding), if only slightly
    assert runs["bf16"].history[0]["train_loss"] != runs["fp32"].history[0]["train_loss"]


def tiny_llama_loaded(tokenizer) -> LoadedModel:
    """A 2-layer Llama whose Linear weights are exact Q4_1 blocks and embedding Q8_0 (as the embedded SmolLM2's),
    so generation takes the exact low-bit kernel; with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,  # no pad: its zero row wins
    ))
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(_blocks(mod.weight, 15, True))
        emb = model.get_input_embeddings().weight
        emb.copy_(_blocks(emb, 127, False))
    freeze(model)
    return LoadedModel("tiny-llama", model, tokenizer, torch.device("cpu"), torch.float32)


def _blocks(w: torch.Tensor, levels: int, with_min: bool) -> torch.Tensor:
    """``w`` rounded to llama.cpp blocks of 32: Q4_1 (``d * q + m``, q in 0..15) or Q8_0 (``d * q``)."""
    b = w.reshape(w.shape[0], -1, 32)
    lo = b.amin(-1).half().float() if with_min else torch.zeros_like(b[..., 0])
    span = (b.amax(-1) - b.amin(-1)) if with_min else b.abs().amax(-1)
    d = (span / levels).half().float()[..., None]
    q = torch.round((b - lo[..., None]) / d).clamp(0 if with_min else -levels, levels)
    return (d * q + lo[..., None]).reshape(w.shape)


def test_generation_after_bf16_training_is_the_exact_fp32_path(tiny, monkeypatch):
    from paraphrase_ray.generation.backends import lowbit
    from paraphrase_ray.generation.generate import engine_label, paraphrase

    loaded = tiny_llama_loaded(tiny.tokenizer)
    reference = tiny_llama_loaded(tiny.tokenizer)  # the same weights, never trained on
    sources = [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines()[:4]]
    prompt = SoftPrompt.init(loaded.model, loaded.tokenizer, PromptConfig(n_tokens=4, init="random", seed=1))
    t = TemplateConfig()
    exact = paraphrase(reference, sources, prompt, t, GenerationConfig(max_new_tokens=8, quantize="none"))
    assert any(c[0] for c in exact)  # something to compare

    monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, BF16)
    result = train(loaded, cfg(steps=4, batch_size=4))
    assert result.precision.dtype == "bf16"
    module = prec.training_module(loaded, result.precision)
    assert module is not loaded.model and any(isinstance(m, prec.Bf16Linear) for m in module.modules())

    gen = GenerationConfig(max_new_tokens=8)  # quantize auto: the low-bit kernel where it builds
    assert paraphrase(loaded, sources, prompt, t, gen) == exact
    if lowbit.load_kernels() is not None:  # the kernel needs the exact fp32 blocks, never rounded through bf16
        assert engine_label(loaded, gen, len(sources)).startswith("q4")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_train_only_swaps_bf16_weights_in_place(tiny_model_dir, monkeypatch):
    """The ``train`` command's model: nothing generates from it, so no fp32 Linear weight is kept beside bf16."""
    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_model_dir), "fp32", "cpu", cache=False)
    loaded.train_only = True
    monkeypatch.setenv(prec.MIN_SPEEDUP_ENV, BF16)
    result = train(loaded, cfg(steps=2))
    assert result.precision.dtype == "bf16"
    assert prec.training_module(loaded, result.precision) is loaded.model
    assert not any(type(m) is nn.Linear for m in loaded.model.modules())
    assert {b.dtype for m in loaded.model.modules() if isinstance(m, prec.Bf16Linear) for b in m.buffers()} == {
        torch.bfloat16
    }
