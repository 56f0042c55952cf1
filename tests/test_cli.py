"""End to end through the CLI: train a tiny OPT, save, reload (ours and PEFT), paraphrase a file."""

from __future__ import annotations

import json

import pytest
import torch

from paraphrase_ray.cli import build_parser, main
from paraphrase_ray.prompt import SoftPrompt


def test_train_then_paraphrase_file_then_peft(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "prompt"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", "sample", "--out", str(out), "--steps", "6",
               "--eval-every", "3", "--n-tokens", "5", "--init", "text", "--lr", "0.1", "--device", "cpu",
               "--precision", "fp32"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["status"] == "completed" and metrics["steps"] == 6 and metrics["tokens_per_s"] > 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "paraphrase_ray.json", "checkpoint/trainer_state.json"):
        assert (out / f).is_file(), f

    src = tmp_path / "in.jsonl"
    src.write_text('{"source": "The bank raised rates.", "id": 7}\n{"source": "Snow fell all night.", "id": 8}\n')
    dst = tmp_path / "out.jsonl"
    assert main(["paraphrase", "--prompt", str(out), "--input", str(src), "--output", str(dst), "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and all(isinstance(r["prediction"], str) for r in rows)

    assert main(["paraphrase", "--prompt", str(out), "--text", "It rained.", "--num-candidates", "3",
                 "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    # the same directory loads in PEFT with identical prompt vectors
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, str(out))
    theirs = peft_model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(theirs, SoftPrompt.load(out).weight)


def test_user_errors_are_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    assert main(["paraphrase", "--prompt", str(tmp_path / "missing"), "--text", "hi"]) == 2
    assert "error:" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stpes: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "steps" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no source column"}\n')
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "source_column" in capsys.readouterr().err
    assert main(["train", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "Fix" in err


def test_every_command_documents_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "paraphrase", "evaluate", "tune", "serve", "explain", "data"} <= set(sub.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.slow
def test_issue_commands_on_the_embedded_model(tmp_path, mrpc_path, capsys):
    """The exact commands of the README on smollm2-135m (2 steps here to keep CI short)."""
    out = tmp_path / "p"
    cfg = tmp_path / "short.yaml"
    cfg.write_text("train:\n  eval_batches: 1\n")  # one validation batch: CI time, not coverage, is the cost
    assert main(["train", "--model", "smollm2-135m", "--data", str(mrpc_path), "--steps", "2", "--out", str(out),
                 "--eval-every", "2", "--batch-size", "4", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["paraphrase", "--prompt", str(out), "--text",
                 "The weather was so cold that the lake froze overnight."]) == 0
    assert capsys.readouterr().out.strip()
