"""Sweep tracking: the `tracking:` section and flags, and a real tiny sweep logged to MLflow and read back."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.sweep.spec import SweepStorage, TrackingSpec, spec_from_dict, spec_to_dict
from paraphrase_ray.sweep.tracking import apply_flags, callbacks, mlflow_uri

POINT_KEYS = ("prompt.n_tokens", "train.lr", "prompt.random_range", "train.device")
TWO = [(2, 0.1, 0.5, "cpu"), (3, 0.05, 0.5, "cpu")]
# and one that diverges (a prompt at 1e39 overflows at step 1), one that errors (no such device) in each attempt
THREE = [TWO[1], (2, 0.1, 1e39, "cpu"), (2, 0.1, 0.5, "cuda:99")]


def tiny_space(model_dir: Path, points=TWO, **tracking) -> dict:
    """Trials x 4 steps on the tiny OPT, two reports each, 2 scored rows: the wiring, not the prompts."""
    return {
        "run": {
            "model": str(model_dir),
            "data": {"sources": ["sample"], "val_size": 8},
            "train": {"steps": 4, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "warmup_steps": 0,
                      "precision": "fp32", "device": "cpu"},
            "generation": {"max_new_tokens": 4},
            "prompt": {"init": "random"},
        },
        "search": {"prompt.n_tokens": [2, 3], "train.lr": {"type": "float", "low": 1e-2, "high": 0.3},
                   "prompt.random_range": [0.5, 1e39], "train.device": ["cpu", "cuda:99"]},
        "searcher": {"name": "random", "points_to_evaluate": [dict(zip(POINT_KEYS, p, strict=True)) for p in points]},
        "scheduler": {"name": "none", "grace_period": 2},
        "num_samples": len(points),
        "max_failures": 0,  # an error is final at once (the retry itself is test_multinode's node loss)
        "max_concurrent_trials": 2,  # both at once: the shared Ray has the CPUs
        "resources": {"cpu": 1},
        "evaluator": {"cpu": 0, "n_examples": 2, "batch_size": 2},
        "tracking": tracking,
    }


def test_tracking_section_flags_and_default_store(tiny_model_dir, tmp_path):
    spec = spec_from_dict(tiny_space(tiny_model_dir))
    local = SweepStorage.parse(str(tmp_path / "runs"), "s")
    assert spec.tracking == TrackingSpec() and callbacks(spec.tracking, local) == []  # off unless asked
    spec = spec_from_dict(tiny_space(tiny_model_dir, mlflow=True, experiment="exp"))
    assert spec.tracking.mlflow and spec.tracking.experiment == "exp"
    assert spec_from_dict(spec_to_dict(spec)) == spec  # space.yaml beside the sweep keeps it (for --resume)
    with pytest.raises(ConfigError, match="tracking.wandb_mode must be one of"):
        spec_from_dict(tiny_space(tiny_model_dir, wandb_mode="cloud"))
    with pytest.raises(ConfigError, match="unknown config key 'tracking.mlflow_url'.*mlflow_uri"):
        spec_from_dict(tiny_space(tiny_model_dir, mlflow_url="x"))

    flagged = apply_flags(spec_from_dict(tiny_space(tiny_model_dir)), uri="http://mlflow:5000")
    assert flagged.tracking.mlflow and flagged.tracking.mlflow_uri == "http://mlflow:5000"
    assert apply_flags(spec_from_dict(tiny_space(tiny_model_dir)), mlflow=True).tracking.mlflow_uri is None

    assert mlflow_uri(TrackingSpec(mlflow=True), local) == f"sqlite:///{tmp_path}/runs/s/mlflow.db"
    remote = SweepStorage.parse(f"file://{tmp_path}/runs", "s")
    with pytest.raises(ConfigError, match="--storage file://.* is not local: give an MLflow server"):
        mlflow_uri(TrackingSpec(mlflow=True), remote)
    assert mlflow_uri(TrackingSpec(mlflow=True, mlflow_uri="http://h:5000"), remote) == "http://h:5000"


def test_wandb_callback_is_offline_beside_the_sweep(tmp_path, monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.delenv("WANDB_MODE", raising=False)
    (cb,) = callbacks(TrackingSpec(wandb=True, wandb_project="p"), SweepStorage.parse(str(tmp_path), "s"))
    assert isinstance(cb, WandbLoggerCallback) and cb.project == "p" and cb.group == "s"
    assert cb.kwargs == {"mode": "offline", "dir": str(tmp_path / "s"), "tags": ["paraphrase-ray", "s"]}
    assert os.environ["WANDB_MODE"] == "offline"  # Ray's callback then needs no API key


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    # wandb is in the test extra; this is what a user without it sees
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else FIND_SPEC(name, *a))
    with pytest.raises(ConfigError, match="tracking.wandb needs the wandb package: pip install wandb"):
        callbacks(TrackingSpec(wandb=True), SweepStorage.parse(str(tmp_path), "s"))


FIND_SPEC = importlib.util.find_spec


def test_the_default_mlflow_store_is_a_sqlite_db_beside_the_sweep(tmp_path):
    import mlflow

    store = SweepStorage.parse(str(tmp_path / "runs"), "s")
    (cb,) = callbacks(TrackingSpec(mlflow=True), store)
    db = tmp_path / "runs" / "s" / "mlflow.db"
    assert cb.tracking_uri == f"sqlite:///{db}" and db.is_file()
    exp = mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("s")
    assert exp.artifact_location.endswith(str(tmp_path / "runs" / "s" / "mlartifacts"))


@pytest.mark.slow
def test_a_real_sweep_tracks_every_trial_and_resume_retries_nothing(ray_session, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """One real sweep of three trials (one trains, one diverges, one errors: max_failures 0, one attempt)
    with ``--mlflow-uri file:...`` and W&B offline: an MLflow run per trial that reported, an offline W&B run per trial,
    TensorBoard event files per trial; the diverging trial ran once; ``--resume`` of the finished sweep runs no
    trial again (the errored one included)."""
    import mlflow

    from paraphrase_ray.sweep.driver import run_sweep

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    mlruns = f"file://{tmp_path}/mlruns"
    spec = apply_flags(spec_from_dict(tiny_space(tiny_model_dir, THREE, wandb=True, wandb_project="p")), uri=mlruns)
    out = run_sweep(spec, "tracked", str(tmp_path / "runs"), verbose=0)
    exp = tmp_path / "runs" / "tracked"
    assert not out.interrupted and len(out.records) == 3
    by_device = {(r.config["train.device"], r.config["prompt.random_range"]): r for r in out.records}
    errored, diverged = by_device[("cuda:99", 0.5)], by_device[("cpu", 1e39)]
    trained = [r for r in out.records if r not in (errored, diverged)]
    assert errored.tune_status == "ERROR" and "cuda" in errored.error.lower() and errored.reports == []
    assert [(m["train_status"], m["objective"]) for m in diverged.reports] == [("nan", 0.0)]  # once, not retried
    assert [[m["step"] for m in r.reports] for r in trained] == [[2, 4, 4]]
    assert (tmp_path / "runs" / "tracked" / "best" / "README.md").is_file()  # best/ carries its model card

    def attempts() -> dict[str, int]:  # Tune's own count of each trial's failures, from its saved state
        state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
        return {t["trial_id"]: t["run_metadata"]["num_failures"] if "run_metadata" in t else
                json.loads(meta)["num_failures"] for t, meta in
                ((json.loads(tj), m) for tj, m in state["trial_data"])}

    failures = attempts()
    assert failures[errored.trial_id] == 1 and failures[diverged.trial_id] == 0  # one attempt each
    results = {r.trial_id: (exp.glob(f"*{r.trial_id}*/result.json")) for r in out.records}
    before = {t: [p.read_text() for p in ps] for t, ps in results.items()}

    # the file: store (MLFLOW_ALLOW_FILE_STORE set for it): one run per trial that reported, every report logged
    assert (tmp_path / "mlruns").is_dir() and not exp.joinpath("mlflow.db").exists()
    client = mlflow.MlflowClient(mlruns)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    reported = {r.trial_id: r for r in out.records if r.reports}
    named = {next(t for t in reported if t in run.data.tags["trial_name"]): run for run in runs
             if any(t in run.data.tags["trial_name"] for t in reported)}
    assert set(named) == set(reported)
    for tid, run in named.items():
        assert run.data.tags["sweep"] == "tracked"
        assert int(run.data.params["prompt.n_tokens"]) == reported[tid].config["prompt.n_tokens"]
        history = client.get_metric_history(run.info.run_id, "objective")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [rep["objective"] for rep in reported[tid].reports])
    # W&B offline: one offline run per trial (the errored one too: a run starts with its trial), beside the
    # sweep, named by the trial (``wandb sync`` uploads them)
    offline = sorted((exp / "wandb").glob("offline-run-*"))
    assert sorted(d.name.rsplit("-", 1)[1] for d in offline) == sorted(r.trial_id for r in out.records), offline
    assert all(any(d.glob("*.wandb")) for d in offline), offline
    # TensorBoard event files in each trial's directory, holding its reported metrics
    for r in out.records:
        (trial_dir,) = [d for d in exp.iterdir() if d.is_dir() and r.trial_id in d.name]
        events = b"".join(f.read_bytes() for f in trial_dir.glob("events.out.tfevents.*"))
        assert events and (b"ray/tune/objective" in events) == bool(r.reports), trial_dir

    again = run_sweep(spec, "tracked", str(tmp_path / "runs"), resume=True, verbose=0)
    # found by this test: the diverged trial (one report) came back from the saved state as unfinished, so the
    # resumed sweep counted as interrupted and exported no best/
    assert not again.interrupted and again.best is not None
    assert {r.trial_id: r.tune_status for r in again.records} == {r.trial_id: r.tune_status for r in out.records}
    assert attempts() == failures  # no trial was run again: the errored one kept its count
    assert {t: [p.read_text() for p in ps] for t, ps in
            {r.trial_id: exp.glob(f"*{r.trial_id}*/result.json") for r in out.records}.items()} == before
