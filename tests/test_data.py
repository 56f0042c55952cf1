"""Data: readers, cleaning with counts, deterministic split, template and target-only loss mask."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paraphrase_ray.config import DataConfig, TemplateConfig
from paraphrase_ray.data import IGNORE, DataError, Pair, collate, encode_pair, encode_source, load_pairs

ROWS = [
    {"source": "The bank raised rates.", "target": "Rates were raised by the bank.", "label": 1},
    {"source": "It snowed all night.", "target": "Snow fell through the night.", "label": 1},
    {"source": "Cats sleep a lot.", "target": "Dogs bark loudly.", "label": 0},
    {"source": "   ", "target": "Blank source.", "label": 1},
    {"source": "The bank raised rates.", "target": "Rates were raised by the bank.", "label": 1},
    {"source": "x" * 2000, "target": "Too long.", "label": 1},
]


def write_jsonl(path, rows, extra_lines=()):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_jsonl_cleaning_counts_every_drop(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS, ["{not json", "[1, 2]"])
    train, val, report = load_pairs(DataConfig(sources=(str(p),), val_fraction=0.0))
    assert sorted(x.source for x in train) == ["It snowed all night.", "The bank raised rates."]
    assert val == []
    assert report.dropped == {"label != 1": 1, "empty": 1, "duplicate": 1, "over-long": 1, "malformed": 2}
    assert "dropped" in report.summary()


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_other_formats_and_custom_columns(tmp_path, fmt):
    rows = [{"a": f"sentence number {i}", "b": f"the {i}th sentence"} for i in range(10)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["a", "b"], delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    train, val, _ = load_pairs(DataConfig(sources=(str(path),), source_column="a", target_column="b", val_size=2))
    assert len(train) == 8 and len(val) == 2
    assert {p.source for p in train + val} == {r["a"] for r in rows}


def test_split_is_deterministic_and_disjoint():
    cfg = DataConfig(sources=("sample",), val_fraction=0.1, seed=7)
    t1, v1, _ = load_pairs(cfg)
    t2, v2, _ = load_pairs(cfg)
    assert v1 == v2 and t1 == t2
    assert not set(v1) & set(t1)
    _, v3, _ = load_pairs(DataConfig(sources=("sample",), val_fraction=0.1, seed=8))
    assert v3 != v1


def test_both_directions_never_leaks_validation():
    train, val, _ = load_pairs(DataConfig(sources=("sample",), both_directions=True, seed=1))
    reversed_val = {Pair(p.target, p.source) for p in val}
    assert not reversed_val & set(train)
    assert len(train) == 2 * (320 - len(val))


def test_weighted_interleave_mixes_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"source": f"alpha {i}", "target": f"A {i}"} for i in range(200)])
    train, _, _ = load_pairs(DataConfig(sources=(str(a), "sample"), weights=(0.5, 0.5), val_fraction=0.0))
    n_alpha = sum(p.source.startswith("alpha") for p in train[:100])
    assert 25 < n_alpha < 75


def test_unusable_sources_are_clear_errors(tmp_path):
    empty = write_jsonl(tmp_path / "e.jsonl", [{"source": " ", "target": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        load_pairs(DataConfig(sources=(str(empty),)))
    with pytest.raises(DataError, match="not a file"):
        load_pairs(DataConfig(sources=("missing.jsonl",)))
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"q": "a", "r": "b"}])
    with pytest.raises(DataError, match="set data.source_column"):
        load_pairs(DataConfig(sources=(str(wrong),)))
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(DataConfig(sources=(str(tmp_path / "x.xlsx"),)))


def test_mrpc_keeps_only_positive_pairs(mrpc_path):
    train, val, report = load_pairs(DataConfig(sources=(str(mrpc_path),), val_size=100))
    assert report.dropped["label != 1"] > 1000
    assert len(val) == 100 and len(train) > 2500


def _check_mask(tok, pair, template, max_src, max_tgt):
    ids, labels = encode_pair(tok, pair, template, max_src, max_tgt)
    prefix = encode_source(tok, pair.source, template, max_src)
    assert ids[: len(prefix)] == prefix
    assert labels[: len(prefix)] == [IGNORE] * len(prefix)  # source + separator never count
    target_ids = [t for t in labels if t != IGNORE]
    assert target_ids == ids[len(prefix) :]  # everything after the separator counts
    return ids, labels, prefix


def test_loss_mask_on_real_tokenizations(tiny, smollm):
    template = TemplateConfig()
    pair = Pair("The weather was so cold that the lake froze overnight.", "Overnight the lake froze in the cold.")
    for tok in (tiny.tokenizer, smollm.tokenizer):
        ids, labels, prefix = _check_mask(tok, pair, template, 64, 64)
        assert labels[-1] == tok.eos_token_id
        decoded = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True)
        assert decoded.strip() == pair.target
        assert tok.decode(prefix, skip_special_tokens=True).endswith("\nParaphrase:")


def test_truncation_keeps_separator_and_drops_eos_of_cut_targets(smollm):
    tok, template = smollm.tokenizer, TemplateConfig()
    long = Pair("word " * 100, "other " * 100)
    ids, labels, prefix = _check_mask(tok, long, template, 10, 12)
    sep = tok(template.separator, add_special_tokens=False)["input_ids"]
    assert prefix[-len(sep) :] == sep and len(prefix) == 10 + len(sep)
    targets = [t for t in labels if t != IGNORE]
    assert len(targets) == 12 and tok.eos_token_id not in targets


def test_collate_right_pads(tiny):
    enc = [encode_pair(tiny.tokenizer, Pair(s, t), TemplateConfig(), 64, 64)
           for s, t in [("Hi.", "Hello."), ("A much longer source sentence here.", "A longer target.")]]
    b = collate(enc, tiny.tokenizer.pad_token_id)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
    assert b.attention_mask[0].tolist() == [1] * len(enc[0][0]) + [0] * (b.input_ids.shape[1] - len(enc[0][0]))
    assert (b.labels[0, len(enc[0][0]) :] == IGNORE).all()
