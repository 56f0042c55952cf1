"""Data: readers, cleaning with counts, deterministic split, template and target-only loss mask."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paraphrase_ray.config import DataConfig, TemplateConfig
from paraphrase_ray.data import IGNORE, Pair, collate, encode_pair, encode_source, load_pairs
from paraphrase_ray.errors import DataError

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


# -- read_source_file: what `paraphrase --input` says about a bad file -----------------------------------------
def test_read_source_file_keeps_rows_and_extra_columns(tmp_path):
    from paraphrase_ray.data import read_source_file

    p = write_jsonl(tmp_path / "in.jsonl", [{"source": "A b.", "id": 7}, {"source": "C d.", "id": 8}])
    assert read_source_file(p) == [{"source": "A b.", "id": 7}, {"source": "C d.", "id": 8}]
    c = tmp_path / "in.csv"
    c.write_text("id,source\n1,Hello there.\n")
    assert read_source_file(c) == [{"id": "1", "source": "Hello there."}]


def test_read_source_file_errors_name_the_file_and_the_problem(tmp_path):
    import re

    from paraphrase_ray.data import read_source_file

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=f"^input file not found: {re.escape(str(missing))}$"):
        read_source_file(missing)
    nosrc = write_jsonl(tmp_path / "nosrc.jsonl", [{"source": "fine"}, {"text": "no source column"}])
    with pytest.raises(DataError, match=f"^{re.escape(str(nosrc))}: row 2 has no non-empty 'source' field$"):
        read_source_file(nosrc)
    blank = tmp_path / "blank.csv"
    blank.write_text("source,id\n   ,1\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(blank))}: row 1 has no non-empty 'source' field$"):
        read_source_file(blank)
    xlsx = tmp_path / "in.xlsx"
    xlsx.write_text("nope")
    with pytest.raises(
        DataError, match=f"^{re.escape(str(xlsx))}: unsupported input type '.xlsx'; use .jsonl, .csv, .tsv or .parquet$"
    ):
        read_source_file(xlsx)
    for name, text in (("empty.jsonl", ""), ("blank-lines.jsonl", "\n  \n"), ("header-only.csv", "source,id\n")):
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(DataError, match=f"^{re.escape(str(f))} has no rows$"):
            read_source_file(f)


def test_read_source_file_malformed_jsonl_counts_bad_lines(tmp_path):
    import re

    from paraphrase_ray.data import read_source_file

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"source": "ok"}], ["{not json", "[1, 2]"])
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: line 2 is not a JSON object \\(2 malformed lines in all\\)"):
        read_source_file(bad)


def test_read_source_file_malformed_jsonl_names_the_line(tmp_path):
    import re

    from paraphrase_ray.data import read_source_file

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"source": "ok"}, {"source": "fine"}], ["{not json"])
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: line 3 is not a JSON object"):
        read_source_file(bad)


# -- hf: sources, offline, from a local dataset folder -----------------------------------------------------------
GLUE_ROWS = [
    {"sentence1": "The bank raised rates.", "sentence2": "Rates went up at the bank.", "label": 1, "idx": 0},
    {"sentence1": "Cats sleep a lot.", "sentence2": "Dogs bark loudly.", "label": 0, "idx": 1},
    {"sentence1": "It snowed all night.", "sentence2": "Snow fell through the night.", "label": 1, "idx": 2},
]


@pytest.fixture()
def glue_dir(tmp_path, monkeypatch):
    """A local folder laid out like GLUE's MRPC (sentence1/sentence2/label/idx), read by datasets offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d = tmp_path / "glue" / "mrpc"
    d.mkdir(parents=True)
    write_jsonl(d / "train.jsonl", GLUE_ROWS)
    write_jsonl(d / "validation.jsonl", [{**GLUE_ROWS[0], "sentence1": "Validation only.", "idx": 9}])
    return d


