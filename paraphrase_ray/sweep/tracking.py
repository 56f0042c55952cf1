"""Experiment tracking for sweeps: Tune's MLflow and W&B logger callbacks, configured from ``tracking:``.

Every trial becomes one MLflow run (or W&B run) holding its searched parameters and every metric it reports,
at every report, through Ray Tune's own callbacks (``ray.air.integrations``); they run in the sweep's driver,
so the trials need neither package. Tune's TensorBoard event files are written either way
(``tensorboard --logdir <storage>/<name>``).

The default MLflow store is a SQLite database beside a local sweep, ``<storage>/<name>/mlflow.db``: MLflow
3 keeps its plain-directory file store (``./mlruns``) in maintenance mode and refuses to open one unless
``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is the local store it recommends, and needs only ``mlflow-skinny``
plus SQLAlchemy and Alembic, which Optuna already brings. A ``file:`` or plain-path URI given explicitly is
honoured (this module sets that opt-out for it). Read the runs back with ``mlflow.search_runs`` or
``mlflow ui --backend-store-uri sqlite:///<storage>/<name>/mlflow.db`` (the UI needs the full ``mlflow``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any

from paraphrase_ray.errors import ConfigError

if TYPE_CHECKING:
    from paraphrase_ray.sweep.spec import SweepSpec, SweepStorage, TrackingSpec

log = logging.getLogger("paraphrase_ray")

MLFLOW_DB = "mlflow.db"


def apply_flags(spec: SweepSpec, mlflow: bool = False, uri: str | None = None, wandb: bool = False) -> SweepSpec:
    """``tune --mlflow / --mlflow-uri URI / --wandb`` on top of the space's ``tracking:`` section."""
    t = spec.tracking
    t = dataclasses.replace(t, mlflow=t.mlflow or mlflow or bool(uri), mlflow_uri=uri or t.mlflow_uri, wandb=t.wandb or wandb)
    return dataclasses.replace(spec, tracking=t)


def mlflow_uri(spec: TrackingSpec, store: SweepStorage) -> str:
    """The tracking URI: the spec's, or the SQLite store beside a local sweep."""
    if spec.mlflow_uri:
        return spec.mlflow_uri
    if "://" in store.root:
        raise ConfigError(
            f"tracking.mlflow is on but --storage {store.root} is not local: give an MLflow server with "
            "--mlflow-uri http://HOST:5000 (or tracking.mlflow_uri), or a local sqlite:///PATH/mlflow.db"
        )
    return f"sqlite:///{store.path(MLFLOW_DB)}"


def callbacks(spec: TrackingSpec, store: SweepStorage) -> list[Any]:
    """Tune callbacks for ``tune.RunConfig(callbacks=...)``: none, MLflow, W&B or both."""
    out: list[Any] = []
    experiment = spec.experiment or store.name
    tags = {"sweep": store.name, "storage": store.uri, "project": "paraphrase-ray"}
    if spec.mlflow:
        out.append(mlflow_callback(mlflow_uri(spec, store), experiment, store, tags))
    if spec.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("tracking.wandb needs the wandb package: pip install wandb (or set tracking.wandb: false)")
        from ray.air.integrations.wandb import WandbLoggerCallback

        kwargs: dict[str, Any] = {"mode": spec.wandb_mode}
        if spec.wandb_mode != "online":  # Ray's callback asks for an API key unless WANDB_MODE says it needs none
            os.environ["WANDB_MODE"] = spec.wandb_mode
        if "://" not in store.root:  # offline runs land in <storage>/<name>/wandb/ (`wandb sync` uploads them)
            os.makedirs(store.path(), exist_ok=True)
            kwargs["dir"] = store.path()
        out.append(WandbLoggerCallback(project=spec.wandb_project, group=experiment, tags=["paraphrase-ray", store.name], **kwargs))
    return out


def mlflow_callback(uri: str, experiment: str, store: SweepStorage, tags: dict[str, str]):
    """Tune's ``MLflowLoggerCallback``, after making the experiment (artifacts beside a local store, not in cwd)."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("MLflow tracking needs the mlflow package: pip install mlflow-skinny (or mlflow)")
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("file:") else ""
    if scheme in ("", "file"):  # the user chose MLflow's plain file store: honour it (see the module doc)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        if client.get_experiment_by_name(experiment) is None:
            local = scheme == "sqlite" and "://" not in store.root
            client.create_experiment(experiment, artifact_location=store.path("mlartifacts") if local else None)
    except Exception as e:  # unreachable server, bad URI, no permission: say which
        raise ConfigError(f"cannot open MLflow tracking URI {uri!r}: {str(e).strip().splitlines()[0]}") from e
    log.info("tracking: MLflow experiment %r at %s", experiment, uri)
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags=tags, save_artifact=False)
