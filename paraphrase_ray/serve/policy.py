"""What the Serve endpoint decides per request, without Ray: validation, decoding options, batching, rerank.

The deployment (``deployments.py``) only moves data between HTTP, the batch queue and these functions, so every
rule a caller can trip (limits, unknown prompt, bad decoding options) is testable in-process.

    items = request_items(settings, loaded, prompts, default, req)   # 404 / 413 / 422 before the queue
    outs = run_batch(loaded, items, on_batch)                          # rows of any prompts, one pass per options
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from paraphrase_ray.config import GenerationConfig
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.prompt.bundle import System
from paraphrase_ray.serve.protocol import (
    DEBUG_STALL_MARK,
    MAX_CANDIDATES,
    CandidateScore,
    ParaphraseRequest,
    ServeSettings,
)


@dataclass(frozen=True)
class Item:
    """One row in the batch queue; ``gen`` is normalised so rows differing only in length limits share it."""

    prompt: str
    row: Any  # generation.rows.Row
    gen: GenerationConfig
    text: str = ""

    @property
    def cost(self) -> int:  # sequences this row adds to the forward pass
        return max(self.gen.num_beams, self.gen.num_return_sequences)


def batch_cost(items: list[Item]) -> int:
    return sum(i.cost for i in items)


def request_texts(req: ParaphraseRequest, s: ServeSettings) -> list[tuple[str, str]]:
    """[(where, text)]: the request's texts with the field name each error should point at."""
    if (req.text is None) == (req.texts is None):
        raise HTTPException(422, "give exactly one of 'text' or 'texts'")
    if req.text is not None:
        texts = [("text", req.text)]
    else:
        texts = [(f"texts[{i}]", t) for i, t in enumerate(req.texts or [])]
    if not texts:
        raise HTTPException(422, "texts: empty list; give at least one text")
    if len(texts) > s.max_texts:
        raise HTTPException(413, f"texts: {len(texts)} texts exceed the limit of {s.max_texts} per request")
    for where, t in texts:
        if not t.strip():
            raise HTTPException(422, f"{where}: empty or whitespace-only text")
        if len(t) > s.max_chars:
            raise HTTPException(413, f"{where}: {len(t)} characters exceed the limit of {s.max_chars}")
    return texts


def decoding(served: System, req: ParaphraseRequest, cap: int) -> GenerationConfig:
    """The prompt's recorded decoding options with the request's on top (CLI rules for K > 1)."""
    k = req.num_candidates
    if req.max_new_tokens is not None and req.max_new_tokens > cap:
        raise HTTPException(422, f"max_new_tokens: {req.max_new_tokens} exceeds the server cap of {cap}")
    gen = served.generation
    beams = req.num_beams or gen.num_beams
    sample = req.do_sample
    if sample is None:
        sample = k > beams or req.temperature is not None or req.top_p is not None or gen.do_sample
    if not sample and k > beams:
        raise HTTPException(422, f"num_candidates: {k} > num_beams {beams} needs do_sample=true or more beams")
    opts = {
        "num_return_sequences": k,
        "num_beams": beams,
        "do_sample": sample,
        "temperature": req.temperature or (0.8 if sample and k > 1 else None),
        "top_p": req.top_p or (0.95 if sample and k > 1 else None),
        "repetition_penalty": req.repetition_penalty,
        "source_repetition_penalty": req.source_repetition_penalty,
        "source_no_repeat_ngram_size": req.source_no_repeat_ngram_size,
        "seed": req.seed,
        "max_new_tokens": min(req.max_new_tokens or gen.max_new_tokens, cap),
    }
    try:
        return dataclasses.replace(gen, **{k_: v for k_, v in opts.items() if v is not None})
    except ConfigError as e:
        raise HTTPException(422, str(e).replace("generation.", "")) from e


