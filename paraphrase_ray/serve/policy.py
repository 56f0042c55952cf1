"""What the Serve endpoint decides per request, without Ray: validation, decoding options, batching, rerank.

The deployment (``deployments.py``) only moves data between HTTP, the batch queue and these functions, so every
rule a caller can trip (limits, unknown prompt, bad decoding options) is testable in-process.

    items = request_items(settings, loaded, prompts, default, req)   # 404 / 413 / 422 before the queue
    outs = run_batch(loaded, items, on_batch)                          # rows of any prompts, one pass per options
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from paraphrase_ray.config import GenerationConfig
from paraphrase_ray.errors import ConfigError, GenerationStopped
from paraphrase_ray.prompt.bundle import System
from paraphrase_ray.serve.protocol import (
    DEBUG_FAIL_MARK,
    DEBUG_STALL_MARK,
    MAX_CANDIDATES,
    CandidateScore,
    ParaphraseRequest,
    ServeSettings,
)


@dataclass(frozen=True)
class Item:
    """One row in the batch queue; ``gen`` is normalised so rows differing only in length limits or seed share it.

    ``seed``: the seed the row asked for (``run_batch`` seeds each pass from its rows'); ``stop``: true once the
    row's request timed out or its caller left (the row is skipped, or stops at the next decode step)."""

    prompt: str
    row: Any  # generation.rows.Row
    gen: GenerationConfig
    text: str = ""
    seed: int = 0
    stop: Callable[[], bool] | None = None

    @property
    def cost(self) -> int:  # sequences this row adds to the forward pass
        return max(self.gen.num_beams, self.gen.num_return_sequences)

    @property
    def input_tokens(self) -> int:  # what its prefill reads: soft prompt + template + source
        prompt = self.row.prompt
        return len(self.row.ids) + (prompt.n_tokens if prompt is not None else 0)

    @property
    def work(self) -> int:
        """Work units (admission.py): input tokens + sequences x the row's max new tokens."""
        return self.input_tokens + self.cost * self.row.max_new_tokens

    def stopped(self) -> bool:
        return self.stop is not None and self.stop()


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
    if beams > 1 and k > beams:  # beam search (sampled or not) returns at most num_beams sequences
        raise HTTPException(422, f"num_candidates: {k} > num_beams {beams}; beam search returns at most num_beams "
                                 "candidates (raise num_beams, or sample with num_beams=1)")
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
    s: ServeSettings,
    loaded,
    prompts: dict[str, System],
    default: str,
    req: ParaphraseRequest,
    stop: Callable[[], bool] | None = None,
) -> tuple[System, list[str], list[Item]]:
    """Everything a caller can get wrong is rejected here, before the batch queue: (prompt, texts, rows).

    Every prompt's source-token limit holds, zero-shot's too (a chat model's zero-shot row is not cut, so an
    unchecked one could be the whole context). ``stop``: the request's cancel check, carried by each row."""
    from paraphrase_ray.generation.generate import row_for

    name = req.prompt or default
    if name not in prompts:
        raise HTTPException(404, f"unknown prompt {name!r}; available: {', '.join(prompts)}")
    served = prompts[name]
    texts = request_texts(req, s)
    gen = decoding(served, req, s.max_new_tokens)
    # the batch key: rows that differ only in their length limits or seed share one forward pass
    key = dataclasses.replace(gen, max_new_tokens=s.max_new_tokens, max_new_tokens_ratio=1.0, seed=0)
    seed = gen.seed if gen.do_sample else 0
    tok, ctx = loaded.tokenizer, loaded.max_positions
    items = []
    for where, t in texts:
        if served.chat:  # the chat template wraps the source; the limit is on the source itself
            n_src = len(tok(t, add_special_tokens=False)["input_ids"])
        else:
            n_src = len(tok(served.template.prefix + t, add_special_tokens=True)["input_ids"])
        if n_src > served.max_source_tokens:
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
        if stop is not None:
            row.should_stop = stop  # decode.decode stops the row at the next step once this is true
        items.append(Item(name, row, key, t, seed, stop))
    return served, [t for _, t in texts], items


def pass_seed(seeds: set[int]) -> int:
    """One pass's seed: its rows' seed when they agree (a request alone reproduces), else a mix of them."""
    if len(seeds) == 1:
        return next(iter(seeds))
    digest = hashlib.blake2b(repr(sorted(seeds)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # within MAX_SEED


def run_batch(
    loaded,
    items: Sequence[Item],
    on_batch: Callable[[int, bool], None],
    stall_s: float = 0.0,
    abort: Callable[[Callable[[], bool] | None], None] | None = None,
) -> list[list[str] | Exception]:
    """Rows of any prompts, one forward pass per decoding options; a failing group never fails the others.

    ``on_batch(rows, mixed_prompts)`` is called per forward pass. A row whose request stopped is answered
    ``GenerationStopped`` without generating; ``abort(check)`` (the replica's ``StopHook.watch``) makes a pass stop at
    its next model call once ``check()`` is true, i.e. once every row in it has stopped. ``stall_s`` (tests
    only, see ``ServeSettings.debug_stall_s``): sleep that long first when a row's text holds ``DEBUG_STALL_MARK``;
    a row holding ``DEBUG_FAIL_MARK`` fails.
    """
    from paraphrase_ray.generation.generate import generate_rows

    if stall_s and any(DEBUG_STALL_MARK in it.text for it in items):
        time.sleep(stall_s)
    groups: dict[GenerationConfig, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.gen, []).append(i)
    out: list[list[str] | Exception] = [GenerationStopped() for _ in items]

    def generate(idx: list[int], count: bool = False) -> None:
        live = [i for i in idx if not items[i].stopped()]
        if not live:
            return
        if count:
            on_batch(len(live), len({items[i].prompt for i in live}) > 1)
        if stall_s and any(DEBUG_FAIL_MARK in items[i].text for i in live):
            raise RuntimeError(f"{DEBUG_FAIL_MARK} asked for this failure")
        gen = dataclasses.replace(items[live[0]].gen, seed=pass_seed({items[i].seed for i in live}))
        if abort is not None:
            abort(lambda: all(items[i].stopped() for i in live))
        try:
            for i, cands in zip(live, generate_rows(loaded, [items[i].row for i in live], gen), strict=True):
                out[i] = cands
        finally:
            if abort is not None:
                abort(None)

    for idx in groups.values():
        try:
            generate(idx, count=True)
        except GenerationStopped:
            pass  # every row of the pass stopped: they stay GenerationStopped
        except Exception:  # retry one row at a time so one bad row cannot fail its neighbours
            for i in idx:
                try:
                    generate([i])
                except GenerationStopped:
                    pass
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
        "max_request_work": s.max_request_work,
        "max_queued_work": s.max_queued_work,
        "request_timeout_s": s.request_timeout_s,
    }
    return {"base_model": loaded.name, "default": default, "prompts": items, "limits": limits}


PROBE_TEXT = "The committee approved the budget."


def probe_gen(served: System) -> GenerationConfig:
    """The probe's decoding: two greedy tokens with ``served``'s rules (``probe_row``)."""
    return dataclasses.replace(
        served.generation, max_new_tokens=2, do_sample=False, num_beams=1, num_return_sequences=1, seed=0
    )


def probe_row(loaded, served: System) -> Any:
    """A row of a plain sentence: after a failed batch, the model generating it says the model still works
    (so the failure was the request's, not the model's)."""
    from paraphrase_ray.generation.generate import row_for

    return row_for(loaded, PROBE_TEXT, served.prompt, served.template, probe_gen(served), served.max_source_tokens)
