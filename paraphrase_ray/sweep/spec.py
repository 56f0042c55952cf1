"""Sweep definitions as data (``search_spaces/*.yaml`` -> ``SweepSpec``) and where a sweep's results live.

No Ray here: a search space is parsed and checked in-process (tests, ``--help``-time errors), and the storage
helpers are plain ``pyarrow.fs``. ``paraphrase_ray.sweep.driver`` turns a spec into a Ray Tune run.

A search space::

    run:            # the options every trial shares: exactly a `paraphrase-ray train --config` file
      model: smollm2-135m
      train: {steps: 16, eval_every: 8}
    search:         # the options that vary, as dotted keys into run:
      prompt.n_tokens: {type: int, low: 4, high: 32, log: true}
      prompt.init: {type: choice, values: [vocab, random, text]}   # or just [vocab, random, text]
      train.lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
    searcher: {name: optuna, seed: 0, points_to_evaluate: [{prompt.n_tokens: 20, prompt.init: vocab, train.lr: 0.3}]}
    scheduler: {name: asha, grace_period: 8, reduction_factor: 2}
    num_samples: 4
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0.25}
    evaluator: {model: sentence-transformers/all-MiniLM-L6-v2, cpu: 1, gpu: 0, n_examples: 32}
    objective: {metric: objective, mode: max}
    tracking: {mlflow: true}   # one MLflow run per trial (default store: <storage>/<name>/mlflow.db); wandb: true

Every key is checked: an unknown one is an error naming it, and every value a searched key can take is checked
against ``RunConfig``'s own validation, so a range that would fail in trial 37 fails at load time instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from paraphrase_ray.config import RunConfig, from_dict, load_yaml, replace_nested, to_dict
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER
from paraphrase_ray.evaluation.metrics import SUMMARY_KEYS
from paraphrase_ray.files import atomic_write_bytes
from paraphrase_ray.storage import check_bucket, is_uri, open_uri, publish_files

PARAM_TYPES = ("int", "float", "choice")
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "none")
WANDB_MODES = ("offline", "online", "disabled")
COMPONENTS = tuple(k for k in SUMMARY_KEYS if k != "n")  # what a trial reports from the Evaluator
OBJECTIVE_METRICS = (*COMPONENTS, "val_loss")

log = logging.getLogger("paraphrase_ray")


@dataclass(frozen=True)
class ParamSpec:
    """One searched option: an inclusive int/float range (``log`` samples log-uniformly) or a list of choices."""

    type: str = "choice"  # int | float | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple = ()

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ConfigError(f"type must be one of {PARAM_TYPES}, got {self.type!r}")
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError("a choice needs `values: [...]` (and no low/high)")
            return
        if self.values or self.low is None or self.high is None:
            raise ConfigError(f"an {self.type} range needs `low` and `high` (and no values)")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ConfigError(f"an int range needs whole-number bounds, got {self.low}..{self.high}")
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ConfigError(f"a range needs low < high (and low > 0 with log), got {self.low}..{self.high}")

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return self.low <= value <= self.high and (self.type == "float" or float(value).is_integer())


@dataclass(frozen=True)
class SearcherSpec:
    name: str = "optuna"  # optuna (TPE) | random
    seed: int = 0
    n_startup_trials: int = 4  # TPE: random trials before it models the results
    points_to_evaluate: tuple = ()  # known-good settings tried first ({dotted key: value} each)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"  # asha | none
    grace_period: int = 100  # training steps every trial gets before ASHA may stop it
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class ResourcesSpec:
    cpu: float = 1.0  # also the trial's torch threads (Ray sets OMP_NUM_THREADS from it)
    gpu: float = 0.0  # a share of one card packs trials (0.25: four per GPU); Ray does not cap GPU memory


@dataclass(frozen=True)
class EvaluatorSpec:
    model: str = DEFAULT_EMBEDDER  # sentence-transformers model of the sweep's shared Evaluator actor
    cpu: float = 1.0
    gpu: float = 0.0
    n_examples: int = 32  # held-out rows paraphrased and scored at every eval interval
    batch_size: int = 16  # generation batch for those rows


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str = "objective"  # a key of metrics.summarize() or val_loss
    mode: str = "max"


@dataclass(frozen=True)
class TrackingSpec:
    """Where trials are tracked besides Tune's own files (``tracking.py``; TensorBoard files are always written)."""

    mlflow: bool = False  # one MLflow run per trial: its parameters and every reported metric
    mlflow_uri: str | None = None  # default: sqlite:///<storage>/<name>/mlflow.db beside a local sweep
    experiment: str | None = None  # MLflow experiment / W&B group (default: the sweep's name)
    wandb: bool = False  # the same through W&B (needs `pip install wandb`)
    wandb_project: str = "paraphrase-ray"
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep, as read from a search-space YAML. ``search`` maps dotted RunConfig keys to ParamSpecs."""

    run: RunConfig = field(default_factory=RunConfig)
    search: dict = field(default_factory=dict)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    num_samples: int = 8
    max_concurrent_trials: int = 2
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_failures: int = (
        1  # retries of a trial that raises (OOM included); a NaN loss ends the trial, no retry
    )
    evaluator: EvaluatorSpec = field(default_factory=EvaluatorSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    @property
    def models(self) -> list[str]:
        """Base models the sweep trains (``model`` may be searched): one zero-shot baseline each."""
        return list(self.search["model"].values) if "model" in self.search else [self.run.model]

    def value(self, key: str, params: dict[str, Any]) -> Any:
        """A trial's value for dotted ``key``: searched (from ``params``) or fixed (from ``run:``)."""
        if params.get(key) is not None:
            return params[key]
        obj: Any = self.run
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj


