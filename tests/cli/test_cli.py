"""End to end through the CLI: train a tiny OPT, save, reload (ours and PEFT), paraphrase a file."""

from __future__ import annotations

import json

import pytest
import torch

from paraphrase_ray.cli.main import COMMANDS, main
from paraphrase_ray.cli.parser import build_parser
from paraphrase_ray.prompt.soft_prompt import SoftPrompt


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
    from paraphrase_ray import Paraphraser

    api = Paraphraser.from_pretrained(out, device="cpu")  # the CLI's generation and rerank, in code
    api_cands = api.paraphrase(["The bank raised rates.", "Snow fell all night."], return_candidates=True,
                               max_new_tokens=8)
    assert [(r["id"], r["prediction"]) for r in rows] == [(7, api_cands[0][0]), (8, api_cands[1][0])]
    # every row carries the detector's flags; a random model's output is never accepted, and the flags say why
    assert all(r["acceptable"] is False and (r["added"] or r["dropped"] or r["garbled"] or r["copy"]
                                             or r["invented_facts"] or r["dropped_facts"]) for r in rows), rows
    assert "0/2 (0%) accepted" in capsys.readouterr().err
    kept = tmp_path / "kept.jsonl"
    assert main(["paraphrase", "--prompt", str(out), "--input", str(src), "--output", str(kept), "--max-new-tokens", "8",
                 "--only-accepted"]) == 0
    assert kept.read_text() == "" and "wrote 0 paraphrases" in capsys.readouterr().err
    assert main(["paraphrase", "--prompt", str(out), "--text", "It rained all day.", "--max-new-tokens", "6",
                 "--only-accepted"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "rejected by the detector" in printed.err

    assert main(["paraphrase", "--prompt", str(out), "--text", "It rained.", "--num-candidates", "3",
                 "--max-new-tokens", "6"]) == 0
    # all three candidates, best first, one per line: the API's for the same text
    want = api.paraphrase(["It rained."], num_candidates=3, return_candidates=True, max_new_tokens=6)[0]
    assert capsys.readouterr().out.splitlines() == want

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


def _raising(exc: BaseException):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize("error", ["ConfigError", "InputError", "DataError", "PromptFileError", "HubError",
                                   "ModelLoadError"])
def test_every_project_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    from paraphrase_ray import errors

    monkeypatch.setitem(COMMANDS, "data", _raising(getattr(errors, error)("the reason, and the fix")))
    assert main(["data", "sample"]) == 2
    assert capsys.readouterr().err == "error: the reason, and the fix\n"


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), ValueError("a plain ValueError"),
                                 RuntimeError("a bug")])
