"""Low-bit generation weights (paraphrase_ray/quant.py): the fused Q4_1 / Q8_0 kernels against fp32, the
whole-model copy (exact path, int8 path, per-layer fallback), and that the original model is never touched.

The q4 tests need g++ and an AVX2 CPU; the first run compiles the kernel once (~40 s on 2 cores) into
``$PARAPHRASE_RAY_CACHE/ext``, later runs load it in well under a second."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from paraphrase_ray.generation.backends import lowbit as quant
from paraphrase_ray.models import freeze


def round_q4_1(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to llama.cpp Q4_1 blocks of 32 along the input dim, dequantized back to fp32."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    lo, hi = b.amin(-1), b.amax(-1)
    m = lo.half().float()
    d = ((hi - lo) / 15).half().float()
    q = torch.round((b - m[..., None]) / d[..., None]).clamp(0, 15)
    return (d[..., None] * q + m[..., None]).reshape(n, k)


def round_q8_0(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    d = (b.abs().amax(-1) / 127).half().float()
    q = torch.round(b / d[..., None]).clamp(-127, 127)
    return (d[..., None] * q).reshape(n, k)


def tiny_llama(seed: int = 0, exact: bool = True) -> nn.Module:
    """A 2-layer Llama with every dim a multiple of 32; ``exact``: Linear weights rounded to Q4_1 and the tied
    embedding / output projection to Q8_0, as in the embedded SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg)
    if exact:
        round_to_blocks(model)
    freeze(model)
    return model


@torch.no_grad()
def round_to_blocks(model: nn.Module) -> None:
    """Make a Llama's weights exact llama.cpp blocks, as the embedded GGUF's are: Q4_1 layers, a Q8_0 embedding."""
    for mod in model.model.layers.modules():
        if isinstance(mod, nn.Linear):
            mod.weight.copy_(round_q4_1(mod.weight))
    emb = model.get_input_embeddings().weight
    emb.copy_(round_q8_0(emb))


