"""Ray Tune sweeps over soft-prompt training: a search space (``paraphrase_ray.sweep.spec``) -> trials -> best prompt.

This is the driver (open or resume, build the tuner, collect baselines, export the best prompt); one trial's
work lives in ``trial.py``.

    paraphrase-ray tune --space search_spaces/quickstart.yaml            # local Ray, CPU
    paraphrase-ray tune --space search_spaces/default.yaml --storage gs://BUCKET/prefix --address auto

Searcher: Optuna TPE (``OptunaSearch``, starting points first); scheduler: ``ASHAScheduler`` on the training
step. ``CheckpointConfig`` keeps each trial's best-scoring checkpoint.

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

import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.evaluator import DEFAULT_NAMESPACE, get_evaluator, shutdown_evaluator
from paraphrase_ray.evaluation.metrics import SUMMARY_KEYS
from paraphrase_ray.sweep.leaderboard import (
    LEADERBOARD_FILE,
    PLOT_FILE,
    TrialRecord,
    format_table,
    leaderboard,
    overhead,
    saved_config,
    write_leaderboard,
    write_plot,
)
from paraphrase_ray.sweep.spec import (
    COMPONENTS,
    ParamSpec,
    SweepSpec,
    SweepStorage,
    spec_from_dict,
    spec_to_dict,
)
from paraphrase_ray.sweep.tracking import callbacks
from paraphrase_ray.sweep.trial import TrialContext, _zero_shot, run_trial

log = logging.getLogger("paraphrase_ray")

SPACE_FILE, ZERO_SHOT_FILE, BEST_DIR = "space.yaml", "zero_shot.json", "best"


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
    from paraphrase_ray.data import load_pairs

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
        run=run,
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
    store.check()
    try:
        has_state = store.exists() and tune.Tuner.can_restore(store.path(), storage_filesystem=store.fs)
    except OSError as e:  # unreachable bucket, missing credentials, permissions
        raise ConfigError(
            f"cannot read --storage {storage}: {str(e).strip().splitlines()[0]} "
            "(gs:// needs credentials that can read and write the bucket: README.md, 'Run on Google Cloud')"
        ) from e
    if resume:
        stored = store.read_yaml(SPACE_FILE)  # a damaged file: a ConfigError naming it
        if stored is None or not has_state:
            raise ConfigError(f"nothing to resume at {store.uri}: no sweep named {name!r} was started there")
        spec = spec_from_dict(stored, where=f"{store.display(SPACE_FILE)}: ")
    elif has_state:  # (a space.yaml without Tune state is a sweep that never started: start it afresh)
        raise ConfigError(
            f"sweep {name!r} already exists at {store.uri}: pass --resume to continue it, or a new --name"
        )
    started = init_ray(address)
    evaluator_name, evaluator = f"evaluator-{name}", None
    try:
        ctx = build_context(spec, name, evaluator_name)
        if not resume:
            store.write_bytes(SPACE_FILE, yaml.safe_dump(spec_to_dict(spec), sort_keys=False).encode())
        # Created by this driver before any trial, so trials only look it up. Holding the handle matters: a
        # non-detached actor dies with its last handle, and each trial's client handle dies with the trial.
        # Preferably on the driver's node (a cluster's head, never preempted; soft: Ray may place it elsewhere).
        # Wherever it is, a lost node does not lose it: Ray restarts it on another node, same name, and
        # retries the trials' calls in flight.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        evaluator = get_evaluator(
            **{k: ctx.evaluator[k] for k in ("name", "namespace", "model", "num_gpus", "num_cpus")},
            scheduling_strategy=here,
            max_restarts=3,
        )
        zero_shot = store.read_json(ZERO_SHOT_FILE) or []  # missing or damaged: computed (again) below
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
            tuner = tune.Tuner.restore(
                store.path(), trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=store.fs
            )
        else:
            run_config = tune.RunConfig(
                name=name,
                storage_path=store.fs_root,
                storage_filesystem=store.fs,  # a gs:// URI's options reach every node with it
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=callbacks(spec.tracking, store),  # MLflow / W&B: one run per trial (tracking.py)
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
                    log.warning("warning: zero-shot baseline failed: %s", str(e).strip().splitlines()[-1])
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


def init_ray(address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray (Ray 2.60's default token auth for local clusters stays on)."""
    if ray.is_initialized():
        return False
    # Inherited by a local cluster's workers: no tokenizer threads, no weight-loading progress bars per trial.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # address "local": a fresh Ray of our own, never one RAY_ADDRESS or `ray start` left on this machine
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    except ConnectionError as e:
        raise ConfigError(f"could not connect to Ray at --address {address}: {e}") from e
    return True