def request_items(
    s: ServeSettings, loaded, prompts: dict[str, System], default: str, req: ParaphraseRequest
) -> tuple[System, list[str], list[Item]]:
    """Everything a caller can get wrong is rejected here, before the batch queue: (prompt, texts, rows)."""
    from paraphrase_ray.generation.generate import row_for

    name = req.prompt or default
    if name not in prompts:
        raise HTTPException(404, f"unknown prompt {name!r}; available: {', '.join(prompts)}")
    served = prompts[name]
    texts = request_texts(req, s)
    gen = decoding(served, req, s.max_new_tokens)
    # the batch key: rows that differ only in their length limits share one forward pass
    key = dataclasses.replace(
        gen, max_new_tokens=s.max_new_tokens, max_new_tokens_ratio=1.0, seed=gen.seed if gen.do_sample else 0
    )
    tok, ctx = loaded.tokenizer, loaded.max_positions
    items = []
    for where, t in texts:
        n_src = len(tok(served.template.prefix + t, add_special_tokens=True)["input_ids"])
        if not served.chat and n_src > served.max_source_tokens:
            raise HTTPException(
                413, f"{where}: {n_src} tokens exceed prompt {name!r}'s limit of {served.max_source_tokens} source tokens"
            )
        row = row_for(loaded, t, served.prompt, served.template, gen, served.max_source_tokens, served.chat)
        total = served.n_tokens + len(row.ids) + row.max_new_tokens
        if total > ctx:
            raise HTTPException(
                413,
                f"{where}: {served.n_tokens} prompt + {len(row.ids)} input + {row.max_new_tokens} "
                f"new tokens exceed the model's context of {ctx}",
            )
        items.append(Item(name, row, key, t))
    return served, [t for _, t in texts], items


def run_batch(
    loaded, items: Sequence[Item], on_batch: Callable[[int, bool], None], stall_s: float = 0.0
) -> list[list[str] | Exception]:
    """Rows of any prompts, one forward pass per decoding options; a failing group never fails the others.

    ``on_batch(rows, mixed_prompts)`` is called per forward pass. ``stall_s`` (tests only, see
    ``ServeSettings.debug_stall_s``): sleep that long first when a row's text holds ``DEBUG_STALL_MARK``.
    """
    from paraphrase_ray.generation.generate import generate_rows

    if stall_s and any(DEBUG_STALL_MARK in it.text for it in items):
        time.sleep(stall_s)
    groups: dict[GenerationConfig, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.gen, []).append(i)
    out: list[list[str] | Exception] = [[] for _ in items]
    for gen, idx in groups.items():
        on_batch(len(idx), len({items[i].prompt for i in idx}) > 1)
        try:
            for i, cands in zip(idx, generate_rows(loaded, [items[i].row for i in idx], gen), strict=True):
                out[i] = cands
        except Exception:  # retry one row at a time so one bad row cannot fail its neighbours
            for i in idx:
                try:
                    out[i] = generate_rows(loaded, [items[i].row], gen)[0]
                except Exception as e:
                    out[i] = e
    return out


def candidate_score(x: Any) -> CandidateScore:
    return CandidateScore(
        adequacy=round(x.adequacy, 4), self_bleu=round(x.self_bleu, 2), objective=round(x.objective, 4), copy=x.copy,
        faithful=x.faithful, invented=list(x.invented), dropped=list(x.dropped),
    )


def prompt_listing(prompts: dict[str, System], default: str, loaded, s: ServeSettings) -> dict[str, Any]:
    """``GET /prompts``: each served prompt with what its directory recorded, and the request limits."""
    items = [
        {
            "name": p.name,
            "default": p.name == default,
            "n_tokens": p.n_tokens,
            "init": p.meta.init,
            "base_model": p.meta.base_model or loaded.name,
            "max_source_tokens": p.max_source_tokens,
            "metrics": p.meta.metrics,
        }
        for p in prompts.values()
    ]
    limits = {
        "max_texts": s.max_texts,
        "max_chars": s.max_chars,
        "max_new_tokens": s.max_new_tokens,
        "max_candidates": MAX_CANDIDATES,
        "context_tokens": loaded.max_positions,
        "max_queued_rows": s.max_queued_rows,
        "request_timeout_s": s.request_timeout_s,
    }
    return {"base_model": loaded.name, "default": default, "prompts": items, "limits": limits}
