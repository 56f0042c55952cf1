"""The reader's-verdict detector (evaluation/verdict.py) on hand cases: what it must flag (an added clause, a dropped
attribution, a broken word, an antonym) and what it must not (number words, a name written the same way, a harmless
reordering, a synonym, an inflection). Real embedder (the offline all-MiniLM-L6-v2 package), real word list."""

from __future__ import annotations

import pytest

from paraphrase_ray.evaluation.embedder import load_embedder
from paraphrase_ray.evaluation.metrics import rank_candidates, score_rows
from paraphrase_ray.evaluation.verdict import verdicts
from paraphrase_ray.text import is_content, stem, words


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(device="cpu")


def one(embedder, source, output):
    return verdicts([source], [output], embedder)[0]


def test_an_added_clause_and_a_dropped_attribution_are_flagged(embedder):
    src = "The company's profits rose sharply in the second quarter, the chief executive said."
    added = one(embedder, src, "The company's profits rose sharply in the second quarter, the chief executive said, "
                "and officials tried to hide the losses.")
    assert {"officials", "hide", "losses"} <= set(added.added) and added.precision < 0.8
    dropped = one(embedder, src, "In the second quarter the firm's profits rose sharply.")
    assert "said" in dropped.dropped and "executive" in dropped.dropped and dropped.recall < 0.8


def test_broken_words_are_garbled_but_rare_source_words_are_not(embedder):
    src = "Insurance premiums at Grossmont rose again."
    v = one(embedder, src, "Insurance premiumes at Grossmont went up again.")
    assert v.garbled == ("premiumes",)
    assert one(embedder, src, "At Grossmont, insurance premiums went up once more.").garbled == ()


def test_antonyms_close_in_embedding_space_do_not_count_as_kept(embedder):
    v = one(embedder, "Sales were higher than expected.", "Sales were lower than expected.")
    assert "higher" in v.dropped and "lower" in v.added


@pytest.mark.parametrize(
    "source,output",
    [
        ("She bought two houses in 1999.", "In 1999 she purchased two houses."),  # synonym + reordering
        ("Three officials resigned on Monday.", "On Monday, three officials resigned."),  # harmless reordering
        ("The court heard two appeals.", "The court heard 2 appeals."),  # a number word vs digits
        ("Rasheed Wallace scored the final basket.", "The final basket was scored by Rasheed Wallace."),  # a name
        ("He appeals the ruling.", "He is appealing the ruling."),  # an inflection
    ],
)
def test_what_a_reader_does_not_count(embedder, source, output):
    v = one(embedder, source, output)
    assert v.added == () and v.dropped == () and v.garbled == (), v


def test_negation_is_always_content():
    assert is_content("not") and is_content("never") and not is_content("the") and is_content("said")
    assert words("Bush's plan didn't pass") == ["bush", "plan", "didn't", "pass"]
    assert stem("premiums") == "premium" and stem("appealed") == "appeal" and stem("its") == "its"


def test_scores_carry_the_verdict_and_rerank_puts_acceptable_first(embedder):
    src = "The museum will reopen in March after a two-year renovation, the mayor said."
    good = "The mayor said the museum would reopen in March, after a renovation of two years."
    drops = "The museum will reopen after a renovation."  # drops March, the mayor, two-year
    rows = score_rows([src, src], None, [drops, good], embedder)
    assert not rows[0].acceptable and rows[1].acceptable, rows
    assert "mayor" in rows[0].dropped_words and rows[1].dropped_words == ()
    # the verdict is a tier above the objective: the dropping candidate ranks last even if it scored higher
    forced = [rows[0].__class__(**{**rows[0].__dict__, "objective": 0.99}), rows[1]]
    assert rank_candidates(forced) == [1, 0]
