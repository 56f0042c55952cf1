"""Prompt directories for the Serve tests, and a free loopback port (imported by conftest and the Serve tests)."""

from __future__ import annotations

from pathlib import Path

from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig, to_dict
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

KEY = "test-key-123"  # the shared app's key; its replicas read it from PARAPHRASE_RAY_API_KEY
TEXTS = [
    "The committee approved the budget.",
    "She missed the meeting because her flight was late.",
    "Prices rose sharply in the third quarter of the year.",
    "He said the plan would work.",
]


def make_prompt(out: Path, model_dir: Path, loaded, seed: int) -> Path:
    """A random 4-token prompt whose recorded objective is 0.1 * seed (so /prompts can be checked)."""
    sp = SoftPrompt.init(loaded.model, loaded.tokenizer, PromptConfig(n_tokens=4, init="random", seed=seed))
    meta = {
        "template": to_dict(TemplateConfig()),
        "generation": to_dict(GenerationConfig(max_new_tokens=12)),
        "max_source_tokens": 64,
        "init": "random",
        "metrics": {"objective": 0.1 * seed},
        "train_config": {"precision": "fp32"},
    }
    sp.save(out, base_model=str(model_dir), model=loaded.model, meta=meta)
    return out


def make_playground_prompts(root: Path, model_dir: Path, loaded) -> dict[str, Path]:
    """``known``: rows 11, 12, 13 of the embedding table (its explain view must name them); ``other``: random."""
    table = loaded.model.get_input_embeddings().weight
    meta = {"template": to_dict(TemplateConfig()), "generation": to_dict(GenerationConfig(max_new_tokens=10)),
            "init": "vocab", "train_config": {"precision": "fp32"}}
    SoftPrompt(table[[11, 12, 13]]).save(root / "known", str(model_dir), loaded.model, meta)
    SoftPrompt.init(loaded.model, loaded.tokenizer, PromptConfig(n_tokens=4, seed=2)).save(
        root / "other", str(model_dir), loaded.model, meta)
    return {"known": root / "known", "other": root / "other"}


def assert_best_first(sources, candidates, embedder=None) -> None:
    """Each source's candidates are in the documented order, stated here on its own (not through ``rerank``):
    usable (no copy, not empty) first, then faithful, then acceptable to the detector, then the higher objective."""
    from paraphrase_ray.evaluation.embedder import load_embedder
    from paraphrase_ray.evaluation.metrics import score_rows

    embedder = embedder or load_embedder()
    for src, cands in zip(sources, candidates, strict=True):
        rows = score_rows([src] * len(cands), None, list(cands), embedder)
        keys = [(r.copy or r.empty, not r.faithful, not r.acceptable, -r.objective) for r in rows]
        assert keys == sorted(keys), list(zip(cands, keys, strict=True))
