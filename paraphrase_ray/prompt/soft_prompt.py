"""The soft prompt: ``n_tokens`` learned vectors in the frozen model's input-embedding space.

Shapes: the prompt is ``(n_tokens, d_embed)`` where ``d_embed = model.get_input_embeddings().embedding_dim``
(512 for OPT-350m, whose hidden size is 1024 -- sizing from ``hidden_size`` is what crashes PEFT there).

Saved as a directory that PEFT can load (``PeftModel.from_pretrained(base, dir)``)::

    adapter_config.json         PEFT PROMPT_TUNING config; base_model_name_or_path is a hub id (models.HUB_IDS)
    adapter_model.safetensors   one tensor "prompt_embeddings", (n_tokens, d_embed), fp32
    paraphrase_ray.json         base model, template, generation defaults, training config, metrics
    README.md                   a Hub model card (library_name: peft), rewritten with the metadata

A directory saved by PEFT itself (no ``paraphrase_ray.json``) reads as well: its base model comes from
``base_model_name_or_path``, the template and decoding are our defaults.

The directory is the unit every stage exchanges, and this module is its only reader: ``PromptBundle`` (the
vectors + ``PromptMeta``, the typed view of ``paraphrase_ray.json``), ``load_prompt`` (the prompt with its base
model) and ``System`` (a prompt, or none, with the template and decoding to run it; reports and Serve use it).

Example::

    sp = SoftPrompt.init(model, tokenizer, PromptConfig(n_tokens=20, init="vocab"))
    embeds = torch.cat([sp.expand(batch), token_embeds], dim=1)  # (batch, 20 + seq, d_embed)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from paraphrase_ray.config import (
    GenerationConfig,
    PromptConfig,
    RunConfig,
    TemplateConfig,
    from_dict,
    to_dict,
)
from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.files import atomic_write
from paraphrase_ray.models import hub_id

TENSOR_NAME = "prompt_embeddings"
META_FILE = "paraphrase_ray.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"



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
        """Initialise from the model's embedding table following ``cfg.init``."""
        table = model.get_input_embeddings().weight.detach().float().cpu()  # (vocab, d_embed)
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
            std = table.std().item()
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
        _write_meta(out, {"base_model": base_model, **(meta or {})})
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


