"""Ray Tune sweeps over soft-prompt training: a search space (``paraphrase_ray.sweep``) -> trials -> best prompt.

    paraphrase-ray tune --space search_spaces/quickstart.yaml            # local Ray, CPU
    paraphrase-ray tune --space search_spaces/default.yaml --storage gs://BUCKET/prefix --address auto

Searcher: Optuna TPE (``OptunaSearch``, starting points first); scheduler: ``ASHAScheduler`` on the training
step. Each trial (``run_trial``) is a plain function that calls ``train.train``; at every eval interval it
paraphrases the sweep's held-out rows with the current prompt, scores them on the sweep's shared Evaluator actor,
and reports train/validation loss, the objective and its components with a prompt-only checkpoint (prompt +
AdamW moments, safetensors; no base-model weights). ``CheckpointConfig`` keeps each trial's best-scoring one.

Base model once per worker process: ``TuneConfig(reuse_actors=True)`` hands a finished trial's actor (one
process) to the next trial with the same resources, and ``models.load_model`` memoises per process. Tune
restarts the function in the same process (``FunctionTrainable.reset_config``); a trial that ASHA stops exits
cleanly inside its ``tune.report`` because function trainables report synchronously. Reports carry
``worker_pid``, ``worker_trial`` (trials so far in that process) and ``model_fresh_load``, so the reuse is
visible in every leaderboard. A trial that raised is not reused (Tune discards its actor).

Faults: a trial that raises (OOM included) is retried ``max_failures`` times, then recorded as ``error``; a NaN
loss ends the trial with the worst objective (``nan``); ASHA's stops show as ``pruned``; none stops the sweep.
``--resume`` restores Tune's experiment (``Tuner.restore``): finished and errored trials are kept as they were,
unfinished ones continue from their last checkpoint, and the search continues to ``num_samples``.

Outputs under ``<storage>/<name>/`` (see ``sweep.SweepStorage``): Tune's state and checkpoints, ``space.yaml``,
``zero_shot.json``, ``leaderboard.csv``, ``sweep.png`` and ``best/``, a prompt directory like ``train --out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from .config import ConfigError, RunConfig, from_dict, replace_nested, to_dict
from .evaluator import DEFAULT_NAMESPACE, EvaluatorClient, get_evaluator, shutdown_evaluator
from .leaderboard import (
    LEADERBOARD_FILE,
    PLOT_FILE,
    TrialRecord,
    format_table,
    leaderboard,
    overhead,
    write_leaderboard,
    write_plot,
)
from .metrics import SUMMARY_KEYS
from .sweep import (
    COMPONENTS,
    ParamSpec,
    SweepSpec,
    SweepStorage,
    load_spec,
    smoke,
    spec_from_dict,
    spec_to_dict,
)

SPACE_FILE, ZERO_SHOT_FILE, BEST_DIR = "space.yaml", "zero_shot.json", "best"
PROMPT_FILES = ("adapter_model.safetensors", "adapter_config.json", "paraphrase_ray.json")


# -------------------------------------------------------------------------------------------------- trials
@dataclass
class TrialContext:
    """What every trial shares, put in the object store once (``tune.with_parameters``)."""

    sweep: str
    run: dict[str, Any]  # to_dict(RunConfig), local paths made absolute (Tune runs trials in their own cwd)
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]
    eval_sources: list[str]  # the held-out rows every trial and the zero-shot baseline are scored on
    eval_refs: list[str]
    evaluator: dict[str, Any]  # EvaluatorClient kwargs: the sweep's named actor
    gen_batch_size: int
    metric: str
    mode: str


_WORKER: dict[str, Any] = {"trials": 0, "models": set()}  # per process: trials run here, models loaded here


def trial_config(ctx: TrialContext, params: dict[str, Any]) -> RunConfig:
    cfg = replace_nested(from_dict(RunConfig, ctx.run), params)
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
    from .generate import paraphrase

    t0 = time.perf_counter()

    cands = paraphrase(
        loaded,
        ctx.eval_sources,
        prompt,
        cfg.template,
        cfg.generation,
        ctx.gen_batch_size,
        cfg.data.max_source_tokens,
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
    from .data import Pair
    from .models import load_model
    from .prompt import update_meta
    from .train import prompt_meta, train

    report = report or tune.report
    get_checkpoint = get_checkpoint or tune.get_checkpoint
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one INFO line per checkpoint
    start, t0 = time.time(), time.perf_counter()
    _WORKER["trials"] += 1
    cfg = trial_config(ctx, config)
    key = (cfg.model, cfg.train.precision, cfg.train.device)
    fresh = key not in _WORKER["models"]
    loaded = load_model(cfg.model, cfg.train.precision, cfg.train.device)  # memoised per process
    _WORKER["models"].add(key)
    client = client or EvaluatorClient(**ctx.evaluator)
    info = {
        "worker_pid": os.getpid(),
        "worker_trial": _WORKER["trials"],
        "model_fresh_load": fresh,
        "trial_start": start,
    }
    meta = {**prompt_meta(cfg), "sweep": ctx.sweep, "trial_id": _trial_id(), "params": dict(config)}
    work = Path(tempfile.mkdtemp(prefix="paraphrase-ray-trial-"))
    ckpt_dir = work / "checkpoint"
    last: dict[str, Any] = {}
    try:
        ckpt = get_checkpoint()
        # Tune restarted this trial (--resume, or a retry after an error): continue from its last eval.
        resume = Path(ckpt.to_directory(str(work / "resume"))) if ckpt is not None else None
        info["setup_s"] = round(time.perf_counter() - t0, 3)

        def on_eval(event: dict[str, Any], prompt) -> None:
            t = time.perf_counter()
            scores = score_prompt(loaded, prompt, cfg, ctx, client, timings := {})
            metrics = {**event, **scores, **info, **timings, "eval_s": round(time.perf_counter() - t, 3)}
            update_meta(ckpt_dir, **meta, step=event["step"], metrics={k: scores[k] for k in SUMMARY_KEYS})
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
    from .models import load_model

    cfg = trial_config(ctx, {"model": model})
    loaded = load_model(cfg.model, cfg.train.precision, cfg.train.device)
    client = EvaluatorClient(**ctx.evaluator)
    out = []
    for chat in (False, True) if loaded.is_chat else (False,):
        t0 = time.perf_counter()
        scores = score_prompt(loaded, None, cfg, ctx, client, chat=chat)
        system = "zero-shot-chat" if chat else "zero-shot"
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


# ------------------------------------------------------------------------------------------------- driver
@dataclass
class SweepOutcome:
    storage: SweepStorage
    spec: SweepSpec
    records: list[TrialRecord]
    rows: list[dict[str, Any]]  # the leaderboard: trials best first, then zero-shot rows
    best: dict[str, Any] | None  # the exported trial's row + "path"; None when interrupted or nothing scored
    interrupted: bool
    overhead: dict[str, Any]


def tune_domain(p: ParamSpec):
    if p.type == "choice":
        return tune.choice(list(p.values))
    if p.type == "int":  # Tune's integer upper bound is exclusive; the spec's is inclusive
        return (tune.lograndint if p.log else tune.randint)(int(p.low), int(p.high) + 1)
    return (tune.loguniform if p.log else tune.uniform)(float(p.low), float(p.high))


def tune_config(spec: SweepSpec, reuse_actors: bool = True) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [dict(p) for p in spec.searcher.points_to_evaluate] or None
    if spec.searcher.name == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        sampler = TPESampler(seed=spec.searcher.seed, n_startup_trials=spec.searcher.n_startup_trials)
        search_alg = OptunaSearch(points_to_evaluate=points, sampler=sampler)  # metric/mode: TuneConfig only
    else:
        search_alg = BasicVariantGenerator(points_to_evaluate=points, random_state=spec.searcher.seed)
    scheduler = FIFOScheduler()
    if spec.scheduler.name == "asha":
        # Time is the training step. max_t lies past the last step so ASHA never cuts the last eval's report.
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=spec.run.train.steps + 1,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    return tune.TuneConfig(
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent_trials,
        reuse_actors=reuse_actors,
    )


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


def build_context(spec: SweepSpec, name: str, evaluator_name: str) -> TrialContext:
    from .data import load_pairs

    run = spec.run
    sources = tuple(str(Path(s).resolve()) if Path(s).exists() else s for s in run.data.sources)
    model = str(Path(run.model).resolve()) if Path(run.model).exists() else run.model
    run = dataclasses.replace(run, model=model, data=dataclasses.replace(run.data, sources=sources))
    train_pairs, val_pairs, _ = load_pairs(run.data)
    rows = val_pairs[: spec.evaluator.n_examples]
    if not rows:
        raise ConfigError("no held-out rows to score: set run.data.val_size (or val_fraction) above 0")
    return TrialContext(
        sweep=name,
        run=to_dict(run),
        train_pairs=[(p.source, p.target) for p in train_pairs],
        val_pairs=[(p.source, p.target) for p in val_pairs],
        eval_sources=[p.source for p in rows],
        eval_refs=[p.target for p in rows],
        evaluator={
            "name": evaluator_name,
            "namespace": DEFAULT_NAMESPACE,
            "model": spec.evaluator.model,
            "num_gpus": spec.evaluator.gpu,
            "num_cpus": spec.evaluator.cpu,
        },
        gen_batch_size=spec.evaluator.batch_size,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
    )


def run_sweep(
    spec: SweepSpec,
    name: str,
    storage: str = "runs/sweeps",
    resume: bool = False,
    address: str | None = None,
    verbose: int = 1,
    reuse_actors: bool = True,
) -> SweepOutcome:
    """Run (``resume``: continue) a sweep; write the leaderboard, plot and best prompt; return what was written.

    With ``resume`` the spec stored with the sweep (``space.yaml``) is used, not ``spec``.
    """
    store = SweepStorage.parse(storage, name)
    try:
        has_state = store.exists() and tune.Tuner.can_restore(store.uri)
    except OSError as e:  # unreachable bucket, missing credentials, permissions
        raise ConfigError(
            f"cannot read --storage {storage}: {str(e).strip().splitlines()[0]} "
            "(gs:// needs credentials that can read and write the bucket: README.md, 'Run on Google Cloud')"
        ) from e
    if resume:
        stored = store.read_bytes(SPACE_FILE)
        if stored is None or not has_state:
            raise ConfigError(f"nothing to resume at {store.uri}: no sweep named {name!r} was started there")
        spec = spec_from_dict(yaml.safe_load(stored), where=f"{store.display(SPACE_FILE)}: ")
    elif has_state:  # (a space.yaml without Tune state is a sweep that never started: start it afresh)
        raise ConfigError(
            f"sweep {name!r} already exists at {store.uri}: pass --resume to continue it, or a new --name"
        )
    started = _init_ray(address)
    evaluator_name, evaluator = f"evaluator-{name}", None
    try:
        ctx = build_context(spec, name, evaluator_name)
        if not resume:
            store.write_bytes(SPACE_FILE, yaml.safe_dump(spec_to_dict(spec), sort_keys=False).encode())
        # Created by this driver before any trial, so trials only look it up. Holding the handle matters: a
        # non-detached actor dies with its last handle, and each trial's client handle dies with the trial.
        evaluator = get_evaluator(
            **{k: ctx.evaluator[k] for k in ("name", "namespace", "model", "num_gpus", "num_cpus")}
        )
        stored_zs = store.read_bytes(ZERO_SHOT_FILE)
        zero_shot = json.loads(stored_zs) if stored_zs else []
        zs_refs = (
            []
            if zero_shot
            else [
                _zero_shot.options(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu).remote(m, ctx)
                for m in spec.models
            ]
        )  # once per sweep, beside the trials, with a trial's resources
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(spec))
        if resume:
            tuner = tune.Tuner.restore(store.uri, trainable, resume_unfinished=True, resume_errored=False)
        else:
            run_config = tune.RunConfig(
                name=name,
                storage_path=store.root,
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(  # the best-scoring checkpoint, and always the latest
                    num_to_keep=1,
                    checkpoint_score_attribute=spec.objective.metric,
                    checkpoint_score_order=spec.objective.mode,
                ),
            )
            param_space = {k: tune_domain(p) for k, p in spec.search.items()}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune_config(spec, reuse_actors),
                run_config=run_config,
            )
        t0 = time.perf_counter()
        grid = tuner.fit()
        fit_s = time.perf_counter() - t0
        records = trial_records(grid)
        interrupted = len(records) < spec.num_samples or any(
            r.tune_status not in ("TERMINATED", "ERROR") for r in records
        )
        if zs_refs:
            ready, _ = ray.wait(zs_refs, num_returns=len(zs_refs), timeout=0 if interrupted else None)
            if len(ready) == len(zs_refs):
                try:
                    zero_shot = [z for zs in ray.get(zs_refs) for z in zs]
                    store.write_bytes(ZERO_SHOT_FILE, json.dumps(zero_shot, indent=2).encode())
                except ray.exceptions.RayError as e:  # a failed baseline must not cost the sweep's results
                    print(
                        f"warning: zero-shot baseline failed: {str(e).strip().splitlines()[-1]}",
                        file=sys.stderr,
                    )
            else:  # interrupted first: --resume computes it
                for ref in zs_refs:
                    ray.cancel(ref, force=True)
        rows = leaderboard(records, spec, zero_shot)
        write_leaderboard(store, rows, spec)
        write_plot(store, rows, spec)
        best = None if interrupted else export_best(store, grid, spec, rows, zero_shot)
        return SweepOutcome(store, spec, records, rows, best, interrupted, overhead(records, fit_s, spec))
    finally:
        if evaluator is not None:  # by name: a trial may have re-created it after a crash
            shutdown_evaluator(evaluator_name, DEFAULT_NAMESPACE)
        if started:
            ray.shutdown()


def _init_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray (Ray 2.60's default token auth for local clusters stays on)."""
    if ray.is_initialized():
        return False
    # Inherited by a local cluster's workers: no tokenizer threads, no weight-loading progress bars per trial.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    except ConnectionError as e:
        raise ConfigError(f"could not connect to Ray at --address {address}: {e}") from e
    return True


