"""Evaluation reports: tuned prompts and the zero-shot baseline, side by side on the same held-out rows.

A *system* is one way of producing paraphrases with the loaded base model: a trained soft prompt, or a
zero-shot hard prompt with no soft prompt. Two zero-shot systems exist and every tuned prompt is compared
with the better of them:

- ``zero-shot``: no soft prompt, ``"{source}\\nParaphrase:"`` (template prefix ``""``, separator
  ``"\\nParaphrase:"``), the training template minus the learned vectors.
- ``zero-shot-chat`` (chat models only): the model's chat template around an instruction
  (``generate.ZERO_SHOT_INSTRUCTION``); strong for instruction-tuned models such as SmolLM2-135M-Instruct.

All systems of one report use the same rows, the same decoding rules (each prompt keeps the generation
config recorded at training time) and the same embedder. Library entry points::

    report = evaluate_systems(loaded, systems, pairs, embedder)  # -> {"systems": {name: {...}}, "rows": [...]}
    base = zero_shot_baseline(loaded, pairs, embedder)           # -> {"best": name, "systems": {...}, ...}
    print(format_table({n: s["summary"] for n, s in report["systems"].items()}))

``paraphrase-ray evaluate`` (``cli.commands.cmd_evaluate``) is the command on top of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from paraphrase_ray.config import ZERO_SHOT, ZERO_SHOT_CHAT, DataConfig, GenerationConfig, TemplateConfig
from paraphrase_ray.data import DataReport, Pair, clean, load_pairs, read_rows
from paraphrase_ray.errors import ConfigError, DataError
from paraphrase_ray.prompt.bundle import System

# Fixed on purpose (not TemplateConfig()): the baseline must not move when the training default does.
ZERO_SHOT_TEMPLATE = TemplateConfig(prefix="", separator="\nParaphrase:", target_prefix=" ")
RANK_KEYS = ("objective", "success_rate")  # how "better" is decided: objective first, success rate on ties

# (label, format) per metric row of the table; rates print as percentages.
_TABLE_ROWS = (
    ("n", "int"),
    ("objective", "f3"),
    ("success_rate", "pct"),
    ("faithful_rate", "pct"),
    ("faithful_success_rate", "pct"),
    ("adequacy", "f3"),
    ("ref_similarity", "f3"),
    ("self_bleu", "f1"),
    ("ref_bleu", "f1"),
    ("ibleu", "f1"),
    ("copy_rate", "pct"),
    ("empty_rate", "pct"),
)


def zero_shot_systems(loaded, generation: GenerationConfig | None = None) -> list[System]:
    """The plain hard-prompt baseline, plus the chat-instruction one when the tokenizer has a chat template."""
    gen = generation or GenerationConfig()
    systems = [System(ZERO_SHOT, None, ZERO_SHOT_TEMPLATE, gen, kind=ZERO_SHOT)]
    if loaded.is_chat:
        systems.append(System(ZERO_SHOT_CHAT, None, ZERO_SHOT_TEMPLATE, gen, chat=True, kind=ZERO_SHOT_CHAT))
    return systems


def prompt_system(bundle, name: str | None = None) -> System:
    """A System for a loaded prompt directory, with the template and decoding recorded at training time."""
    return System.from_bundle(bundle, name)


# -- evaluation ------------------------------------------------------------------------------------------------
def evaluate_systems(
    loaded,
    systems: Sequence[System],
    pairs: Sequence[Pair],
    embedder,
    batch_size: int = 16,
    progress: bool = False,
    num_candidates: int = 1,
) -> dict[str, Any]:
    """Generate with every system on the same pairs and score them.

    ``num_candidates`` K > 1 samples K candidates per row and keeps the best by ``metrics.rank_candidates``
    (usable, then faithful, then objective), the rule ``paraphrase`` and Serve use.

    Returns ``{"n", "systems": {name: {**System.describe(), "summary", "generate_s"}}, "rows": [...]}`` where
    each row is ``{"source", "reference", "predictions": {name: text}, "scores": {name: RowScore dict}}``.
    """
    from paraphrase_ray.evaluation.metrics import rerank, score_rows, summarize
    from paraphrase_ray.generation.generate import paraphrase_rows, rows_for

    if not pairs:
        raise DataError(
            "no pairs to evaluate: the split is empty (try --split all or a larger --val-fraction)"
        )
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"system names must be unique, got {names}")
    sources = [p.source for p in pairs]
    references = [p.target for p in pairs]
    out_systems: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    for s in systems:
        t0 = time.perf_counter()
        gen = s.generation.with_candidates(num_candidates)
        inputs = rows_for(loaded, sources, s.prompt, s.template, gen, s.max_source_tokens, s.chat)
        cands = paraphrase_rows(loaded, inputs, gen, batch_size, progress=progress)
        if num_candidates > 1:
            cands, cand_scores = rerank(sources, cands, embedder)
            if gen.rerank == "roundtrip":
                from paraphrase_ray.evaluation.likelihood import rerank_roundtrip

                cands, _ = rerank_roundtrip(loaded, sources, cands, cand_scores)
        gen_s = time.perf_counter() - t0
        preds = [c[0] for c in cands]
        rows = score_rows(sources, references, preds, embedder)
        predictions[s.name] = preds
        scores[s.name] = [r.to_dict() for r in rows]
        out_systems[s.name] = {
            **s.describe(), "num_candidates": num_candidates, "summary": summarize(rows), "generate_s": round(gen_s, 2)
        }
    rows_out = [
        {
            "source": src,
            "reference": ref,
            "predictions": {n: predictions[n][i] for n in names},
            "scores": {n: scores[n][i] for n in names},
        }
        for i, (src, ref) in enumerate(zip(sources, references, strict=True))
    ]
    return {"n": len(pairs), "systems": out_systems, "rows": rows_out}


def rank_key(summary: dict[str, Any]) -> tuple[float, ...]:
    """Sort key: higher objective, then higher success rate (NaN counts as worst)."""
    return tuple(-math.inf if _isnan(summary.get(k)) else float(summary[k]) for k in RANK_KEYS)


def versus(name: str, summary: dict[str, Any], base_name: str, base: dict[str, Any]) -> str:
    """One line: how a prompt compares with the baseline on objective and success rate."""
    d_obj = summary["objective"] - base["objective"]
    d_sr = 100 * (summary["success_rate"] - base["success_rate"])
    wins = [k for k, d in (("objective", d_obj), ("success rate", d_sr)) if d > 0]
    verdict = (
        "beats it on both"
        if len(wins) == 2
        else f"beats it on {wins[0]} only"
        if wins
        else "does not beat it"
    )
    return f"{name} vs {base_name} (best zero-shot): objective {d_obj:+.3f}, success rate {d_sr:+.1f} pts: {verdict}"


def best_zero_shot(report: dict[str, Any]) -> str | None:
    """Name of the better zero-shot system of a report (by ``rank_key``), or None when it has none."""
    zs = {n: s for n, s in report["systems"].items() if s["kind"] in (ZERO_SHOT, ZERO_SHOT_CHAT)}
    if not zs:
        return None
    return max(zs, key=lambda n: rank_key(zs[n]["summary"]))


def zero_shot_baseline(
    loaded,
    pairs: Sequence[Pair],
    embedder,
    generation: GenerationConfig | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Score plain (and, for chat models, chat-instruction) zero-shot; report the better one, keep both.

    Returns ``{"best": name, "summary": best summary, "systems": {name: summary}, "report": full report}``.
    A sweep compares its trials' objective with ``["summary"]["objective"]``.
    """
    report = evaluate_systems(
        loaded, zero_shot_systems(loaded, generation), pairs, embedder, batch_size, progress
    )
    best = best_zero_shot(report)
    return {
        "best": best,
        "summary": report["systems"][best]["summary"],
        "systems": {n: s["summary"] for n, s in report["systems"].items()},
        "report": report,
    }


