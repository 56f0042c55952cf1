"""Config values are typed: YAML 1.1 numbers are numbers, a wrong type is an error naming its key.

Covers the three places users write config: run configs (``train --config``), search spaces and Serve args.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from paraphrase_ray.config import RunConfig, from_dict, load_yaml, replace_nested
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.serve.protocol import ServeSettings
from paraphrase_ray.sweep.spec import spec_from_dict


def test_yaml11_numbers_are_numbers(tmp_path):
    # PyYAML reads `3e-2` (no dot) as a string: the bug this guards against
    assert yaml.safe_load("lr: 3e-2")["lr"] == "3e-2"
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 3e-2, steps: 1e2, betas: [0.9, 9.99e-1]}\ndata: {weights: [1, 2e0], sources: [a, b]}\n")
    cfg = from_dict(RunConfig, load_yaml(path))
    assert cfg.train.lr == pytest.approx(0.03) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.train.betas == (0.9, 0.999)
    assert cfg.data.weights == (1.0, 2.0)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"steps": 12.7}}, "train.steps must be an integer, got 12.7"),
        ({"train": {"steps": True}}, "train.steps must be an integer, got True"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number, got 'fast'"),
        ({"template": {"chat": "false"}}, "template.chat must be true or false, got 'false' (a quoted string"),
        ({"data": {"val_size": "x"}}, "data.val_size must be an integer or null"),
        ({"data": {"sources": [1]}}, "data.sources must be a list of strings, got [1]"),
        ({"train": {"betas": [0.9]}}, "train.betas must be a list of 2 values"),
        ({"model": 3}, "model must be a string, got 3"),
        ({"train": 5}, "train must be a mapping of TrainConfig keys, got 5"),
    ],
)
def test_wrong_type_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    assert message in str(err.value)


def test_dotted_overrides_are_typed_and_accept_numpy_scalars():
    cfg = replace_nested(RunConfig(), {"train.lr": "1e-3", "prompt.n_tokens": np.int64(4), "train.steps": 8.0})
    assert (cfg.train.lr, cfg.prompt.n_tokens, cfg.train.steps) == (0.001, 4, 8)
    assert type(cfg.prompt.n_tokens) is int
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer, got 8\.5"):
        replace_nested(RunConfig(), {"train.steps": 8.5})


def _space(**over):
    space = {
        "run": {"train": {"steps": 16, "eval_every": 8}},
        "search": {"train.lr": {"type": "float", "low": "1e-3", "high": 3e-1, "log": True}},
        "scheduler": {"grace_period": 8},
    }
    for key, value in over.items():
        space[key] = value
    return space


def test_search_space_values_are_typed():
    spec = spec_from_dict(_space())
    assert spec.search["train.lr"].low == 0.001
    # choice values reach RunConfig through the same check: YAML 1.1 numbers work, wrong types are named
    spec = spec_from_dict(_space(search={"train.lr": ["1e-3", 0.03]}))
    assert spec.search["train.lr"].values == ("1e-3", 0.03)
    with pytest.raises(ConfigError, match=r"search\.train\.lr: value 'fast' is not valid: train\.lr must be a number"):
        spec_from_dict(_space(search={"train.lr": ["fast"]}))
    with pytest.raises(ConfigError, match=r"num_samples must be an integer, got 2\.5"):
        spec_from_dict(_space(num_samples=2.5))
    with pytest.raises(ConfigError, match=r"run\.train\.steps must be an integer, got '16 steps'"):
        spec_from_dict(_space(run={"train": {"steps": "16 steps"}}))


def test_serve_args_are_typed(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # ServeSettings checks the directory's shape only
    ok = from_dict(ServeSettings, {"prompts": [str(tmp_path)], "max_texts": "1e2", "batch_wait_max_s": 1})
    assert ok.max_texts == 100 and ok.batch_wait_max_s == 1.0
    with pytest.raises(ConfigError, match=r"args\.max_texts must be an integer, got 'many'"):
        from_dict(ServeSettings, {"prompts": [str(tmp_path)], "max_texts": "many"}, where="args.")


def test_rerank_method_is_checked_by_name():
    assert from_dict(RunConfig, {"generation": {"rerank": "roundtrip"}}).generation.rerank == "roundtrip"
    with pytest.raises(ConfigError, match=r"generation.rerank must be one of \('detector', 'roundtrip'\), got 'lm'"):
        from_dict(RunConfig, {"generation": {"rerank": "lm"}})
