"""Every shipped search space parses and validates; a typo or a bad range is an error that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.sweep.spec import load_spec, smoke, spec_from_dict, spec_to_dict

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))


def test_spaces_are_shipped():
    assert {p.name for p in SPACES} >= {"default.yaml", "quickstart.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_space_validates_and_round_trips(path):
    spec = load_spec(path)
    assert spec.search and spec.num_samples >= 1
    for point in spec.searcher.points_to_evaluate:
        assert set(point) <= set(spec.search)
    # space.yaml stored beside a sweep must read back to the same spec (--resume relies on it)
    assert spec_from_dict(yaml.safe_load(yaml.safe_dump(spec_to_dict(spec)))) == spec
    small = smoke(spec)
    assert small.num_samples == 2 and small.run.train.steps == 4 and small.scheduler.grace_period <= 4


def test_default_space_is_the_gpu_sweep():
    spec = load_spec(SPACES[0].parent / "default.yaml")
    assert set(spec.models) == {"facebook/opt-125m", "facebook/opt-350m"}
    n = spec.search["prompt.n_tokens"]
    assert n.type == "int" and n.low <= 5 and n.high >= 150 and n.log
    assert {"vocab", "random"} <= set(spec.search["prompt.init"].values)
    lr = spec.search["train.lr"]
    assert lr.log and lr.low <= 1e-4 and lr.high >= 0.3
    assert spec.resources.gpu == 0.25  # four OPT trials per L4/A100 (cluster.yaml)
    assert spec.searcher.name == "optuna" and spec.scheduler.name == "asha"
    assert {
        "prompt.n_tokens": 20,
        "prompt.init": "vocab",
        "train.lr": 0.3,
    }.items() <= spec.searcher.points_to_evaluate[0].items()


def test_quickstart_space_runs_on_cpu_offline():
    spec = load_spec(SPACES[0].parent / "quickstart.yaml")
    assert spec.run.model == "smollm2-135m" and spec.resources.gpu == 0 and spec.evaluator.gpu == 0
    assert spec.num_samples * spec.run.train.steps <= 100  # a few short trials
    assert spec.max_concurrent_trials * spec.resources.cpu <= 2  # fits a 2-core machine


def test_base_models_space_sweeps_the_offline_base_models():
    from paraphrase_ray.models import OFFLINE_ALIASES

    spec = load_spec(SPACES[0].parent / "base_models.yaml")
    assert spec.models == ["smollm2-135m", "gemma3-270m"] and set(spec.models) <= set(OFFLINE_ALIASES)
    assert not spec.run.template.chat  # Gemma-3-270m (base) has no chat template
    small = smoke(spec)  # the 2-trial smoke sweep trains each base model once
    assert [p["model"] for p in small.searcher.points_to_evaluate] == spec.models
    assert spec.resources.gpu == 0 and spec.max_concurrent_trials * spec.resources.cpu <= 2


BASE = {
    "run": {"train": {"steps": 20, "eval_every": 10}},
    "search": {"prompt.n_tokens": {"type": "int", "low": 4, "high": 16}, "train.lr": [0.01, 0.1]},
    "scheduler": {"grace_period": 10},
}


def _with(**changes):
    import copy

    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = d
        *parents, last = dotted.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return d


def test_base_spec_is_valid():
    spec = spec_from_dict(BASE)
    assert spec.search["train.lr"].type == "choice"  # a list is shorthand for a choice


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"num_sample": 3}, "num_sample"),  # top-level typo
        ({"scheduler/grace_perod": 5}, "grace_perod"),  # typo in a section
        ({"run/train/lrr": 0.1}, "lrr"),  # typo in the trials' RunConfig
        ({"search/train.lr": {"type": "float", "low": 0.01, "hgh": 0.1}}, "hgh"),  # typo in a range
        ({"search/train.lrr": [0.1]}, "train.lrr"),  # searched key that RunConfig lacks
        ({"search/prompt.n_tokens": {"type": "int", "low": 4, "high": 600}}, "prompt.n_tokens"),  # > 512
        ({"search/prompt.init": ["vocab", "bogus"]}, "prompt.init"),
        ({"search/train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "train.lr"),
        ({"search/data.seed": [0, 1]}, "data.seed"),  # held-out rows must not vary
        ({"searcher/points_to_evaluate": [{"prompt.n_tokens": 99}]}, "prompt.n_tokens"),  # outside the range
        ({"searcher/points_to_evaluate": [{"prompt.init": "vocab"}]}, "prompt.init"),  # not searched
        ({"scheduler/grace_period": 50}, "grace_period"),  # beyond run.train.steps
        ({"scheduler/name": "hyperband"}, "scheduler.name"),
        ({"objective/metric": "bleu"}, "objective.metric"),
        ({"resources/gpu": 1.5}, "resources.gpu"),
    ],
)
def test_bad_spaces_name_the_key(changes, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        spec_from_dict(_with(**changes))


def test_load_spec_names_the_file(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump({**BASE, "max_concurent_trials": 2}))
    with pytest.raises(
        ConfigError, match=r"typo\.yaml.*max_concurent_trials.*did you mean 'max_concurrent_trials'"
    ):
        load_spec(p)