def trial_records(grid) -> list[TrialRecord]:
    """Tune's results as plain records. Tune statuses live on the Trial objects, in the ResultGrid's order."""
    records = []
    for result, trial in zip(grid, grid._experiment_analysis.trials, strict=True):
        df = result.metrics_dataframe
        reports = df.to_dict("records") if df is not None and len(df) else []
        error = ""
        if result.error:
            lines = [ln.strip() for ln in str(result.error).strip().splitlines() if ln.strip()]
            error = (lines[-1] if lines else type(result.error).__name__)[:300]
        config = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        records.append(TrialRecord(trial.trial_id, trial.status, config, reports, error))
    return records


def export_best(store: SweepStorage, grid, spec: SweepSpec, rows, zero_shot) -> dict[str, Any] | None:
    """Copy the best trial's best-scoring prompt to ``<storage>/<name>/best`` with its metrics and the sweep."""
    from .prompt import update_meta

    metric, sign = spec.objective.metric, (1 if spec.objective.mode == "max" else -1)
    ranked = [
        r for r in rows if r["status"] not in ("baseline", "error", "nan") and r.get(metric) is not None
    ]
    if not ranked:
        return None
    best_row = ranked[0]
    result = next(
        res
        for res, t in zip(grid, grid._experiment_analysis.trials, strict=True)
        if t.trial_id == best_row["trial_id"]
    )
    cands = [(c, m) for c, m in result.best_checkpoints if isinstance(m.get(metric), int | float)]
    if not cands:
        return None
    ckpt, metrics = max(cands, key=lambda cm: sign * cm[1][metric])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(ckpt.to_directory(str(Path(tmp) / "best")))
        update_meta(
            local,
            sweep=store.name,
            trial_id=best_row["trial_id"],
            step=metrics.get("step"),
            params={k: best_row.get(k) for k in spec.search},
            metrics={k: metrics.get(k) for k in (*SUMMARY_KEYS, "val_loss")},
            zero_shot=[{k: z.get(k) for k in ("system", "model", *COMPONENTS)} for z in zero_shot],
        )
        store.upload_dir(local, BEST_DIR, PROMPT_FILES)
    return {**best_row, "path": store.display(BEST_DIR)}