# -- rows to evaluate on ---------------------------------------------------------------------------------------
def eval_pairs(
    sources: Sequence[str],
    split: str = "validation",
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    val_size: int | None = None,
) -> list[Pair]:
    """The rows to score.

    ``validation``: exactly the held-out split ``load_pairs`` gives training with the same seed / val_fraction
    (/ val_size), so no row the prompt was trained on is scored. ``all``: every cleaned row, in file order
    (for files that are already held out). ``limit`` keeps the first N.
    """
    if split not in ("validation", "all"):
        raise ConfigError(f"--split must be 'validation' or 'all', got {split!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if split == "validation":
        if not 0 < val_fraction < 1 and val_size is None:
            raise ConfigError(f"--val-fraction must be in (0, 1) for --split validation, got {val_fraction}")
        cfg = DataConfig(sources=tuple(sources), val_fraction=val_fraction, val_size=val_size, seed=seed)
        _, pairs, _ = load_pairs(cfg)
        if not pairs:
            raise ConfigError(
                f"the validation split of {list(sources)} is empty; raise --val-fraction or use --split all"
            )
    else:
        cfg = DataConfig(sources=tuple(sources), val_fraction=0.0, seed=seed)
        report = DataReport()
        pairs = [p for spec in sources for p in clean(read_rows(spec, cfg, report), cfg, report, spec)]
        if not pairs:
            raise ConfigError(f"{list(sources)} has no usable rows ({report.summary()})")
    return pairs[:limit] if limit is not None else pairs


def split_warnings(
    metas: dict[str, dict], sources: Sequence[str], val_fraction: float, seed: int
) -> list[str]:
    """Warn when a prompt was trained on these sources with a different split: its training rows may leak."""
    out = []
    for name, meta in metas.items():
        data = meta.get("data") or {}
        if [str(s) for s in data.get("sources", [])] != [str(s) for s in sources]:
            continue
        if (
            data.get("seed", seed) != seed
            or data.get("val_size") is not None
            or not math.isclose(float(data.get("val_fraction", val_fraction)), val_fraction)
        ):
            out.append(
                f"warning: {name} was trained with seed={data.get('seed')} val_fraction={data.get('val_fraction')} "
                f"val_size={data.get('val_size')}; evaluating seed={seed} val_fraction={val_fraction} scores rows "
                "it may have trained on. Pass the training --seed/--val-fraction."
            )
    return out


# -- printing --------------------------------------------------------------------------------------------------
def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any, kind: str) -> str:
    if _isnan(v):
        return "-"
    if kind == "int":
        return str(int(v))
    if kind == "pct":
        return f"{100 * v:.1f}%"
    return f"{v:.{kind[1]}f}"


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Aligned text table: one column per system, one row per metric (``-`` where a metric is undefined)."""
    names = list(summaries)
    cells = [["metric", *names]]
    for key, kind in _TABLE_ROWS:
        cells.append([key, *(_fmt(summaries[n].get(key), kind) for n in names)])
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    lines = []
    for i, row in enumerate(cells):
        lines.append(
            "  ".join(
                [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_examples(report: dict[str, Any], k: int = 3) -> str:
    """The first ``k`` rows: source, reference and each system's prediction with its objective."""
    names = list(report["systems"])
    width = max([len("reference"), *(len(n) for n in names)])
    blocks = []
    for i, row in enumerate(report["rows"][: max(0, k)], 1):
        lines = [
            f"[{i}] {'source'.ljust(width)}  {row['source']}",
            f"    {'reference'.ljust(width)}  {row['reference']}",
        ]
        for n in names:
            sc = row["scores"][n]
            tag = "copy" if sc["copy"] else "empty" if sc["empty"] else f"obj {sc['objective']:.2f}"
            lines.append(f"    {n.ljust(width)}  {row['predictions'][n]}   ({tag})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
