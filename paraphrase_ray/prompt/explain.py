"""Explain a soft prompt: the nearest vocabulary tokens to each prompt vector.

A learned vector rarely *is* a token, but its neighbours in the input-embedding table hint at what it does, and
its norm next to the table's typical norm shows whether it drifted off the vocabulary manifold (a vector 10x
longer than any real token is something the model never saw in pre-training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.prompt.soft_prompt import SoftPrompt, embedding_scale


@dataclass(frozen=True)
class Neighbour:
    token_id: int
    token: str
    distance: float  # 1 - cosine similarity, or Euclidean distance


@dataclass(frozen=True)
class PositionExplanation:
    position: int
    norm: float
    neighbours: list[Neighbour]


@torch.no_grad()
def explain_prompt(
    prompt: SoftPrompt, embeddings: torch.Tensor | torch.nn.Module, tokenizer, top_k: int = 5, metric: str = "cosine"
) -> dict:
    """Nearest tokens per position. ``embeddings``: the model's input-embedding module (its table as the module
    outputs it: Gemma scales its rows by sqrt(d_model), and prompts live in that space), or a (vocab, d_embed)
    table already in the prompt's space."""
    if metric not in ("cosine", "l2"):
        raise ConfigError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if not 1 <= top_k <= 100:
        raise ConfigError(f"top_k must be in 1..100, got {top_k}")
    if isinstance(embeddings, torch.nn.Module):
        table = embeddings.weight.detach().float().cpu() * embedding_scale(embeddings)  # (V, d)
    else:
        table = embeddings.detach().float().cpu()  # (V, d)
    vecs = prompt.weight.detach().float().cpu()  # (P, d)
    if vecs.shape[1] != table.shape[1]:
        raise PromptFileError(f"prompt width {vecs.shape[1]} != embedding width {table.shape[1]}")
    n_real = min(table.shape[0], len(tokenizer))  # some models pad the table beyond the tokenizer
    table = table[:n_real]
    if metric == "cosine":
        sims = torch.nn.functional.normalize(vecs, dim=1) @ torch.nn.functional.normalize(table, dim=1).T
        dist = 1 - sims  # (P, V)
    else:
        dist = torch.cdist(vecs, table, compute_mode="donot_use_mm_for_euclid_dist")  # (P, V), exact
    values, ids = dist.topk(top_k, dim=1, largest=False)
    table_norms = table.norm(dim=1)
    positions = []
    for p in range(vecs.shape[0]):
        toks = tokenizer.convert_ids_to_tokens(ids[p].tolist())
        texts = [tokenizer.convert_tokens_to_string([t]) for t in toks]
        positions.append(
            PositionExplanation(
                position=p,
                norm=round(vecs[p].norm().item(), 4),
                neighbours=[
                    Neighbour(int(i), s, round(float(d), 4)) for i, s, d in zip(ids[p].tolist(), texts, values[p].tolist())
                ],
            )
        )
    return {
        "metric": metric,
        "top_k": top_k,
        "embedding_norm_median": round(table_norms.median().item(), 4),
        "embedding_norm_p95": round(table_norms.quantile(0.95).item(), 4),
        "positions": [asdict(p) for p in positions],
    }


def format_explanation(exp: dict) -> str:
    lines = [
        f"vocabulary embedding norm: median {exp['embedding_norm_median']}, p95 {exp['embedding_norm_p95']}"
        f"  (metric: {exp['metric']})",
        f"{'pos':>3}  {'norm':>8}  nearest tokens (distance)",
    ]
    for p in exp["positions"]:
        near = "  ".join(f"{n['token']!r} ({n['distance']:.3f})" for n in p["neighbours"])
        lines.append(f"{p['position']:>3}  {p['norm']:>8.3f}  {near}")
    return "\n".join(lines)