def test_hf_source_maps_glue_columns_and_keeps_label_1(glue_dir):
    # hf:NAME/CONFIG first tries (NAME, CONFIG), then NAME/CONFIG as one name: here, the local folder
    train, val, report = load_pairs(DataConfig(sources=(f"hf:{glue_dir}",), val_fraction=0.0))
    assert sorted(train, key=lambda p: p.source) == [
        Pair("It snowed all night.", "Snow fell through the night."),
        Pair("The bank raised rates.", "Rates went up at the bank."),
    ]
    assert val == [] and report.read == 3 and report.dropped == {"label != 1": 1}
    train, _, _ = load_pairs(DataConfig(sources=(f"hf:{glue_dir}:validation",), val_fraction=0.0))
    assert train == [Pair("Validation only.", "Rates went up at the bank.")]
    train, _, _ = load_pairs(DataConfig(sources=(f"hf:{glue_dir}",), val_fraction=0.0, limit=1))  # streamed
    assert train == [Pair("The bank raised rates.", "Rates went up at the bank.")]


def test_hf_source_that_cannot_load_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = f"hf:{tmp_path}/nope/cfg"
    with pytest.raises(DataError) as info:
        load_pairs(DataConfig(sources=(spec,)))
    msg = str(info.value)
    assert msg.startswith(f"could not load Hugging Face dataset '{tmp_path}/nope/cfg'; tried {tmp_path}/nope (config cfg): ")
    assert f"; {tmp_path}/nope/cfg: " in msg
    assert msg.endswith(". Fix: check the name, or set HF_DATASETS_OFFLINE=0 with network access, or use a local file.")


def test_drop_unfaithful_targets_drops_exactly_the_pairs_whose_target_breaks_a_fact(tmp_path):
    rows = [
        {"source": "The bank raised rates by 2 percent.", "target": "Rates went up 2 percent at the bank."},
        {"source": "It snowed all night.", "target": "Snow fell all night in Denver."},  # invents a name
        {"source": "Sales rose 12 percent.", "target": "Sales rose sharply."},  # drops a number
        {"source": "He sold the car.", "target": "He sold the car for 500 dollars."},  # invents a number
        {"source": "Snow fell on Monday.", "target": "On Monday it snowed."},
    ]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, _, report = load_pairs(DataConfig(sources=(str(p),), val_fraction=0.0, drop_unfaithful_targets=True))
    assert sorted(p.source for p in kept) == sorted([rows[0]["source"], rows[4]["source"]])
    assert set(kept) == {Pair(rows[0]["source"], rows[0]["target"]), Pair(rows[4]["source"], rows[4]["target"])}
    assert report.dropped == {"unfaithful target (invents a name or number, or drops a number)": 3}
    assert report.kept == 2
    every, _, off = load_pairs(DataConfig(sources=(str(p),), val_fraction=0.0))  # off by default: all five kept
    assert len(every) == 5 and off.dropped == {} and off.kept == 5
    # validation rows are never filtered
    _, val, _ = load_pairs(DataConfig(sources=(str(p),), val_size=3, drop_unfaithful_targets=True))
    assert len(val) == 3
    only_bad = write_jsonl(tmp_path / "bad.jsonl", rows[1:4])
    with pytest.raises(DataError, match="drop_unfaithful_targets drops every training pair"):
        load_pairs(DataConfig(sources=(str(only_bad),), val_fraction=0.0, drop_unfaithful_targets=True))


PAWS_ROWS = [  # hf:paws/labeled_final's columns: id, sentence1, sentence2, label (1: paraphrase)
    {"id": 1, "sentence1": "In Paris, in October 1560, he secretly met the English ambassador.",
     "sentence2": "In October 1560, he secretly met with the English ambassador in Paris.", "label": 1},
    {"id": 2, "sentence1": "The NBA season of 1975 was the 30th season.",
     "sentence2": "The 1975 season of the NBA was the 30th season.", "label": 0},
]


def test_paws_labeled_final_columns_map_to_source_and_target():
    from paraphrase_ray.data import DataReport, clean

    report = DataReport()
    pairs = clean(PAWS_ROWS, DataConfig(sources=("hf:paws/labeled_final",)), report, "hf:paws/labeled_final")
    assert pairs == [Pair(PAWS_ROWS[0]["sentence1"], PAWS_ROWS[0]["sentence2"])]
    assert report.read == 2 and report.kept == 1 and report.dropped == {"label != 1": 1}
    with pytest.raises(DataError, match=r"columns \['id', 'label', 'text'\] but no 'source'/'target'"):
        clean([{"id": 1, "text": "x", "label": 1}], DataConfig(), DataReport(), "hf:x")
