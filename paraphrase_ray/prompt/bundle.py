"""A prompt directory loaded for use: ``PromptBundle`` (the vectors + their metadata), ``load_prompt`` (the
prompt with its base model) and ``System`` (a prompt, or none, with the template and decoding to run it; reports
and Serve run systems).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paraphrase_ray.config import GenerationConfig, TemplateConfig, to_dict
from paraphrase_ray.errors import ConfigError, ModelLoadError
from paraphrase_ray.prompt.directory import PromptMeta, read_meta
from paraphrase_ray.prompt.soft_prompt import SoftPrompt


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


def load_bundle(prompt_dir: str | Path, expected_dim: int | None = None) -> PromptBundle:
    return PromptBundle(SoftPrompt.load(prompt_dir, expected_dim), read_meta(prompt_dir), Path(prompt_dir))


def load_prompt(prompt_dir: str | Path, model: str | None = None, device: str = "auto", precision: str | None = None):
    """(LoadedModel, PromptBundle): the prompt's recorded base model (or ``model``) and the prompt on its device.

    Raises ``ConfigError`` when neither names a base model, ``PromptFileError`` when the prompt does not fit it.
    """
    from paraphrase_ray.models import load_model  # transformers: only when a model is loaded

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