def test_any_other_exception_is_not_swallowed(monkeypatch, capsys, exc):
    """Not a ParaphraseRayError: a bug, so main() lets it propagate (a traceback, exit 1) instead of exit 2."""
    monkeypatch.setitem(COMMANDS, "data", _raising(exc))
    with pytest.raises(type(exc), match=str(exc)):
        main(["data", "sample"])
    assert "error:" not in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "data", _raising(KeyboardInterrupt()))
    assert main(["data", "sample"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_process_exit_codes_of_python_m_paraphrase_ray_cli(tmp_path):
    """From a shell: --help (without importing torch or Ray), a user error (2, one line), a bug (1, a traceback)."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    r = run("-m", "paraphrase_ray.cli", "--help")
    assert r.returncode == 0 and "paraphrase-ray" in r.stdout and "serve" in r.stdout, r.stderr
    r = run("-c", "import sys, paraphrase_ray.cli.main; print(sorted({'torch', 'ray'} & set(sys.modules)))")
    assert r.stdout.strip() == "[]", r.stderr
    r = run("-m", "paraphrase_ray.cli", "data", "no-such-file.jsonl")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: data source 'no-such-file.jsonl' is not a file, an hf: spec, or 'sample'"
    ], r.stderr
    bug = ("import sys; from paraphrase_ray.cli import main as m; m.COMMANDS['data'] = lambda args: 1 / 0; "
           "sys.exit(m.main(['data', 'sample']))")
    r = run("-c", bug)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr
    assert "error:" not in r.stderr


def test_every_command_documents_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "paraphrase", "evaluate", "tune", "serve", "explain", "data"} <= set(sub.choices)
    assert set(COMMANDS) == set(sub.choices)  # every command is dispatched, and nothing else
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
    source = "The weather was so cold that the lake froze overnight."
    assert main(["paraphrase", "--prompt", str(out), "--text", source, "--num-candidates", "1"]) == 0  # greedy
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert len(lines) == 1, printed  # one candidate, one line: generation stopped at the end of the line
    text = lines[0].strip()
    # English from a working model: mostly letters, no special tokens, the source's facts carried over
    assert not any(s in text for s in ("<|", "|>", "</s>", "<s>", "\ufffd")), text
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text) and len(text.split()) >= 3, text
    content = {"weather", "cold", "lake", "froze", "overnight"}
    assert len(content & {w.strip(".,;:!?").lower() for w in text.split()}) >= 2, text
    # the prompt is used: the same decoding without it (the bare template) says something else
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.prompt.bundle import load_prompt
    from paraphrase_ray.prompt.directory import PromptMeta

    meta = PromptMeta.read(out)
    loaded, bundle = load_prompt(out)  # what the command loads: the recorded base model and precision
    assert paraphrase(loaded, [source], bundle.prompt, meta.template, meta.generation)[0][0] == text
    assert paraphrase(loaded, [source], None, meta.template, meta.generation)[0][0] != text


# -- every command's promises, through main() as a user runs them ---------------------------------------------
def _prompt_dir(tiny_model_dir, out, weight=None, max_new_tokens=8):
    from paraphrase_ray.config import GenerationConfig, PromptConfig, TemplateConfig, to_dict
    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    sp = SoftPrompt(weight) if weight is not None else SoftPrompt.init(
        loaded.model, loaded.tokenizer, PromptConfig(n_tokens=4, init="random", seed=1))
    meta = {"template": to_dict(TemplateConfig()), "generation": to_dict(GenerationConfig(max_new_tokens=max_new_tokens)),
            "max_source_tokens": 64, "train_config": {"precision": "fp32"}}
    sp.save(out, str(tiny_model_dir), loaded.model, meta)
    return out


def test_data_command_prints_counts_split_and_examples(capsys):
    from paraphrase_ray.config import DataConfig
    from paraphrase_ray.data import load_pairs

    assert main(["data", "sample", "--show", "2"]) == 0
    train, _, _ = load_pairs(DataConfig(sources=("sample",), val_fraction=0.1, seed=0))
    assert capsys.readouterr().out.splitlines() == [
        "read 320 rows, kept 320; dropped: none",
        "288 train / 32 validation pairs",
        f"  {train[0].source}",
        f"    -> {train[0].target}",
        f"  {train[1].source}",
        f"    -> {train[1].target}",
    ]
    assert main(["data", "sample", "--val-fraction", "0.25", "--seed", "3", "--show", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["read 320 rows, kept 320; dropped: none", "240 train / 80 validation pairs"]
    assert main(["data", "no-such-file.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: data source 'no-such-file.jsonl' is not a file, an hf: spec, or 'sample'"
    )


@pytest.mark.parametrize("command", ["paraphrase", "explain"])
def test_wrong_width_and_corrupt_prompt_dirs_exit_2_with_the_reason(tiny_model_dir, tmp_path, capsys, command):
    extra = ["--text", "Snow fell all night."] if command == "paraphrase" else []
    wide = _prompt_dir(tiny_model_dir, tmp_path / "wide", weight=torch.zeros(4, 32))  # the tiny OPT is 16 wide
    capsys.readouterr()
    assert main([command, "--prompt", str(wide), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: prompt in {wide} has embedding width 32 but the model's input embeddings are 16 wide: "
        "it was trained for a different base model"
    )
    bad = _prompt_dir(tiny_model_dir, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # a truncated download
    assert main([command, "--prompt", str(bad), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the base model's loading bar)
    assert err.startswith(f"error: {weights} is truncated or corrupt: "), err


def test_train_resume_continues_from_the_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p"
    base = ["train", "--model", str(tiny_model_dir), "--data", "sample", "--out", str(out), "--eval-every", "2",
            "--n-tokens", "3", "--device", "cpu", "--precision", "fp32"]
    assert main([*base, "--steps", "4", "--lr", "0.1"]) == 0
    first = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert first["step"] == 4 and [h["step"] for h in first["history"]] == [2, 4]
    capsys.readouterr()
    # a different lr from here on: had steps 1-4 run again, their losses would differ from the first run's
    assert main([*base, "--steps", "8", "--lr", "0.5", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {out / 'checkpoint'} at step 4" in captured.err
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["status"] == "completed" and metrics["steps"] == 8
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
    assert state["history"][:2] == first["history"]  # steps 1-4 were not run again
    # without --resume the same command starts over: step 4 under lr 0.5 is another loss
    assert main([*base, "--steps", "8", "--lr", "0.5"]) == 0
    assert "resumed from" not in capsys.readouterr().err
    again = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert again["history"][1]["train_loss"] != first["history"][1]["train_loss"]


def test_diverged_training_exits_1_and_saves_nothing(tiny_model_dir, tmp_path, capsys):
    # train.lr is capped below 10, which AdamW survives on this model: an init at 1e39 overflows at step 1
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("prompt:\n  init: random\n  random_range: 1.0e+39\n")
    out = tmp_path / "p"
    rc = main(["train", "--config", str(cfg), "--model", str(tiny_model_dir), "--data", "sample", "--out", str(out),
               "--steps", "3", "--n-tokens", "3", "--device", "cpu", "--precision", "fp32"])
    captured = capsys.readouterr()
    assert rc == 1
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "nan"
    assert captured.err.strip().splitlines()[-1] == (
        "error: training diverged (NaN/inf loss); nothing was saved. Try a lower --lr."
    )
    assert not (out / "adapter_model.safetensors").exists()


def _serve_args(monkeypatch, env_key=None):
    """cmd_serve with Ray replaced: what it prints and what it would deploy, without binding anything."""
    from paraphrase_ray.serve.runner import LocalServe

    deployed = {}

    def fake_deploy(self, settings, host, port, device="auto", replica_cpus=None, log_level=None):
        deployed.update(settings=settings, host=host, port=port)
        raise KeyboardInterrupt  # Ctrl-C during start-up

    monkeypatch.setattr(LocalServe, "deploy", fake_deploy)
    # shutdown(): True when the Ray is a local one (no --address), as before
    monkeypatch.setattr(LocalServe, "shutdown", lambda self: deployed.setdefault("shutdown", self.address is None))
    if env_key is None:
        monkeypatch.delenv("PARAPHRASE_RAY_API_KEY", raising=False)
    else:
        monkeypatch.setenv("PARAPHRASE_RAY_API_KEY", env_key)
    return deployed


def test_serve_warns_when_binding_all_interfaces_without_a_key(tiny_model_dir, tmp_path, capsys, monkeypatch):
    p = _prompt_dir(tiny_model_dir, tmp_path / "p")
    deployed = _serve_args(monkeypatch)
    assert main(["serve", "--prompt", str(p), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "warning: binding 0.0.0.0 without an API key; anyone who can reach it may use it "
        "(set --api-key or PARAPHRASE_RAY_API_KEY)",
        "shutting down",
    ]
    assert deployed["host"] == "0.0.0.0" and deployed["settings"].api_key is None and deployed["shutdown"] is True
    assert deployed["port"] == 8123
    # a key from the environment (or --api-key) silences it and reaches the app's settings
    deployed = _serve_args(monkeypatch, env_key="from-env")
    assert main(["serve", "--prompt", str(p), "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().out.splitlines() == ["shutting down"]
    assert deployed["settings"].api_key == "from-env"
    deployed = _serve_args(monkeypatch, env_key="from-env")
    assert main(["serve", "--prompt", str(p), "--host", "0.0.0.0", "--api-key", "flag"]) == 0
    assert deployed["settings"].api_key == "flag"  # the flag wins
    capsys.readouterr()
    deployed = _serve_args(monkeypatch)
    assert main(["serve", "--prompt", str(p)]) == 0  # loopback by default: no warning
    assert capsys.readouterr().out.splitlines() == ["shutting down"] and deployed["host"] == "127.0.0.1"
    assert deployed["port"] == 8000  # the default port


def test_serve_demo_deploys_asks_and_shuts_down_through_the_runner(monkeypatch):
    import paraphrase_ray.serve.runner as runner

    calls = []
    monkeypatch.setattr(runner, "demo", lambda prompt_dirs, port=0: calls.append((prompt_dirs, port)) or 0)
    assert main(["serve", "--prompt", "a=x", "--prompt", "y", "--demo"]) == 0
    assert main(["serve", "--prompt", "x", "--demo", "--port", "8124"]) == 0
    assert calls == [(["a=x", "y"], 0), (["x"], 8124)]  # port 0: a free one


@pytest.mark.slow
def test_serve_command_serves_http_until_sigint(tiny_model_dir, tmp_path):
    """`paraphrase-ray serve` as a user runs it: a subprocess on a free loopback port, the key from the
    environment, /healthz, one /paraphrase (the offline answer), then Ctrl-C: it exits 0 and says so."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from paraphrase_ray.config import GenerationConfig, TemplateConfig
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.models import load_model

    p = _prompt_dir(tiny_model_dir, tmp_path / "p")
    text = "Snow fell all night."
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    want = paraphrase(loaded, [text], SoftPrompt.load(p), TemplateConfig(), GenerationConfig(max_new_tokens=8))[0][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PARAPHRASE_RAY_API_KEY": "cli-key"}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paraphrase_ray.cli.main", "serve", "--prompt", f"mine={p}", "--port", str(port),
             "--device", "cpu"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            # started as a shell starts a background job (`paraphrase-ray serve ... &`): SIGINT ignored; Ctrl-C
            # must still stop it (it hung here when `make test` itself ran in the background)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # Ray and Serve start slowly on a busy 2-core machine
        while "serving prompts" not in log_path.read_text():  # printed once the app is deployed
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "serve never said it was serving:\n" + log_path.read_text()[-3000:]
            time.sleep(1)
        assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
        assert httpx.post(url + "/paraphrase", json={"text": text}, timeout=60).status_code == 401
        r = httpx.post(url + "/paraphrase", json={"text": text}, headers={"Authorization": "Bearer cli-key"},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["prompt"] == "mine" and r.json()["results"][0]["paraphrase"] == want
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert f"serving prompts mine (default mine; also 'zero-shot') at {url}  docs: {url}/docs  auth: on" in out
    assert "shutting down" in out.splitlines(), out[-3000:]
    assert "warning: binding" not in out


def test_paraphrase_stats_file_and_summary_line(tiny_model_dir, tmp_path, capsys):
    """--stats writes what the one-line summary says: the rows, the new tokens of what was written (re-tokenized),
    the engine path (the tiny OPT has no llama.cpp blocks and is no Llama: fp32 + prefix cache)."""
    from transformers import AutoTokenizer

    from paraphrase_ray import Paraphraser

    prompt = tmp_path / "p"
    SoftPrompt(torch.randn(3, 16) * 0.1).save(prompt, str(tiny_model_dir))
    sources = ["The bank raised rates.", "Snow fell."]
    src, dst, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    assert main(["paraphrase", "--prompt", str(prompt), "--input", str(src), "--output", str(dst),
                 "--max-new-tokens", "6", "--num-candidates", "1", "--stats", str(stats)]) == 0
    st = json.loads(stats.read_text())
    preds = [json.loads(line)["prediction"] for line in dst.read_text().splitlines()]
    # the CLI writes what the Python API paraphrases (greedy: one candidate)
    assert preds == Paraphraser.from_pretrained(prompt, device="cpu").paraphrase(sources, num_candidates=1,
                                                                                  max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    new_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds)
    assert new_tokens > 0 and st["generate_s"] > 0 and st["load_s"] > 0
    assert st == {"rows": 2, "new_tokens": new_tokens, "generate_s": st["generate_s"], "load_s": st["load_s"],
                  "path": "fp32+prefix-cache", "num_candidates": 1, "accepted": 0}
    err = capsys.readouterr().err
    assert f"wrote 2 paraphrases to {dst} in " in err and "new tokens/s, fp32+prefix-cache" in err


@pytest.mark.slow
def test_q4_generation_gives_the_exact_paths_tokens(smollm):
    """On the embedded model (every Linear a llama.cpp Q4_1 / Q8_0 block), the default low-bit path decodes the
    same tokens as the plain fp32 path, batched and alone."""
    import dataclasses

    from paraphrase_ray.config import GenerationConfig, TemplateConfig
    from paraphrase_ray.generation.backends.lowbit import generation_model
    from paraphrase_ray.generation.generate import paraphrase

    if generation_model(smollm, "auto")[1] != "q4":
        pytest.skip("no compiler / AVX2 here: the q4 kernel did not build")
    srcs = ["The Danube flows for about 2,850 kilometres from the Black Forest to the Black Sea.",
            "Marie Curie won the Nobel Prize in Physics in 1903.",
            "She could not attend the meeting because her flight was delayed."]
    gen = GenerationConfig(max_new_tokens=24)
    t = TemplateConfig()
    fast = paraphrase(smollm, srcs, None, t, gen, batch_size=3)
    exact = paraphrase(smollm, srcs, None, t, dataclasses.replace(gen, quantize="none"), batch_size=3)
    alone = [paraphrase(smollm, [s], None, t, gen)[0] for s in srcs]
    assert fast == exact == alone and all(c[0] for c in fast)


def test_train_refuses_an_out_dir_of_other_files_before_any_work(tiny_model_dir, tmp_path, capsys):
    """`train --out .` in a repository used to overwrite its README.md with the model card (issue 24)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# my project\n")
    (repo / "setup.py").write_text("print('hi')\n")
    before = {p.name: p.read_bytes() for p in repo.iterdir()}
    rc = main(["train", "--model", str(tiny_model_dir), "--data", "sample", "--out", str(repo), "--steps", "2",
               "--n-tokens", "3", "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --out {repo} already holds files")
    assert "README.md" in err and {p.name: p.read_bytes() for p in repo.iterdir()} == before  # nothing touched
    # what stays allowed: a new or empty directory, a prompt directory (re-training, --resume), and one that a
    # killed first run left holding only its checkpoint, or its weights and a temp
    from paraphrase_ray.errors import ConfigError
    from paraphrase_ray.prompt.directory import check_out_dir

    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    check_out_dir(tmp_path / "new")
    SoftPrompt(torch.randn(3, 16)).save(tmp_path / "prompt", str(tiny_model_dir))
    check_out_dir(tmp_path / "prompt")
    SoftPrompt(torch.randn(3, 16)).save(tmp_path / "killed" / "checkpoint", str(tiny_model_dir))
    check_out_dir(tmp_path / "killed")
    (tmp_path / "killed" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "killed" / ".adapter_config.json.tmp-host-1-ab").write_text("{")
    check_out_dir(tmp_path / "killed")
    with pytest.raises(ConfigError, match="README.md"):  # a model card alone is no prompt: it may be anyone's
        (tmp_path / "card").mkdir()
        (tmp_path / "card" / "README.md").write_text("# notes\n")
        check_out_dir(tmp_path / "card")


def test_paraphrase_output_is_never_written_over_unless_asked_and_never_over_its_input(tiny_model_dir, tmp_path,
                                                                                      capsys):
    prompt = tmp_path / "p"
    SoftPrompt(torch.randn(3, 16) * 0.1).save(prompt, str(tiny_model_dir))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"source": "Snow fell all night."}) + "\n")
    dst = tmp_path / "out.jsonl"
    dst.write_text("results someone kept\n")
    base = ["paraphrase", "--prompt", str(prompt), "--input", str(src), "--max-new-tokens", "4",
            "--num-candidates", "1", "--device", "cpu"]
    assert main([*base, "--output", str(dst)]) == 2
    assert "already exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert dst.read_text() == "results someone kept\n"
    for out in (src, tmp_path):  # the input itself, or a directory holding it: not even with --overwrite
        assert main([*base, "--output", str(out), "--overwrite"]) == 2
        assert "holds the input" in capsys.readouterr().err
    assert src.read_text() == json.dumps({"source": "Snow fell all night."}) + "\n"
    assert main([*base, "--output", str(dst), "--overwrite"]) == 0
    assert json.loads(dst.read_text().splitlines()[0])["source"] == "Snow fell all night."