def spec_from_dict(data: dict[str, Any], where: str = "") -> SweepSpec:
    """Build and validate a SweepSpec; every unknown key or bad value is a ConfigError naming it."""
    data = dict(data)
    raw_search = data.pop("search", None) or {}
    if not isinstance(raw_search, dict):
        raise ConfigError(f"{where}search must be a mapping of dotted keys to ranges")
    search = {}
    for key, value in raw_search.items():
        if isinstance(value, list):  # shorthand: a list is a choice
            value = {"type": "choice", "values": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}search.{key} must be a mapping like {{type: choice, values: [...]}}")
        try:
            search[key] = from_dict(ParamSpec, value, where=f"search.{key}.")
        except ConfigError as e:
            raise ConfigError(f"{where}search.{key}: {e}") from e
    try:
        spec = from_dict(SweepSpec, data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from e
    spec = dataclasses.replace(spec, search=search)
    validate(spec, where)
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    return spec_from_dict(load_yaml(path), where=f"{path}: ")


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """Plain dict that ``spec_from_dict`` reads back to an equal spec (``space.yaml`` beside the results)."""
    d = to_dict(spec)
    d["search"] = {
        k: {n: v for n, v in to_dict(p).items() if v is not None and v != [] and (n != "log" or v)}
        for k, p in spec.search.items()
    }
    return d


def validate(spec: SweepSpec, where: str = "") -> None:
    """Cross-field checks: searched keys exist in RunConfig and every value they can take is valid there."""
    if not spec.search:
        raise ConfigError(f"{where}search is empty: name at least one option to vary (e.g. train.lr)")
    for key, p in spec.search.items():
        if key == "data" or key.startswith("data."):
            raise ConfigError(
                f"{where}search.{key}: data options cannot be searched (every trial and the zero-shot baseline "
                "are scored on the same held-out rows); set them under run.data"
            )
        if key == "model" and p.type != "choice":
            raise ConfigError(f"{where}search.model must be a choice of model names")
        samples = list(p.values) if p.type == "choice" else [p.low, p.high]
        for v in [int(v) for v in samples] if p.type == "int" else samples:
            try:
                replace_nested(spec.run, {key: v})
            except ConfigError as e:
                raise ConfigError(f"{where}search.{key}: value {v!r} is not valid: {e}") from e
    for i, point in enumerate(spec.searcher.points_to_evaluate):
        if not isinstance(point, dict):
            raise ConfigError(f"{where}searcher.points_to_evaluate[{i}] must be a mapping of searched keys")
        for key, v in point.items():
            if key not in spec.search:
                raise ConfigError(f"{where}searcher.points_to_evaluate[{i}]: {key!r} is not a searched key")
            if not spec.search[key].contains(v):
                raise ConfigError(
                    f"{where}searcher.points_to_evaluate[{i}]: {key}={v!r} is outside its range"
                )
    steps = spec.run.train.steps
    checks = [
        (spec.searcher.name in SEARCHERS, f"searcher.name must be one of {SEARCHERS}"),
        (spec.searcher.n_startup_trials >= 0, "searcher.n_startup_trials must be >= 0"),
        (spec.scheduler.name in SCHEDULERS, f"scheduler.name must be one of {SCHEDULERS}"),
        (
            1 <= spec.scheduler.grace_period <= steps,
            f"scheduler.grace_period must be in 1..run.train.steps ({steps})",
        ),
        (spec.scheduler.reduction_factor > 1, "scheduler.reduction_factor must be > 1"),
        (spec.num_samples >= 1, "num_samples must be >= 1"),
        (spec.max_concurrent_trials >= 1, "max_concurrent_trials must be >= 1"),
        (spec.max_failures >= 0, "max_failures must be >= 0"),
        (spec.resources.cpu >= 0 and spec.resources.gpu >= 0, "resources.cpu and resources.gpu must be >= 0"),
        (
            spec.resources.gpu <= 1 or float(spec.resources.gpu).is_integer(),
            "resources.gpu above 1 must be whole",
        ),
        (spec.evaluator.cpu >= 0 and spec.evaluator.gpu >= 0, "evaluator.cpu and evaluator.gpu must be >= 0"),
        (spec.evaluator.n_examples >= 1, "evaluator.n_examples must be >= 1"),
        (spec.evaluator.batch_size >= 1, "evaluator.batch_size must be >= 1"),
        (spec.objective.metric in OBJECTIVE_METRICS, f"objective.metric must be one of {OBJECTIVE_METRICS}"),
        (spec.objective.mode in ("min", "max"), "objective.mode must be min or max"),
        (spec.tracking.wandb_mode in WANDB_MODES, f"tracking.wandb_mode must be one of {WANDB_MODES}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(where + message)


def smoke(spec: SweepSpec) -> SweepSpec:
    """``--smoke-test``: 2 trials x 4 steps (two reports each), 4 scored rows. Checks the wiring, not prompts."""
    run = replace_nested(
        spec.run, {"train.steps": 4, "train.eval_every": 2, "train.eval_batches": 1, "train.warmup_steps": 0}
    )
    return dataclasses.replace(
        spec,
        run=run,
        num_samples=2,
        max_concurrent_trials=min(2, spec.max_concurrent_trials),
        searcher=dataclasses.replace(spec.searcher, points_to_evaluate=spec.searcher.points_to_evaluate[:2]),
        scheduler=dataclasses.replace(spec.scheduler, grace_period=2),
        evaluator=dataclasses.replace(spec.evaluator, n_examples=min(4, spec.evaluator.n_examples)),
    )


@dataclass(frozen=True)
class SweepStorage:
    """``<storage>/<name>`` on a local path or a URI (gs://, file://), read and written through ``pyarrow.fs``.

    Tune gets the same filesystem object (``RunConfig`` / ``Tuner.restore(storage_filesystem=...)``) and the
    path inside it, so a ``gs://`` URI with options (``storage.open_uri``: an emulator, anonymous access)
    reaches every node; everything this project adds (space.yaml, zero_shot.json, leaderboard.csv, sweep.png,
    best/) goes through ``write_bytes`` too, never ``open()``. Nothing lands in the driver's working directory.
    """

    root: str  # the storage as the user named it, without a URI's query (absolute when local)
    name: str
    fs: pafs.FileSystem
    fs_root: str  # the root's path inside ``fs``: what Tune's RunConfig(storage_path=...) gets
    query: str = ""  # a gs:// URI's options, kept for the URIs we print (e.g. best/ to serve)

    @classmethod
    def parse(cls, storage: str, name: str) -> SweepStorage:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"--name must be a plain directory name, got {name!r}")
        if is_uri(storage):
            fs, path, base, query = open_uri(storage)
            return cls(base, name, fs, path, query)
        root = str(Path(storage).expanduser().resolve())
        return cls(root, name, pafs.LocalFileSystem(), root)

    def check(self) -> None:
        """A bucket that is unreachable, missing or not readable is a ConfigError naming it."""
        check_bucket(self.fs, self.fs_root, self.root)

    @property
    def uri(self) -> str:
        """The experiment directory as users name it (Tune gets ``path()`` with ``fs``)."""
        return f"{self.root}/{self.name}"

    def path(self, *parts: str) -> str:
        return "/".join([self.fs_root, self.name, *parts])

    def display(self, *parts: str) -> str:
        """A URI for users: options kept, so ``best/``'s can be given to ``serve --prompt`` as printed."""
        return "/".join([self.uri, *parts]) + (f"?{self.query}" if self.query else "")

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One file, whole or not at all: a local one through ``files.atomic_write``; a bucket's object appears
        only when its upload completes."""
        target = self.path(rel)
        if self.local:
            atomic_write_bytes(target, data)
            return
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(target) as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        """A JSON file the sweep can compute again (None when missing); a damaged one (a truncated copy an
        older version left) is named in a warning and treated as missing."""
        data = self.read_bytes(rel)
        try:
            return None if data is None else json.loads(data)
        except ValueError as e:
            log.warning("warning: %s is truncated or not JSON (%s); computing it again", self.display(rel), e)
            return None

    def read_yaml(self, rel: str) -> dict[str, Any] | None:
        """A YAML mapping (None when missing); a damaged file is a ConfigError naming it."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError as e:
            doc = e
        if not isinstance(doc, dict):
            raise ConfigError(f"{self.display(rel)} is truncated or not a YAML mapping ({doc}); restore it, or "
                              "start the sweep again under a new --name")
        return doc

    def upload_dir(self, local_dir: Path, rel: str, files: tuple[str, ...]) -> None:
        """Replace directory ``rel`` with the given files of ``local_dir``; no reader sees a mix of the old and the
        new (``storage.publish_files``: swapped in whole locally, a manifest written last in a bucket)."""
        publish_files(self.fs, self.path(rel), {name: (Path(local_dir) / name).read_bytes() for name in files})