@dataclass(frozen=True)
class PromptMeta:
    """The typed view of ``paraphrase_ray.json``: what a prompt needs to be run as it was trained.

    Missing keys take the defaults a prompt saved by PEFT (no meta file at all) needs; every other key of the
    file stays readable in ``raw`` (sweep, trial, params, zero-shot baselines...).
    """

    base_model: str | None = None
    template: TemplateConfig = field(default_factory=TemplateConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_source_tokens: int = 64
    precision: str = "auto"  # the frozen weights' dtype at training time
    init: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> PromptMeta:
        prompt_cfg = meta.get("prompt_config") or {}
        return cls(
            base_model=meta.get("base_model"),
            template=from_dict(TemplateConfig, meta.get("template") or {}),
            generation=from_dict(GenerationConfig, meta.get("generation") or {}),
            max_source_tokens=int(meta.get("max_source_tokens", 64)),
            precision=(meta.get("train_config") or {}).get("precision", "auto"),
            init=meta.get("init") or prompt_cfg.get("init"),
            metrics=dict(meta.get("metrics") or {}),
            raw=dict(meta),
        )

    @classmethod
    def read(cls, prompt_dir: str | Path) -> PromptMeta:
        return cls.from_dict(read_meta(prompt_dir))

    @staticmethod
    def record(cfg: RunConfig) -> dict[str, Any]:
        """What a prompt directory records about how it was made (``train``, tune trials, ``best/``)."""
        return {
            "template": to_dict(cfg.template),
            "generation": to_dict(cfg.generation),
            "prompt_config": to_dict(cfg.prompt),
            "init": cfg.prompt.init,
            "train_config": to_dict(cfg.train),
            "data": to_dict(cfg.data),
            "max_source_tokens": cfg.data.max_source_tokens,
        }

    def decoding(self, **overrides: Any) -> GenerationConfig:
        """The recorded generation config with the non-None ``overrides`` on top."""
        return dataclasses.replace(self.generation, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class PromptBundle:
    """A loaded prompt directory: the vectors plus its metadata (``meta`` as read, ``info`` typed)."""

    prompt: SoftPrompt
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @functools.cached_property
    def info(self) -> PromptMeta:
        """``meta`` parsed and type-checked once (the API reads it on every call)."""
        return PromptMeta.from_dict(self.meta)

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")


@dataclass(frozen=True)
class System:
    """One way of producing paraphrases: a soft prompt (or None) + template + decoding (+ chat wrapping).

    Reports compare systems on the same rows; Serve holds one per served prompt name.
    """

    name: str
    prompt: SoftPrompt | None  # None: zero-shot
    template: TemplateConfig
    generation: GenerationConfig
    chat: bool = False  # wrap the source in the tokenizer's chat template (the zero-shot-chat baseline)
    max_source_tokens: int = 64
    kind: str = "prompt"  # prompt | zero-shot | zero-shot-chat
    path: str | None = None
    meta: PromptMeta = field(default_factory=PromptMeta, compare=False)

    @classmethod
    def from_bundle(cls, bundle: PromptBundle, name: str | None = None) -> System:
        """The system a prompt directory describes: the template and decoding recorded at training time."""
        info, path = bundle.info, str(bundle.path) if bundle.path is not None else None
        return cls(
            name or (Path(path).name if path else "prompt"),
            bundle.prompt,
            info.template,
            info.generation,
            max_source_tokens=info.max_source_tokens,
            path=path,
            meta=info,
        )

    @property
    def n_tokens(self) -> int:
        return self.prompt.n_tokens if self.prompt is not None else 0

    def describe(self) -> dict[str, Any]:
        """What a report records about the system (JSON-ready)."""
        out = {k: getattr(self, k) for k in ("kind", "path", "chat", "n_tokens", "max_source_tokens")}
        return {**out, "template": to_dict(self.template), "generation": to_dict(self.generation)}


def read_meta(prompt_dir: str | Path) -> dict[str, Any]:
    """``paraphrase_ray.json``; without one (a prompt saved by PEFT), the base model from ``adapter_config.json``."""
    meta = _read_json(Path(prompt_dir) / META_FILE)
    if meta.get("base_model") is None:
        adapter = read_adapter_config(prompt_dir)
        if adapter.get("base_model_name_or_path"):
            meta = {**meta, "base_model": adapter["base_model_name_or_path"]}
    return meta


def read_adapter_config(prompt_dir: str | Path) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` ({} when absent); an adapter that is not a causal-LM prompt is an error."""
    path = Path(prompt_dir) / CONFIG_FILE
    cfg = _read_json(path)
    if cfg and cfg.get("peft_type", "PROMPT_TUNING") != "PROMPT_TUNING":
        raise PromptFileError(f"{path}: peft_type is {cfg['peft_type']!r}; only PROMPT_TUNING adapters are soft prompts")
    if cfg and (cfg.get("num_transformer_submodules") or 1) != 1:
        raise PromptFileError(f"{path}: a prompt for {cfg.get('task_type')} (encoder-decoder); causal LMs only")
    return cfg


def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PromptFileError(f"{p} must hold a JSON object")
    return data


def load_bundle(prompt_dir: str | Path, expected_dim: int | None = None) -> PromptBundle:
    return PromptBundle(SoftPrompt.load(prompt_dir, expected_dim), read_meta(prompt_dir), Path(prompt_dir))


def load_prompt(prompt_dir: str | Path, model: str | None = None, device: str = "auto", precision: str | None = None):
    """(LoadedModel, PromptBundle): the prompt's recorded base model (or ``model``) and the prompt on its device.

    Raises ``ConfigError`` when neither names a base model, ``PromptFileError`` when the prompt does not fit it.
    """
    from paraphrase_ray.errors import ConfigError, ModelLoadError
    from paraphrase_ray.models import load_model

    info = PromptMeta.read(prompt_dir)
    name = model or info.base_model
    if not name:
        raise ConfigError(f"{prompt_dir} does not record its base model; pass --model")
    try:
        loaded = load_model(name, precision or info.precision, device)
    except ModelLoadError as e:
        if model:
            raise
        raise ModelLoadError(f"{e}\n(the base model {name!r} is what {prompt_dir} records; --model overrides it)") from e
    bundle = load_bundle(prompt_dir, expected_dim=loaded.embed_dim)
    bundle.prompt.to(loaded.device)
    return loaded, bundle


def update_meta(prompt_dir: str | Path, **updates: Any) -> None:
    """Merge keys into ``paraphrase_ray.json`` without touching the weights."""
    _write_meta(Path(prompt_dir), {**read_meta(prompt_dir), **updates})


def _write_meta(prompt_dir: Path, meta: dict[str, Any]) -> None:
    """The metadata, then the model card made from it (so ``README.md`` always shows the latest metrics)."""
    from paraphrase_ray.prompt.card import write_card

    atomic_write(prompt_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    write_card(prompt_dir)


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
