"""`paraphrase-ray evaluate` end to end on the tiny OPT, and the report library under it."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from paraphrase_ray import files
from paraphrase_ray.cli.main import main
from paraphrase_ray.config import DataConfig, GenerationConfig
from paraphrase_ray.data import Pair, load_pairs
from paraphrase_ray.evaluation import report

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def embedder():
    from paraphrase_ray.evaluation.embedder import load_embedder

    return load_embedder(device="cpu")


def _train(model_dir, out, extra: tuple[str, ...] = ()) -> None:
    argv = f"train --model {model_dir} --data sample --out {out} --steps 3 --eval-every 3 --n-tokens 4"
    assert main([*argv.split(), "--lr", "0.1", "--device", "cpu", "--precision", "fp32", *extra]) == 0


@pytest.fixture(scope="module")
def two_prompts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    _train(tiny_model_dir, root / "p-text", extra=("--init", "text"))
    _train(tiny_model_dir, root / "p-vocab", extra=("--init", "vocab"))
    return root / "p-text", root / "p-vocab"


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_model_dir, tmp_path_factory):
    """The tiny OPT with a chat template, so the chat zero-shot baseline runs without a real chat model."""
    d = tmp_path_factory.mktemp("tiny-chat") / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return d


def test_compare_two_prompts_and_zero_shot_end_to_end(two_prompts, tmp_path, capsys, embedder):
    p1, p2 = two_prompts
    capsys.readouterr()
    out = tmp_path / "reports" / "r.json"
    argv = f"evaluate --compare {p1} {p2} --zero-shot --data sample --limit 5 --examples 2 --batch-size 3"
    assert main([*argv.split(), "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = lines[0].split()
    assert header == ["metric", "p-text", "p-vocab", "zero-shot"]  # the tiny tokenizer has no chat template
    assert set(lines[1]) <= {"-", " "}
    table = {ln.split()[0]: ln.split()[1:] for ln in lines[2 : 2 + len(report._TABLE_ROWS)]}
    assert list(table) == [k for k, _ in report._TABLE_ROWS]
    assert table["n"] == ["5", "5", "5"]
    assert len({len(ln) for ln in lines[:12]}) == 1  # aligned: every table line has the same width
    assert "p-text vs zero-shot (best zero-shot): objective " in printed and "p-vocab vs zero-shot" in printed
    assert "[1] source" in printed and "[2] source" in printed and "[3] source" not in printed

    rep = json.loads(out.read_text())  # strict JSON: NaN would fail here (json.loads accepts it, so check)
    assert "NaN" not in out.read_text()
    assert rep["model"] == json.loads((p1 / "paraphrase_ray.json").read_text())["base_model"]
    assert rep["split"] == "validation" and rep["seed"] == 0 and rep["data"] == ["sample"]
    assert rep["systems"]["p-text"]["path"] == str(p1)
    assert set(rep["systems"]) == {"p-text", "p-vocab", "zero-shot"} and rep["best_zero_shot"] == "zero-shot"
    assert rep["n"] == 5 and len(rep["rows"]) == 5
    from paraphrase_ray.evaluation.metrics import score

    sources, refs = [r["source"] for r in rep["rows"]], [r["reference"] for r in rep["rows"]]
    for i, (name, s) in enumerate(rep["systems"].items()):
        # each system's summary is the metrics of the predictions it wrote, and the table prints those numbers
        preds = [r["predictions"][name] for r in rep["rows"]]
        assert s["summary"] == pytest.approx(score(sources, refs, preds, embedder), abs=1e-6, nan_ok=True)
        assert table["copy_rate"][i] == f"{100 * s['summary']['copy_rate']:.1f}%"
        assert table["objective"][i] == f"{s['summary']['objective']:.3f}"
        assert s["kind"] == ("zero-shot" if name == "zero-shot" else "prompt")
    assert rep["systems"]["p-text"]["n_tokens"] == 4 and rep["systems"]["zero-shot"]["n_tokens"] == 0
    assert rep["systems"]["zero-shot"]["template"]["separator"] == "\nParaphrase:"
    val = load_pairs(DataConfig(sources=("sample",), val_fraction=0.1, seed=0))[1][:5]
    assert [r["source"] for r in rep["rows"]] == [p.source for p in val]
    assert [r["reference"] for r in rep["rows"]] == [p.target for p in val]
    row = rep["rows"][0]
    assert set(row["predictions"]) == set(rep["systems"]) == set(row["scores"])
    # the printed summary is the mean of the rows written
    mean = sum(r["scores"]["p-vocab"]["objective"] for r in rep["rows"]) / 5
    assert math.isclose(rep["systems"]["p-vocab"]["summary"]["objective"], mean, abs_tol=1e-9)


def test_single_prompt_split_all_and_zero_shot_alone(two_prompts, tiny_model_dir, tmp_path, capsys):
    p1, _ = two_prompts
    held_out = tmp_path / "held.jsonl"
    rows = [
        {"source": "The bank raised its rates again.", "target": "Rates went up at the bank once more."},
        {"source": "Snow fell all night long.", "target": "It snowed through the night."},
        {"source": "Bad row", "target": "label zero", "label": 0},
    ]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    out = tmp_path / "one.json"
    argv = f"evaluate --prompt {p1} --data {held_out} --split all --examples 0 --output {out}"
    assert main(argv.split()) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["metric", "p-text"] and "[1] source" not in printed
    rep = json.loads(out.read_text())
    assert rep["split"] == "all" and rep["val_fraction"] is None and rep["best_zero_shot"] is None
    assert [r["source"] for r in rep["rows"]] == [rows[0]["source"], rows[1]["source"]]  # file order, label 1

    argv = f"evaluate --zero-shot --model {tiny_model_dir} --data {held_out} --split all --limit 1 --output {out}"
    assert main(argv.split()) == 0
    rep = json.loads(out.read_text())
    assert list(rep["systems"]) == ["zero-shot"] and rep["n"] == 1
    assert "zero-shot" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(two_prompts, tiny_model_dir, tmp_path, capsys):
    p1, _ = two_prompts
    capsys.readouterr()
    cases = [
        (["evaluate", "--data", "sample"], "--zero-shot"),
        (["evaluate", "--prompt", str(tmp_path / "nope"), "--data", "sample"], "nope"),
        (["evaluate", "--prompt", str(p1), "--data", "sample", "--limit", "0"], "--limit"),
        (["evaluate", "--prompt", str(p1), "--data", "sample", "--val-fraction", "0"], "--val-fraction"),
        (["evaluate", "--prompt", str(p1), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (
            f"evaluate --zero-shot --model {tiny_model_dir} --data sample --embedder {tmp_path}/no-emb".split(),
            "emb",
        ),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err, (argv, err)
        assert "Traceback" not in err


def test_zero_shot_baseline_keeps_plain_and_chat_and_picks_the_better(tiny_chat_dir, embedder):
    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_chat_dir), precision="fp32", device="cpu", cache=False)
    assert loaded.is_chat
    pairs = load_pairs(DataConfig(sources=("sample",)))[1][:4]
    base = report.zero_shot_baseline(
        loaded, pairs, embedder, GenerationConfig(max_new_tokens=6), batch_size=2
    )
    assert set(base["systems"]) == {"zero-shot", "zero-shot-chat"}
    best = max(base["systems"], key=lambda n: report.rank_key(base["systems"][n]))
    assert base["best"] == best and base["summary"] == base["systems"][best]
    rep = base["report"]
    assert rep["systems"]["zero-shot-chat"]["chat"] is True and rep["systems"]["zero-shot"]["chat"] is False
    assert all(len(r["predictions"]) == 2 for r in rep["rows"])


def test_eval_pairs_validation_is_the_training_split_and_all_is_every_row():
    for seed, frac in ((0, 0.1), (3, 0.25)):
        train, val, _ = load_pairs(DataConfig(sources=("sample",), val_fraction=frac, seed=seed))
        got = report.eval_pairs(["sample"], "validation", frac, seed)
        assert got == val and not set(got) & set(train)
    assert report.eval_pairs(["sample"], "validation", 0.1, 0, limit=2) == val_first(2)
    every = report.eval_pairs(["sample"], "all")
    train, val, _ = load_pairs(DataConfig(sources=("sample",)))
    assert sorted(every, key=str) == sorted(train + val, key=str)


def val_first(n: int) -> list[Pair]:
    return load_pairs(DataConfig(sources=("sample",), val_fraction=0.1, seed=0))[1][:n]


def test_format_table_aligns_and_marks_undefined_metrics():
    s1 = {
        "n": 3,
        "objective": 0.5,
        "success_rate": 1 / 3,
        "adequacy": 0.9,
        "ref_similarity": float("nan"),
        "self_bleu": 12.345,
        "ref_bleu": float("nan"),
        "ibleu": None,
        "copy_rate": 0.0,
        "empty_rate": 0.0,
    }
    text = report.format_table({"a-long-system-name": s1, "b": dict(s1, objective=0.25)})
    lines = text.splitlines()
    assert len({len(ln) for ln in lines}) == 1
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
    assert rows["objective"] == ["0.500", "0.250"] and rows["success_rate"] == ["33.3%", "33.3%"]
    assert (
        rows["self_bleu"] == ["12.3", "12.3"]
        and rows["ref_bleu"] == ["-", "-"]
        and rows["ibleu"] == ["-", "-"]
    )
    assert report.rank_key(s1) > report.rank_key(dict(s1, objective=0.4))
    assert files.jsonable({"x": [float("nan"), 1.0]}) == {"x": [None, 1.0]}


def test_split_warning_names_a_prompt_trained_on_another_split():
    metas = {
        "p": {"data": {"sources": ["sample"], "seed": 5, "val_fraction": 0.1, "val_size": None}},
        "other-data": {"data": {"sources": ["x.jsonl"], "seed": 5, "val_fraction": 0.1}},
        "same": {"data": {"sources": ["sample"], "seed": 0, "val_fraction": 0.1, "val_size": None}},
    }
    warnings = report.split_warnings(metas, ["sample"], 0.1, 0)
    assert len(warnings) == 1 and "p was trained with seed=5" in warnings[0]


# -- core options the quality benchmark relies on --------------------------------------------------------------
def test_chat_template_training_layout_and_zero_shot_chat_rows(tiny_chat_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    from paraphrase_ray.config import TemplateConfig
    from paraphrase_ray.data import IGNORE, encode_pair, encode_source
    from paraphrase_ray.errors import DataError
    from paraphrase_ray.generation.generate import ZERO_SHOT_INSTRUCTION, row_for
    from paraphrase_ray.models import load_model

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_dir))
    template = TemplateConfig(prefix="Say it again: ", separator="", target_prefix="", chat=True)
    pair = Pair("The bank raised rates.", "Rates went up.")
    ids, labels = encode_pair(tok, pair, template, 64, 64)
    want = tok.apply_chat_template(
        [{"role": "user", "content": "Say it again: " + pair.source}],
        add_generation_prompt=True,
        tokenize=True,
    )
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert ids[: len(want)] == want and labels[: len(want)] == [IGNORE] * len(want)
    assert [t for t in labels if t != IGNORE] == tok("Rates went up.", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id]
    short = encode_source(tok, "word " * 50, template, 5)  # the source is cut, the chat frame is not
    assert tok.decode(short).endswith("assistant:") and len(short) < len(
        encode_source(tok, "word " * 50, template, 64)
    )
    with pytest.raises(DataError, match="chat template"):
        encode_source(AutoTokenizer.from_pretrained(str(tiny_model_dir)), "hi", template, 64)

    loaded = load_model(str(tiny_chat_dir), precision="fp32", device="cpu", cache=False)
    row = row_for(loaded, "A long source " * 30, None, TemplateConfig(), GenerationConfig(), 4, chat=True)
    full = tok.apply_chat_template(
        [{"role": "user", "content": ZERO_SHOT_INSTRUCTION.format(source="A long source " * 30)}],
        add_generation_prompt=True,
        tokenize=True,
    )
    assert row.ids == list(full["input_ids"] if hasattr(full, "keys") else full)  # baseline: never cut


def test_train_in_chat_template_then_evaluate(tiny_chat_dir, tmp_path, capsys):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(
        "template:\n  chat: true\n  prefix: 'Paraphrase: '\n  separator: ''\n  target_prefix: ''\n"
        "data:\n  max_train_self_bleu: 60\n"
    )
    out = tmp_path / "p-chat"
    argv = f"train --config {cfg} --model {tiny_chat_dir} --data sample --out {out} --steps 2 --eval-every 2"
    assert main([*argv.split(), "--n-tokens", "3", "--device", "cpu", "--precision", "fp32"]) == 0
    assert json.loads((out / "paraphrase_ray.json").read_text())["template"]["chat"] is True
    capsys.readouterr()
    rep_path = tmp_path / "r.json"
    argv = f"evaluate --prompt {out} --zero-shot --data sample --limit 2 --examples 1 --output {rep_path}"
    assert main(argv.split()) == 0
    rep = json.loads(rep_path.read_text())
    assert list(rep["systems"]) == ["p-chat", "zero-shot", "zero-shot-chat"]
    assert rep["systems"]["p-chat"]["template"]["chat"] is True and rep["best_zero_shot"] in rep["systems"]


def test_near_copy_training_pairs_are_dropped_from_training_only():
    from paraphrase_ray.text import sentence_bleu

    base = DataConfig(sources=("sample",))
    train, val, rep = load_pairs(base)
    f_train, f_val, f_rep = load_pairs(DataConfig(sources=("sample",), max_train_self_bleu=30))
    assert f_val == val  # evaluation rows never move
    dropped = [p for p in train if sentence_bleu(p.target, p.source) >= 30]
    assert dropped and set(f_train) == set(train) - set(dropped)
    assert sum(f_rep.dropped.values()) - sum(rep.dropped.values()) == len(dropped)
    assert f_rep.kept == rep.kept - len(dropped)
    with pytest.raises(ValueError, match="max_train_self_bleu"):
        DataConfig(max_train_self_bleu=0)


def test_self_bleu_band_keeps_only_moderate_rewrites_for_training():
    from paraphrase_ray.text import sentence_bleu

    train, val, rep = load_pairs(DataConfig(sources=("sample",)))
    b_train, b_val, b_rep = load_pairs(DataConfig(sources=("sample",), min_train_self_bleu=10, max_train_self_bleu=50))
    assert b_val == val
    bleu = {p: sentence_bleu(p.target, p.source) for p in train}
    assert set(b_train) == {p for p in train if 10 <= bleu[p] < 50}
    free = sum(b < 10 for b in bleu.values())
    assert free and b_rep.dropped["free rewrite (train self-BLEU < 10)"] == free  # each side counted by name
    assert b_rep.kept == rep.kept - (len(train) - len(b_train))
    with pytest.raises(ValueError, match="must be below"):
        DataConfig(min_train_self_bleu=60, max_train_self_bleu=40)
    with pytest.raises(ValueError, match="drop every training pair"):
        load_pairs(DataConfig(sources=("sample",), min_train_self_bleu=99.9))


def test_source_penalty_can_skip_punctuation_and_function_words(tiny):
    from paraphrase_ray.config import TemplateConfig
    from paraphrase_ray.generation.generate import row_for
    from paraphrase_ray.generation.rules import FUNCTION_WORDS
    from paraphrase_ray.generation.rules import skip_penalty_ids as common_token_ids

    src = "The cat sat on the mat, and the dog slept."
    gen = GenerationConfig(source_repetition_penalty=1.2)
    every = row_for(tiny, src, None, TemplateConfig(), gen).source_ids
    skip = row_for(
        tiny,
        src,
        None,
        TemplateConfig(),
        GenerationConfig(source_repetition_penalty=1.2, source_penalty_skip_common=True),
    ).source_ids
    tok = tiny.tokenizer
    # by the tiny tokenizer's vocabulary strings: what is punctuation, a space, or a function word ("he" in
    # "The", "at" in "cat", "on", "the", "a") is skipped; every other piece keeps its penalty
    assert tok.convert_ids_to_tokens(every) == [
        "T", "he", "Ġc", "at", "Ġs", "at", "Ġ", "on", "Ġthe", "Ġm", "at", ",", "Ġa", "n", "d", "Ġthe", "Ġd", "o",
        "g", "Ġs", "l", "e", "p", "t", ".",
    ]
    assert tok.convert_ids_to_tokens(skip) == ["T", "Ġc", "Ġs", "Ġm", "n", "d", "Ġd", "o", "g", "Ġs", "l", "e", "p", "t"]
    common = common_token_ids(tok)
    assert {tok.convert_ids_to_tokens(t) for t in set(every) & common} == {"he", "at", "Ġ", "on", "Ġthe", ",", "Ġa", "."}
    texts = [tiny.tokenizer.decode([t]) for t in set(every) - set(skip)]
    assert any("." in t or "," in t for t in texts) and all(
        not any(c.isalnum() for c in t) or t.strip().lower() in FUNCTION_WORDS for t in texts
    )
