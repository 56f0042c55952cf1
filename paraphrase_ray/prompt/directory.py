"""The prompt directory on disk: its file names, ``PromptMeta`` (the typed view of ``paraphrase_ray.json``), and
the readers and writers of its JSON files. The weights themselves are ``SoftPrompt.save`` / ``SoftPrompt.load``
(``soft_prompt.py``); a prompt with its base model is ``bundle.load_prompt``.

    adapter_config.json         PEFT PROMPT_TUNING config; base_model_name_or_path is a hub id (models.HUB_IDS)
    adapter_model.safetensors   one tensor "prompt_embeddings", (n_tokens, d_embed), fp32
    paraphrase_ray.json         base model, template, generation defaults, training config, metrics, the
                                training precision and why (train_precision, train_precision_probe)
    README.md                   a Hub model card (library_name: peft), rewritten with every metadata write

A directory saved by PEFT itself (no ``paraphrase_ray.json``) reads as well: its base model comes from
``base_model_name_or_path``, the template and decoding are our defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paraphrase_ray.config import GenerationConfig, RunConfig, TemplateConfig, from_dict, to_dict
from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.files import atomic_write
from paraphrase_ray.prompt.card import render_card

META_FILE = "paraphrase_ray.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
PROMPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, CARD_FILE)  # a prompt: what push uploads, best/ holds


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
    # the frozen weights' dtype to generate with: fp32 when trained with precision fp32, else auto (bf16 on
    # CUDA, the exact fp32 / low-bit weights on CPU): a bf16 training run trained on a bf16 copy of the weights
    precision: str = "auto"
    train_precision: str | None = None  # what training ran in, and why: "bf16 (probe: 3.6x fp32)"
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
            precision="fp32" if (meta.get("train_config") or {}).get("precision") == "fp32" else "auto",
            train_precision=meta.get("train_precision"),
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


def update_meta(prompt_dir: str | Path, **updates: Any) -> None:
    """Merge keys into ``paraphrase_ray.json`` without touching the weights."""
    write_meta(Path(prompt_dir), {**read_meta(prompt_dir), **updates})


def write_meta(prompt_dir: Path, meta: dict[str, Any]) -> None:
    """The metadata, then the model card made from it (so ``README.md`` always shows the latest metrics)."""
    atomic_write(prompt_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    write_card(prompt_dir)


def is_prompt_dir(path: str | Path) -> bool:
    """A directory that holds a prompt: ``adapter_model.safetensors`` and ``adapter_config.json``."""
    return (Path(path) / WEIGHTS_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def check_out_dir(out_dir: str | Path) -> None:
    """Where ``train`` may write a prompt: a new or empty directory, or a prompt directory (re-training into one,
    as ``--resume`` does, also when only its ``checkpoint/`` was saved). Never a directory of other files: the
    prompt's files, the model card ``README.md`` first, would overwrite theirs."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file; give a directory for the prompt")
    if not p.is_dir() or is_prompt_dir(p):
        return
    names = [e.name for e in p.iterdir() if not (e.name.startswith(".") and ".tmp-" in e.name)]  # temps: ignored
    # what a train killed mid-save leaves (some of the prompt's files, its checkpoint/) is its own to write over
    ours = set(names) <= {*PROMPT_FILES, "checkpoint"} and (WEIGHTS_FILE in names or is_prompt_dir(p / "checkpoint"))
    if not names or ours:
        return
    raise ConfigError(
        f"--out {p} already holds files that are not a prompt ({', '.join(sorted(names)[:3])}"
        f"{', ...' if len(names) > 3 else ''}; no {WEIGHTS_FILE} + {CONFIG_FILE}), and the prompt's files "
        f"({CARD_FILE} first) would overwrite theirs: give a new or empty directory, or a prompt directory"
    )


def write_card(prompt_dir: str | Path) -> Path:
    """``README.md`` rendered from the directory's own metadata (``card.render_card``)."""
    path = Path(prompt_dir)
    text = render_card(read_meta(path), read_adapter_config(path), path.resolve().name)
    return atomic_write(path / CARD_FILE, lambda p: p.write_text(text, encoding="utf-8"))