def trial_records(grid) -> list[TrialRecord]:
    """Tune's results as plain records, through the public ``Result`` API.

    Status: ``ERROR`` when the result carries an error, ``TERMINATED`` when Tune marked its last report
    ``done`` (stopped by ASHA) or its final report is in (``train_status``), else ``RUNNING`` (reported, then
    interrupted) or ``PENDING``.
    """
    records = []
    for result in grid:
        df = result.metrics_dataframe
        reports = df.to_dict("records") if df is not None and len(df) else []
        last = result.metrics or {}
        error = ""
        if result.error:
            lines = [ln.strip() for ln in str(result.error).strip().splitlines() if ln.strip()]
            error = (lines[-1] if lines else type(result.error).__name__)[:300]
            status = "ERROR"
        else:
            # a trial's own final report (train_status) ends it too: Tune restores a trial that ended on its first
            # report (a diverged one) with done=False though it saved it TERMINATED
            finished = last.get("done") or "train_status" in last
            status = "TERMINATED" if finished else "RUNNING" if reports else "PENDING"
        config = {k: v for k, v in (result.config or saved_config(result)).items() if not k.startswith("_")}
        records.append(TrialRecord(_result_trial_id(result), status, config, reports, error))
    return records


def _result_trial_id(result) -> str:
    """Tune stamps ``trial_id`` on every report; a trial that never reported is named by its directory."""
    last = result.metrics or {}
    return str(last.get("trial_id") or Path(str(result.path)).name)


def export_best(store: SweepStorage, grid, spec: SweepSpec, rows, zero_shot) -> dict[str, Any] | None:
    """Copy the best trial's best-scoring prompt to ``<storage>/<name>/best`` with its metrics and the sweep."""
    from paraphrase_ray.prompt.directory import PROMPT_FILES, update_meta

    metric, sign = spec.objective.metric, (1 if spec.objective.mode == "max" else -1)
    ranked = [
        r for r in rows if r["status"] not in ("baseline", "error", "nan") and r.get(metric) is not None
    ]
    if not ranked:
        return None
    best_row = ranked[0]
    result = next(res for res in grid if _result_trial_id(res) == best_row["trial_id"])
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
        store.upload_dir(local, BEST_DIR, PROMPT_FILES)  # the card: written by update_meta
    return {**best_row, "path": store.display(BEST_DIR)}


# ------------------------------------------------------------------------------------- the tune command's run
def report_sweep(
    spec: SweepSpec, name: str, storage: str, resume: bool = False, address: str | None = None,
    space: str = "SPACE.yaml",
) -> int:
    """Run (or resume) a sweep and print what ``paraphrase-ray tune`` prints: the leaderboard table, where the
    files went, the overhead line and the best prompt. Returns the command's exit code (130: interrupted)."""
    out = run_sweep(spec, name, storage, resume=resume, address=address)
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
            f"sweep interrupted; continue it with: paraphrase-ray tune --space {shlex.quote(space)} "
            f"--name {name} --storage {shlex.quote(storage)} --resume",  # a gs:// URI's options hold '&'
            file=sys.stderr,
        )
        return 130
    if out.best is None:
        print("no trial produced a score; nothing exported", file=sys.stderr)
        return 1
    metric = out.spec.objective.metric
    print(f"best prompt: {out.best['path']}  ({metric} {out.best[metric]:.4f}, trial {out.best['trial_id']})")
    return 0