@pytest.fixture(scope="module")
def kernels():
    k = quant.load_kernels()
    if k is None:
        pytest.skip(f"low-bit kernel unavailable here: {quant.kernel_error()}")
    return k


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("m_rows", [1, 5, 12])  # 12: the dense path (rebuilt fp32 rows, 2 x 4 tiles)
@pytest.mark.parametrize("k_in,n_out", [(64, 96), (576, 200)])
def test_q4_1_kernel_matches_fp32_linear(kernels, m_rows, k_in, n_out):
    torch.manual_seed(m_rows)
    lin = nn.Linear(k_in, n_out + m_rows % 2)  # odd and even row counts
    with torch.no_grad():
        lin.weight.copy_(round_q4_1(lin.weight))
    packed = quant.pack_q4_1(lin.weight)
    assert packed is not None
    qs, d, m = packed
    n_out = lin.out_features
    assert qs.shape == (n_out, k_in // 2) and d.shape == m.shape == (n_out, k_in // 32)
    q = quant.LowBitLinear(lin, "q4_1", packed, kernels)
    x = torch.randn(m_rows, k_in)
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 1e-4
        x3 = torch.randn(2, m_rows, k_in)  # leading dims are kept
        assert q(x3).shape == (2, m_rows, n_out) and _rel(q(x3), lin(x3)) < 1e-4


@pytest.mark.parametrize("m_rows", [1, 5, 12])
def test_q8_0_kernel_matches_fp32_linear(kernels, m_rows):
    torch.manual_seed(1)
    lin = nn.Linear(128, 300, bias=False)
    with torch.no_grad():
        lin.weight.copy_(round_q8_0(lin.weight))
    assert quant.pack_q4_1(lin.weight) is None  # 32 distinct levels per block are not Q4_1
    packed = quant.pack_q8_0(lin.weight)
    assert packed is not None
    q = quant.LowBitLinear(lin, "q8_0", packed, kernels)
    x = torch.randn(m_rows, 128)
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 1e-4


def test_recovery_refuses_weights_that_were_never_blocks():
    w = torch.randn(64, 64)
    assert quant.pack_q4_1(w) is None and quant.pack_q8_0(w) is None
    assert quant.pack_q4_1(torch.randn(8, 48)) is None  # K not a multiple of 32
    w = round_q4_1(torch.randn(64, 64))
    w[3, 7] += 1e-3  # one weight off the grid
    assert quant.pack_q4_1(w) is None


def _logits_stepwise(model, ids):
    """Logits of every position, feeding one token per call with the KV cache (M = batch rows per call)."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
    cache, logits = None, []
    for j in range(ids.shape[1]):
        out = model(input_ids=ids[:, j : j + 1], use_cache=True, **({key: cache} if cache is not None else {}))
        cache = getattr(out, "cache", None) or out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1)


def test_q4_model_matches_fp32_and_leaves_original_untouched(kernels):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 200, (3, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        qmodel, path = quant.quantize_for_generation(model, "q4")
        assert path == "q4" and qmodel is not model
        summary = qmodel.quant_summary
        assert summary["lm_head"] == "q8_0"
        assert sum(f == "q4_1" for f in summary.values()) == 14  # 2 layers x 7 projections
        assert isinstance(qmodel.lm_head, quant.LowBitLinear)
        assert qmodel.get_output_embeddings().weight.shape == (200, 64)  # what generate.py reads
        # everything but the Linear layers is shared, not copied
        assert qmodel.model.embed_tokens is model.model.embed_tokens
        assert qmodel.model.norm is model.model.norm
        assert qmodel.model.layers[0].input_layernorm is model.model.layers[0].input_layernorm
        assert qmodel.model.layers[0] is not model.model.layers[0]
        assert qmodel.model.layers[0].mlp.down_proj.weight is model.model.layers[0].mlp.down_proj.weight
        # batched prefill (27 rows per call) and one token per call both go through the kernel
        assert _rel(qmodel(input_ids=ids).logits, ref) < 1e-4
        assert _rel(_logits_stepwise(qmodel, ids), ref) < 1e-4
        assert _rel(quant.quantize_for_generation(model, "auto")[0](input_ids=ids).logits, ref) < 1e-4
    handle = qmodel.model.layers[0].register_forward_hook(lambda *a: None)  # hooks on the copy stay there
    assert not model.model.layers[0]._forward_hooks and not model._forward_hooks
    handle.remove()
    # the original: same modules, same weights, same outputs
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert not hasattr(model, "quant_summary")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_q4_falls_back_per_layer(kernels):
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1e-3 * torch.randn(128, 64))  # no longer Q4_1
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        qmodel, path = quant.quantize_for_generation(model, "auto")
        assert path == "q4"
        assert qmodel.quant_summary["model.layers.1.mlp.up_proj"] == "fp32"
        assert qmodel.model.layers[1].mlp.up_proj is model.model.layers[1].mlp.up_proj  # left as it was
        assert isinstance(qmodel.model.layers[1].mlp.down_proj, quant.LowBitLinear)
        assert _rel(_logits_stepwise(qmodel, ids), ref) < 1e-4


def test_generation_label_says_when_only_some_layers_take_the_kernel(kernels):
    """Gemma-3-270m's Q4_K_M file: only its Q8_0 layers are exact kernel blocks; the label must not claim q4."""
    from types import SimpleNamespace

    full, part = tiny_llama(seed=2), tiny_llama(seed=3)
    with torch.no_grad():
        part.model.layers[0].self_attn.q_proj.weight.add_(1e-3)  # no longer a Q4_1 block: stays fp32
    assert quant.generation_model(SimpleNamespace(model=full), "auto")[1] == "q4"
    assert quant.generation_model(SimpleNamespace(model=part), "auto")[1] == "q4-partial"


def test_auto_uses_int8_for_weights_that_were_never_blocks(tiny):
    """The conftest tiny OPT: random weights, and dims (16) that are not multiples of 32."""
    model = tiny.model
    ids = torch.randint(4, 250, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        qmodel, path = quant.quantize_for_generation(model, "auto")
        assert path == "int8"
        assert isinstance(qmodel.lm_head, quant.Int8Linear)
        out = qmodel(input_ids=ids).logits
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
        assert _rel(out, ref) < 0.2
        q4model, q4path = quant.quantize_for_generation(model, "q4")
        if quant.load_kernels() is not None:  # nothing is Q4_1 / Q8_0: the model itself comes back
            assert q4model is model and q4path == "none"
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert all(type(m) is not quant.Int8Linear for m in model.modules())


def test_int8_on_exact_model_agrees_on_argmax():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        qmodel, path = quant.quantize_for_generation(model, "int8")
        assert path == "int8" and set(qmodel.quant_summary.values()) == {"int8"}
        out = _logits_stepwise(qmodel, ids)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_methods_and_fallbacks(monkeypatch):
    model = tiny_llama(seed=3)
    assert quant.quantize_for_generation(model, "none") == (model, "none")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quant.quantize_for_generation(model, "q3")
    with pytest.raises(ValueError, match="fp32 model on CPU"):
        quant.quantize_for_generation(tiny_llama(seed=3).to(torch.bfloat16), "q4")
    assert quant.quantize_for_generation(tiny_llama(seed=3).to(torch.bfloat16), "auto")[1] == "none"
    monkeypatch.setattr(quant, "load_kernels", lambda: None)  # no compiler / no AVX2
    with pytest.raises(RuntimeError, match="q4 kernel unavailable"):
        quant.quantize_for_generation(model, "q4")
    assert quant.quantize_for_generation(model, "auto")[1] == "int8"
