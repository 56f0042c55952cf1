"""One Tune trial of a sweep: train a prompt with the trial's overrides, score it at every eval, checkpoint it.

``run_trial`` is a plain function (Tune's function trainable) that calls ``train.train``; at every eval
interval it paraphrases the sweep's held-out rows with the current prompt, scores them on the sweep's shared
Evaluator actor, and reports train/validation loss, the objective and its components with a prompt-only
checkpoint (prompt + AdamW moments, safetensors; no base-model weights). ``_zero_shot`` scores the baselines
once per sweep on the same rows. The driver (``driver.py``) builds the ``TrialContext`` they share.

Base model once per worker process: the driver sets ``reuse_actors``, so a finished trial's process runs the
next trial, and ``models.load_model`` memoises per process. Reports carry ``worker_pid``, ``worker_trial``
(trials so far in that process) and ``model_fresh_load``, so the reuse is visible in every leaderboard.

Faults: reports also carry ``node_id`` and ``resumed_from_step`` (the step of the Tune checkpoint the trial
continued from; 0 when it started fresh), so a trial retried after its node was lost shows that it resumed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from paraphrase_ray.config import ZERO_SHOT, ZERO_SHOT_CHAT, RunConfig, replace_nested
from paraphrase_ray.evaluation.evaluator import EvaluatorClient
from paraphrase_ray.evaluation.metrics import SUMMARY_KEYS


@dataclass
class TrialContext:
    """What every trial shares, put in the object store once (``tune.with_parameters``)."""

    sweep: str
    run: RunConfig  # local paths made absolute (Tune runs trials in their own cwd)
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]
    eval_sources: list[str]  # the held-out rows every trial and the zero-shot baseline are scored on
    eval_refs: list[str]
    evaluator: dict[str, Any]  # EvaluatorClient kwargs: the sweep's named actor
    gen_batch_size: int
    metric: str
    mode: str


# Ordinals of the trials this worker process runs (Tune reuses a process for several trials with reuse_actors).
_TRIAL_ORDINALS = itertools.count(1)


def trial_config(ctx: TrialContext, params: dict[str, Any]) -> RunConfig:
    cfg = replace_nested(ctx.run, params)
    # Tune's checkpoint is the one train() writes at each eval interval; no progress bars from workers.
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, checkpoint_every=None, progress=False)
    )


def score_prompt(
    loaded, prompt, cfg: RunConfig, ctx: TrialContext, client, timings: dict | None = None, chat: bool = False
) -> dict[str, float]:
    """Paraphrase the held-out rows with ``prompt`` (None: zero-shot) and score them on the Evaluator actor.

    ``timings`` (if given) receives ``generate_s`` and ``score_s``.
    """
    from paraphrase_ray.generation.generate import paraphrase

    t0 = time.perf_counter()
    cands = paraphrase(
        loaded,
        ctx.eval_sources,
        prompt,
        cfg.template,
        cfg.generation,
        ctx.gen_batch_size,
        max_source_tokens=cfg.data.max_source_tokens,
        chat=chat,
    )
    t1 = time.perf_counter()
    scores = client.score(ctx.eval_sources, ctx.eval_refs, [c[0] for c in cands])
    if timings is not None:
        timings.update(generate_s=round(t1 - t0, 3), score_s=round(time.perf_counter() - t1, 3))
    return scores


def worst(metric: str, mode: str) -> float:
    """What a NaN trial reports: the objective and the rates live in [0, 1]."""
    if mode == "max" and metric in ("objective", "success_rate", "adequacy", "ref_similarity"):
        return 0.0
    return -math.inf if mode == "max" else math.inf


def run_trial(
    config: dict[str, Any], ctx: TrialContext, report=None, get_checkpoint=None, client=None
) -> None:
    """One Tune trial: train with ``config``'s overrides; report and checkpoint at every eval interval.

    ``report(metrics, checkpoint=None)``, ``get_checkpoint()`` and the evaluator ``client`` default to Tune's
    and the sweep's actor; tests pass their own to run a trial in-process.
    """
    from paraphrase_ray.data import Pair
    from paraphrase_ray.models import is_loaded, load_model
    from paraphrase_ray.prompt.directory import PromptMeta, read_meta, update_meta
    from paraphrase_ray.training.precision import load_precision
    from paraphrase_ray.training.trainer import train  # looked up per call: tests replace train.train

    report = report or tune.report
    get_checkpoint = get_checkpoint or tune.get_checkpoint
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    start, t0 = time.time(), time.perf_counter()
    ordinal = next(_TRIAL_ORDINALS)
    cfg = trial_config(ctx, config)
    # the exact fp32 weights on CPU, which the evaluations generate from; training takes its own bf16 copy of
    # them when the probe says bf16 pays (training/precision.py), built once per process like the model
    precision = load_precision(cfg.train.precision, cfg.train.device)
    fresh = not is_loaded(cfg.model, precision, cfg.train.device)
    loaded = load_model(cfg.model, precision, cfg.train.device)  # memoised per process
    client = client or EvaluatorClient(**ctx.evaluator)
    info = {
        "node_id": _node_id(),
        "worker_pid": os.getpid(),
        "worker_trial": ordinal,
        "model_fresh_load": fresh,
        "trial_start": start,
    }
    meta = {**PromptMeta.record(cfg), "sweep": ctx.sweep, "trial_id": _trial_id(), "params": dict(config)}
    work = Path(tempfile.mkdtemp(prefix="paraphrase-ray-trial-"))
    ckpt_dir = work / "checkpoint"
    last: dict[str, Any] = {}
    try:
        ckpt = get_checkpoint()
        # Tune restarted this trial (--resume, or a retry after an error): continue from its last eval.
        resume = Path(ckpt.to_directory(str(work / "resume"))) if ckpt is not None else None
        # In every report, so a retried or resumed trial shows where it continued from (0: from scratch).
        info["resumed_from_step"] = _checkpoint_step(resume)
        info["setup_s"] = round(time.perf_counter() - t0, 3)
        if resume is not None:  # scores of the checkpoint's eval: the final report carries them even when the
            # trial was stopped after its last checkpoint, so training resumes at its end and evaluates nothing
            last.update((read_meta(resume).get("metrics") or {}), step=info["resumed_from_step"])

        def on_eval(event: dict[str, Any], prompt) -> None:
            t = time.perf_counter()
            scores = score_prompt(loaded, prompt, cfg, ctx, client, timings := {})
            metrics = {**event, **scores, **info, **timings, "eval_s": round(time.perf_counter() - t, 3)}
            update_meta(ckpt_dir, **meta, step=event["step"], train_precision=event.get("precision"),
                        metrics={k: scores[k] for k in SUMMARY_KEYS})
            last.clear()
            last.update(metrics)
            report(
                {**metrics, "report_time": time.time()},
                checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)),
            )

        result = train(
            loaded,
            cfg,
            train_pairs=[Pair(*p) for p in ctx.train_pairs],
            val_pairs=[Pair(*p) for p in ctx.val_pairs],
            callback=on_eval,
            resume_from=resume,
            checkpoint_dir=ckpt_dir,
        )
        final = {
            **last,
            **info,
            "step": result.steps,
            "train_status": result.status,
            "report_time": time.time(),
        }
        if result.status == "nan":  # diverged: the searcher learns this region is bad; nothing to retry
            final.update({ctx.metric: worst(ctx.metric, ctx.mode), "train_loss": math.nan})
        report(final)  # no checkpoint: the last eval's stays the trial's latest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkpoint_step(ckpt_dir: Path | None) -> int:
    from paraphrase_ray.training.trainer import STATE_JSON

    if ckpt_dir is None or not (ckpt_dir / STATE_JSON).is_file():
        return 0
    return int(json.loads((ckpt_dir / STATE_JSON).read_text()).get("step", 0))


def _node_id() -> str:
    """The Ray node running this trial (which one a lost node took, and where its retry ran)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _trial_id() -> str:
    try:
        return tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (unit tests)
        return ""


@ray.remote
def _zero_shot(model: str, ctx: TrialContext) -> list[dict[str, Any]]:
    """Baselines without a soft prompt on the sweep's held-out rows, as ``paraphrase-ray evaluate`` has them:
    ``zero-shot`` (the trials' template minus the learned vectors) and, for chat models, ``zero-shot-chat``
    (the chat template around an instruction)."""
    from paraphrase_ray.models import load_model
    from paraphrase_ray.training.precision import load_precision

    cfg = trial_config(ctx, {"model": model})
    loaded = load_model(cfg.model, load_precision(cfg.train.precision, cfg.train.device), cfg.train.device)
    client = EvaluatorClient(**ctx.evaluator)
    out = []
    for chat in (False, True) if loaded.is_chat else (False,):
        t0 = time.perf_counter()
        scores = score_prompt(loaded, None, cfg, ctx, client, chat=chat)
        system = ZERO_SHOT_CHAT if chat else ZERO_SHOT
        out.append(
            {
                "system": system,
                "model": model,
                "chat": chat,
                **scores,
                "wall_s": round(time.perf_counter() - t0, 2),
            }
        )
    return out
