"""What ``paraphrase-ray paraphrase`` runs in-process: load, decode, time; and the one line it prints.

``make demo`` (``cli/demo.py``) calls the same two functions, so its step 2 prints what the command prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paraphrase_ray.config import DEFAULT_CANDIDATES

if TYPE_CHECKING:
    from paraphrase_ray.evaluation.metrics import RowScore


@dataclass(frozen=True)
class JobOptions:
    """The ``paraphrase`` flags an in-process job runs with; the defaults are the command's."""

    num_candidates: int = DEFAULT_CANDIDATES  # K sampled candidates, reranked (1 = greedy)
    model: str | None = None  # overrides the prompt's recorded base model
    device: str = "auto"
    batch_size: int = 16  # rows per generation batch
    embedder: str | None = None  # ranks the candidates when K > 1 (None: the default embedder)
    max_new_tokens: int | None = None  # None: the prompt's
    quantize: str = "auto"  # generation.quantize: auto, none (the exact fp32 path) or int8
    progress: bool = False  # a progress bar on stderr


def paraphrase_job(
    prompt: str, sources: Sequence[str], options: JobOptions | None = None
) -> tuple[list[list[str]], dict[str, Any], list[list[RowScore]]]:
    """``paraphrase-ray paraphrase`` in-process: candidates per source (best first), the run's stats
    ``{"rows", "new_tokens", "generate_s", "load_s", "path", "num_candidates", "accepted"}`` (``generate_s``
    excludes loading) and every candidate's scores with the reader's-verdict flags (``api.paraphrase_scored``)."""
    import time

    from paraphrase_ray.api import decoding_for, paraphrase_scored
    from paraphrase_ray.generation.generate import engine_label
    from paraphrase_ray.prompt.bundle import load_prompt

    opt = options or JobOptions()
    t0 = time.perf_counter()
    loaded, bundle = load_prompt(prompt, opt.model, opt.device)
    gen = decoding_for(bundle.info, opt.num_candidates, max_new_tokens=opt.max_new_tokens, quantize=opt.quantize)
    path = engine_label(loaded, gen, len(sources))  # builds the low-bit copy (once) before the clock starts: loading
    t1 = time.perf_counter()
    cands, scores = paraphrase_scored(loaded, bundle, list(sources), gen, opt.batch_size, opt.embedder, opt.progress)
    t2 = time.perf_counter()
    # new tokens: every returned candidate, re-tokenized (stop tokens not counted)
    n_new = sum(len(loaded.tokenizer(c, add_special_tokens=False)["input_ids"]) for cs in cands for c in cs)
    stats = {"rows": len(sources), "new_tokens": n_new, "generate_s": round(t2 - t1, 3),
             "load_s": round(t1 - t0, 3), "path": path, "num_candidates": opt.num_candidates,
             "accepted": sum(s[0].acceptable for s in scores)}
    return cands, stats, scores


def flags(score: RowScore) -> dict[str, Any]:
    """What the detector and the fact check found wrong with one output (empty lists: nothing)."""
    return {"acceptable": score.acceptable, "added": list(score.added_words), "dropped": list(score.dropped_words),
            "garbled": list(score.garbled), "invented_facts": list(score.invented), "dropped_facts": list(score.dropped),
            "copy": score.copy}


def job_summary(stats: dict[str, Any], out: str | Path) -> str:
    """The one line a file job prints, e.g. "wrote 200 paraphrases to x.jsonl in 41 s (190 new tokens/s, ...)"."""
    gen_s = stats["generate_s"]
    line = (f"wrote {stats.get('written', stats['rows'])} paraphrases to {out} in {gen_s:.0f} s "
            f"({stats['new_tokens'] / max(gen_s, 1e-9):.0f} new tokens/s, {stats['path']}; loading took "
            f"{stats['load_s']:.0f} s)")
    if "accepted" in stats:  # the detector's verdict on each row's best candidate (evaluation/verdict.py)
        line += f"; {stats['accepted']}/{stats['rows']} ({stats['accepted'] / max(1, stats['rows']):.0%}) accepted"
    return line
