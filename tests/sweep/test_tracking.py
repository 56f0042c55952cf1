"""Sweep tracking: the `tracking:` section and flags, and a real tiny sweep logged to MLflow and read back."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.sweep.spec import SweepStorage, TrackingSpec, spec_from_dict, spec_to_dict
from paraphrase_ray.sweep.tracking import apply_flags, callbacks, mlflow_uri


def tiny_space(model_dir: Path, **tracking) -> dict:
    """Two trials x 4 steps on the tiny OPT, two reports each, 2 scored rows: the wiring, not the prompts."""
    return {
        "run": {
            "model": str(model_dir),
            "data": {"sources": ["sample"], "val_size": 8},
            "train": {"steps": 4, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "warmup_steps": 0,
                      "precision": "fp32", "device": "cpu"},
            "generation": {"max_new_tokens": 4},
        },
        "search": {"prompt.n_tokens": [2, 3], "train.lr": {"type": "float", "low": 1e-2, "high": 0.3}},
        "searcher": {"name": "random", "points_to_evaluate": [{"prompt.n_tokens": 2, "train.lr": 0.1},
                                                              {"prompt.n_tokens": 3, "train.lr": 0.05}]},
        "scheduler": {"name": "none", "grace_period": 2},
        "num_samples": 2,
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


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="tracking.wandb needs the wandb package: pip install wandb"):
        callbacks(TrackingSpec(wandb=True), SweepStorage.parse(str(tmp_path), "s"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (not in the test extra)")
def test_wandb_callback_is_offline_beside_the_sweep(tmp_path, monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    monkeypatch.delenv("WANDB_MODE", raising=False)
    (cb,) = callbacks(TrackingSpec(wandb=True, wandb_project="p"), SweepStorage.parse(str(tmp_path), "s"))
    assert isinstance(cb, WandbLoggerCallback) and cb.project == "p" and cb.group == "s"
    assert cb.kwargs == {"mode": "offline", "dir": str(tmp_path / "s"), "tags": ["paraphrase-ray", "s"]}
    assert os.environ["WANDB_MODE"] == "offline"  # Ray's callback then needs no API key


@pytest.mark.slow
def test_a_real_sweep_logs_one_mlflow_run_per_trial(ray_session, tiny_model_dir, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from paraphrase_ray.sweep.driver import run_sweep

    spec = spec_from_dict(tiny_space(tiny_model_dir, mlflow=True))
    out = run_sweep(spec, "tracked", str(tmp_path / "runs"), verbose=0)
    assert not out.interrupted and len(out.records) == 2
    db = tmp_path / "runs" / "tracked" / "mlflow.db"
    assert db.is_file()  # the default store lies beside the sweep
    assert (tmp_path / "runs" / "tracked" / "best" / "README.md").is_file()  # best/ carries its model card

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert len(runs) == 2
    assert sorted(runs["params.prompt.n_tokens"].astype(int)) == [2, 3]  # the searched parameters
    assert {"metrics.objective", "metrics.val_loss", "metrics.adequacy", "metrics.step"} <= set(runs.columns)
    assert set(runs["tags.sweep"]) == {"tracked"}
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    by_trial = {r.trial_id: r for r in out.records}
    for _, run in runs.iterrows():
        history = client.get_metric_history(run["run_id"], "objective")
        trial = next(r for tid, r in by_trial.items() if tid in run["tags.trial_name"])
        reported = [rep["objective"] for rep in trial.reports]
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(reported)  # every report
