"""Prompt explanation: a prompt made of known token embeddings reports exactly those tokens first."""

from __future__ import annotations

import json

import pytest

from paraphrase_ray.cli.main import main
from paraphrase_ray.prompt.explain import explain_prompt
from paraphrase_ray.prompt.soft_prompt import SoftPrompt


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_prompt_from_known_ids_reports_those_ids(tiny, metric):
    table = tiny.model.get_input_embeddings().weight
    ids = [17, 42, 99, 250]
    exp = explain_prompt(SoftPrompt(table[ids]), table, tiny.tokenizer, top_k=3, metric=metric)
    assert [p["neighbours"][0]["token_id"] for p in exp["positions"]] == ids
    assert all(p["neighbours"][0]["distance"] == pytest.approx(0.0, abs=1e-5) for p in exp["positions"])
    assert all(len(p["neighbours"]) == 3 for p in exp["positions"])
    assert exp["positions"][0]["norm"] == pytest.approx(table[17].norm().item(), rel=1e-3)


def test_drifted_prompt_shows_large_norm(tiny):
    table = tiny.model.get_input_embeddings().weight
    exp = explain_prompt(SoftPrompt(table[[5]] * 50), table, tiny.tokenizer)
    assert exp["positions"][0]["norm"] > 10 * exp["embedding_norm_p95"]


def test_explain_cli_json(tiny, tiny_model_dir, tmp_path, capsys):
    table = tiny.model.get_input_embeddings().weight
    SoftPrompt(table[[7, 8]]).save(tmp_path / "p", str(tiny_model_dir), tiny.model)
    assert main(["explain", "--prompt", str(tmp_path / "p"), "--top-k", "2", "--json"]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert [p["neighbours"][0]["token_id"] for p in exp["positions"]] == [7, 8]
    assert main(["explain", "--prompt", str(tmp_path / "p")]) == 0
    assert "nearest tokens" in capsys.readouterr().out
