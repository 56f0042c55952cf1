"""A lean decode step for Llama-architecture models whose Linear layers run on the low-bit kernel (``lowbit.py``).

After ``lowbit.py``, a batch-1 step of the embedded 135M model spent ~7 ms in the kernels and ~13 ms in everything
else: ~2,000 small ATen ops and the Python of 30 Hugging Face decoder layers, mask building, and a KV cache
that grows by ``torch.cat`` (a copy of the whole cache per layer per token). This step does the same math in
eight calls per layer into the compiled extension (csrc/lowbit_linear.cpp): q/k/v and gate/up each as one
fused kernel call (their blocks concatenated along the output dim; every output is the same dot product),
RMSNorm, SiLU-and-multiply, and ``attend``, which applies RoPE with HF's own rotary tables, writes keys and
values in place into preallocated buffers (``StaticKV``) and runs grouped-query attention.

Only decode steps run here; the prefill stays Hugging Face's forward (any length, any mask) and its cache is
copied into a ``StaticKV``. ``llama_step(model)`` returns None (use the HF forward) unless the model is a
``LlamaForCausalLM`` with plain settings (no attention / MLP bias, SiLU, default RoPE type, SDPA or eager
attention, no sliding window) whose decoder Linear layers are all ``lowbit.LowBitLinear``. Logits agree with the HF forward of
the same low-bit model to float tolerance (tests/generation/test_llama_step.py).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from paraphrase_ray.generation.backends.lowbit import LowBitLinear
from paraphrase_ray.models import sliding_window

_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class StaticKV:
    """Per-layer key / value buffers (B, H_kv, capacity, D) holding ``length`` positions, written in place.

    Answers what ``decode.decode`` and ``lookup.lookup_decode`` ask of a cache: ``get_seq_length``, ``crop`` (negative: drop that many
    from the end), ``batch_select_indices`` (drop finished rows) and ``batch_repeat_interleave`` (k candidates).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def from_hf(cls, cache, extra: int) -> StaticKV:
        """A copy of a Hugging Face cache with room for ``extra`` more positions."""
        keys, values = [], []
        n = cache.get_seq_length()
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (B, H_kv, n, D)
            if getattr(layer, "is_sliding", False) or k.shape[2] != n:
                # a sliding-window layer holds only its window: these buffers would attend to every position
                raise ValueError(f"StaticKV holds full-attention layers only, not {type(layer).__name__}")
            kb = k.new_empty(k.shape[0], k.shape[1], n + extra, k.shape[3])
            vb = v.new_empty(kb.shape)
            kb[:, :, :n] = k
            vb[:, :, :n] = v
            keys.append(kb)
            values.append(vb)
        return cls(keys, values, n)

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, n: int) -> None:
        self.length = self.length + n if n < 0 else min(n, self.length)

    def batch_select_indices(self, idx: torch.Tensor) -> None:
        self.keys = [k[idx] for k in self.keys]
        self.values = [v[idx] for v in self.values]

    def batch_repeat_interleave(self, r: int) -> None:
        self.keys = [k.repeat_interleave(r, 0) for k in self.keys]
        self.values = [v.repeat_interleave(r, 0) for v in self.values]

    def advance(self, t: int) -> None:
        """Count ``t`` positions written (by ``attend``, layer by layer) as cached."""
        self.length += t


class _Fused:
    """Several LowBitLinear layers that read the same input, as one kernel call; outputs split by ``sizes``."""

    def __init__(self, parts: list[LowBitLinear]):
        self.fmt, self.k = parts[0].fmt, parts[0]._k
        self.sizes = [p.out_features for p in parts]
        self.qs = torch.cat([p.qs for p in parts]).contiguous()
        self.d = torch.cat([p.d for p in parts]).contiguous()
        self.m = torch.cat([p.m for p in parts]).contiguous() if self.fmt == "q4_1" else None

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:  # x2 (M, K) fp32 contiguous -> (M, sum(sizes))
        if self.fmt == "q4_1":
            return self.k.q4_1_mm(x2, self.qs, self.d, self.m, None)
        return self.k.q8_0_mm(x2, self.qs, self.d, None)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * weight
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class LeanLlama:
    """The decode step: ``(ids (B, T), positions (B, T), mask (B, S) or None, StaticKV, keep) -> logits (B, keep, V)``.

    Per layer, six calls into the compiled extension (csrc/lowbit_linear.cpp) and two adds: RMSNorm, the fused
    q/k/v kernel, ``attend`` (RoPE, the KV write and grouped-query attention in one call), o, RMSNorm, the fused
    gate/up kernel, ``silu_mul``, down -- where HF's layer makes ~65 ATen calls.
    """

    def __init__(self, model: nn.Module):
        cfg = model.config
        inner = model.model
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.norm_w, self.norm_eps = inner.norm.weight.detach(), inner.norm.variance_epsilon
        head = model.lm_head
        self.head = _Fused([head]) if isinstance(head, LowBitLinear) else head
        self.n_q, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q
        self.k = inner.layers[0].self_attn.q_proj._k
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon,
                _Fused([a.q_proj, a.k_proj, a.v_proj]), _Fused([a.o_proj]), a.scaling,
                layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.variance_epsilon,
                _Fused([mlp.gate_proj, mlp.up_proj]), _Fused([mlp.down_proj]),
            ))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, kv: StaticKV,
                 keep: int = 1) -> torch.Tensor:
        b, t = ids.shape
        k = self.k
        h = self.embed(ids)  # (B, T, d)
        cos, sin = self.rotary(h, pos)  # (B, T, D) each
        m, d = b * t, h.shape[-1]
        cos, sin = cos.reshape(m, -1).contiguous(), sin.reshape(m, -1).contiguous()
        key_mask = mask if mask is not None else _EMPTY
        h = h.reshape(m, d).contiguous()  # (M, d), row b*T + t
        for i, (w1, e1, qkv, o, scale, w2, e2, gate_up, down) in enumerate(self.layers):
            y = qkv(k.rms_norm(h, w1, e1))  # (M, (Hq + 2 Hkv) D)
            a = k.attend(y, cos, sin, kv.keys[i], kv.values[i], kv.length, key_mask, self.n_q, self.n_kv, scale)
            h = h + o(a)
            h = h + down(k.silu_mul(gate_up(k.rms_norm(h, w2, e2))))
        kv.advance(t)
        last = h.view(b, t, d)[:, -keep:].reshape(-1, d).contiguous()
        return self.head(k.rms_norm(last, self.norm_w, self.norm_eps)).view(b, keep, -1)  # (B, keep, V)


_EMPTY = torch.empty(0, dtype=torch.long)


def _applies(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if cfg.attention_bias or getattr(cfg, "mlp_bias", False) or cfg.hidden_act != "silu":
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if sliding_window(model) is not None:  # attend() sees every cached position: no window
        return False
    linears = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not all(isinstance(x, LowBitLinear) for x in linears) or not hasattr(linears[0]._k, "attend"):
        return False
    same = lambda parts: len({p.fmt for p in parts}) == 1  # noqa: E731
    return all(same([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) and
               same([la.mlp.gate_proj, la.mlp.up_proj]) for la in model.model.layers)


def llama_step(model: nn.Module) -> LeanLlama | None:
    """The lean decode step for ``model`` (built once per model), or None when it does not apply."""
    with _LOCK:
        if model not in _STEPS:
            _STEPS[model] = LeanLlama(model) if _applies(model) else None
        return _STEPS[model]
