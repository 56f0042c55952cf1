"""The soft prompt: ``n_tokens`` learned vectors in the frozen model's input-embedding space.

Shapes: the prompt is ``(n_tokens, d_embed)`` where ``d_embed = model.get_input_embeddings().embedding_dim``
(512 for OPT-350m, whose hidden size is 1024 -- sizing from ``hidden_size`` is what crashes PEFT there).

Saved as a directory that PEFT can load (``PeftModel.from_pretrained(base, dir)``; its files: ``directory.py``).
The directory is the unit every stage exchanges; ``bundle.py`` loads it with its base model.

Example::

    sp = SoftPrompt.init(model, tokenizer, PromptConfig(n_tokens=20, init="vocab"))
    embeds = torch.cat([sp.expand(batch), token_embeds], dim=1)  # (batch, 20 + seq, d_embed)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from paraphrase_ray.config import PromptConfig
from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.files import atomic_write
from paraphrase_ray.models import hub_id
from paraphrase_ray.prompt.directory import CONFIG_FILE, WEIGHTS_FILE, write_meta

TENSOR_NAME = "prompt_embeddings"


class SoftPrompt(nn.Module):
    """An fp32 ``(n_tokens, d_embed)`` parameter; cast to the model's dtype only when concatenated."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2:
            raise PromptFileError(f"prompt tensor must be 2-D (n_tokens, d_embed), got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().float().clone())

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def expand(self, batch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(batch, n_tokens, d_embed) view of the prompt, cast for the forward pass (grad flows to fp32)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w.unsqueeze(0).expand(batch, -1, -1)

    @classmethod
    def init(cls, model: nn.Module, tokenizer: Any, cfg: PromptConfig) -> SoftPrompt:
        """Initialise from the model's embedding table following ``cfg.init``.

        The prompt lives where ``embed(ids)`` lands (what PEFT prepends too), so table rows are scaled as the
        embedding module scales them (Gemma: by sqrt(d_model) ~ 25; most models: 1)."""
        embedding = model.get_input_embeddings()
        # (vocab, d_embed), in the embedding module's output space
        table = _Scaled(embedding.weight.detach().float().cpu(), embedding_scale(embedding))
        gen = torch.Generator().manual_seed(cfg.seed)
        n, d = cfg.n_tokens, table.shape[1]
        if cfg.init == "vocab":
            ids = frequent_token_ids(tokenizer, table.shape[0], cfg.vocab_top_k)
            pick = ids[torch.randint(len(ids), (n,), generator=gen)]
            weight = table[pick].clone()
        elif cfg.init == "random":
            weight = (torch.rand(n, d, generator=gen) * 2 - 1) * cfg.random_range
        elif cfg.init == "random_std":
            # uniform with the table's own std: keeps the prompt on the same scale as real tokens
            std = table.std()
            weight = (torch.rand(n, d, generator=gen) * 2 - 1) * std * math.sqrt(3)
        else:  # text
            ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"init_text {cfg.init_text!r} tokenizes to nothing")
            reps = math.ceil(n / len(ids))
            weight = table[torch.tensor((ids * reps)[:n])].clone()
        return cls(weight)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, base_model: str, model: nn.Module | None = None, meta: dict | None = None):
        """Write the PEFT-compatible prompt directory (atomically per file)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = getattr(model, "config", None)
        adapter_cfg = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.n_tokens,
            "token_dim": self.dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            "base_model_name_or_path": hub_id(base_model),  # PEFT and the Hub resolve hub ids, not our aliases
            "inference_mode": True,
            "revision": None,
            "modules_to_save": None,
            "auto_mapping": None,
        }
        weight = self.weight.detach().float().cpu().contiguous()
        atomic_write(out / WEIGHTS_FILE, lambda p: save_file({TENSOR_NAME: weight}, str(p)))
        atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(adapter_cfg, indent=2)))
        # the prompt's shape lives in the tensor (and adapter_config.json); the meta never repeats it
        write_meta(out, {"base_model": base_model, **(meta or {})})
        return out

    @classmethod
    def load(cls, prompt_dir: str | Path, expected_dim: int | None = None) -> SoftPrompt:
        """Read ``adapter_model.safetensors`` (never a pickle); check shape against ``expected_dim``."""
        path = Path(prompt_dir)
        if not path.is_dir():
            raise PromptFileError(f"prompt directory not found: {path}")
        wfile = path / WEIGHTS_FILE
        if not wfile.is_file():
            raise PromptFileError(f"{path} has no {WEIGHTS_FILE}; not a prompt directory (pickles are never loaded)")
        try:
            tensors = load_file(str(wfile))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PromptFileError(f"{wfile} is truncated or corrupt: {e}") from e
        if TENSOR_NAME not in tensors:
            raise PromptFileError(f"{wfile} has no tensor {TENSOR_NAME!r} (found: {sorted(tensors)})")
        weight = tensors[TENSOR_NAME]
        if weight.dim() != 2:
            raise PromptFileError(f"{wfile}: {TENSOR_NAME} must be 2-D, got shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise PromptFileError(f"{wfile}: {TENSOR_NAME} contains NaN or inf")
        if expected_dim is not None and weight.shape[1] != expected_dim:
            raise PromptFileError(
                f"prompt in {path} has embedding width {weight.shape[1]} but the model's input embeddings are "
                f"{expected_dim} wide: it was trained for a different base model"
            )
        return cls(weight)


def embedding_scale(embedding: nn.Module) -> float:
    """What an input-embedding module multiplies its table rows by in ``forward`` (Gemma's scaled embedding:
    sqrt(d_model) in the table's dtype; a plain ``nn.Embedding``: 1), measured on the module itself."""
    w = embedding.weight
    norms = w.detach()[:64].float().norm(dim=1)
    ids = torch.nonzero(norms > 0).flatten()[:8].to(w.device)
    if not len(ids):
        return 1.0
    with torch.no_grad():
        out = embedding(ids).float()
    return float(out.norm() / w.detach()[ids].float().norm())


class _Scaled:
    """A (vocab, d) table read as ``scale * table`` without materialising the product (Gemma's is 262k rows)."""

    def __init__(self, table: torch.Tensor, scale: float):
        self.table, self.scale, self.shape = table, scale, table.shape

    def __getitem__(self, idx) -> torch.Tensor:
        return self.table[idx] * self.scale

    def std(self) -> float:
        return self.table.std().item() * self.scale


def frequent_token_ids(tokenizer: Any, vocab_size: int, top_k: int) -> torch.Tensor:
    """The ``top_k`` most frequent non-special token ids (what ``init: vocab`` samples from).

    BPE vocabularies are built by merge frequency, so low ids approximate the most frequent tokens -- the
    same proxy Lester et al. used with SentencePiece's frequency-ordered vocabulary. Byte-level single
    characters at the very bottom are kept; special tokens are removed.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    if not ids:
        raise ConfigError("tokenizer has no non-special tokens to initialise the prompt from")
    return torch.tensor(ids[:top_k])


def trainable_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