# ---------------------------------------------------------------------------------------------------- CLI
def cmd_tune(args: argparse.Namespace) -> int:
    spec = load_spec(args.space)
    name = args.name or Path(args.space).stem
    if args.resume and (args.smoke_test or args.num_samples is not None):
        print(
            "note: --resume continues the sweep as it was started; --smoke-test/--num-samples are ignored",
            file=sys.stderr,
        )
    if not args.resume and args.smoke_test:
        spec = smoke(spec)
    if not args.resume and args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError("--num-samples must be >= 1")
        spec = dataclasses.replace(spec, num_samples=args.num_samples)
    out = run_sweep(spec, name, args.storage, resume=args.resume, address=args.address)
    print()
    print(format_table(out.rows, out.spec))
    print(f"\nleaderboard: {out.storage.display(LEADERBOARD_FILE)}")
    print(f"plot:        {out.storage.display(PLOT_FILE)}")
    o = out.overhead
    print(
        f"sweep: {o['trials']} trials in {o['fit_s']} s on {o['worker_processes']} worker processes; "
        f"trial setup {o['fresh_setup_s']} s in a new process, {o['reused_setup_s']} s in a reused one; "
        f"overhead {o['overhead_s_per_trial']} s per trial"
    )
    if out.interrupted:
        print(
            f"sweep interrupted; continue it with: paraphrase-ray tune --space {args.space} --name {name} "
            f"--storage {args.storage} --resume",
            file=sys.stderr,
        )
        return 130
    if out.best is None:
        print("no trial produced a score; nothing exported", file=sys.stderr)
        return 1
    metric = out.spec.objective.metric
    print(f"best prompt: {out.best['path']}  ({metric} {out.best[metric]:.4f}, trial {out.best['trial_id']})")
    return 0
