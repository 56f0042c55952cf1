"""The word guard (generation/word_guard.py): what it lets a paraphrase write, on the tiny byte-level tokenizer and
SmolLM2's, and that decoding with it (our loop and HF's generate) writes only what it allows."""

from __future__ import annotations

import dataclasses

import pytest
from test_faithfulness import ids_of, smol_tok, tiny_tok  # noqa: F401  (fixtures)

from paraphrase_ray.generation.word_guard import WordGuard, allowed_words, content_targets, sentence_ends

SOURCE = "The company said on Monday it will appeal the ruling, which raised premiums for 1,200 drivers."


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request):
    return request.getfixturevalue("smol_tok" if request.param == "smollm2" else "tiny_tok")


def writable(tok, guard: WordGuard, text: str, end: bool = False) -> bool:
    """No token of ``text`` is banned after the tokens before it (and, with ``end``, eos after all of them)."""
    ids = ids_of(tok, text) + ([tok.eos_token_id] if end else [])
    return all(ids[j] not in set(guard.bans(ids[:j])) for j in range(len(ids)))


@pytest.mark.parametrize("text,ok", [
    ("It will appeal the ruling, the company said on Monday.", True),
    ("On Monday the company said it will appeal the ruling.", True),
    ("The company has appealed the ruling.", True),  # an inflection of a source word, a grammar word
    ("The ruling raised premiums for drivers.", True),
    ("It's the ruling.", True),  # a clitic after an apostrophe
    ("The firm said it will appeal.", False),  # a content word the source lacks
    ("The company could appeal the ruling.", False),  # a modal the source lacks softens the claim
    ("The company will not appeal the ruling.", False),  # a negation the source lacks
    ("The ruling raised premiumes.", False),  # an inflection that is no English word
    ("Officials tried to hide it.", False),  # an added clause
    ("The company said #ruling.", False),  # a symbol the source lacks
    ("The comp.", False),  # a half-written word may not end
    ("The re ruling.", False),  # a clitic away from an apostrophe
])
def test_what_the_word_guard_lets_through(tok, text, ok):
    assert writable(tok, WordGuard(tok, SOURCE, coverage=0.0), text) is ok


def test_the_output_may_not_end_before_covering_the_source(tok):
    guard = WordGuard(tok, SOURCE, coverage=0.9)
    assert not writable(tok, guard, "The company said on Monday.")  # "." banned: appeal, ruling... missing
    assert not writable(tok, guard, "The company said on Monday", end=True)
    full = "On Monday the company said it will appeal the ruling, which raised premiums for 1,200 drivers"
    assert writable(tok, guard, full + ".", end=True)


def test_one_sentence_source_gets_one_sentence(tok):
    guard = WordGuard(tok, SOURCE, coverage=0.0)
    ids = ids_of(tok, "It will appeal the ruling.")
    allowed = set(range(len(guard.scan.text))) - set(guard.bans(ids))
    assert allowed and all(guard.scan.stop[i] for i in allowed)  # eos, or a token that ends the line


def test_an_n_gram_ban_never_leaves_a_row_without_a_token(tok):
    """The guard wins where it and the no-repeat rule together would ban every token (a NaN in sampling)."""
    import torch

    from paraphrase_ray.generation.rules import ban_row

    guard = WordGuard(tok, SOURCE, coverage=0.0)
    seq = ids_of(tok, "The company said")
    scores = torch.zeros(len(guard.scan.text))
    allowed = sorted(set(range(len(guard.scan.text))) - set(guard.bans(seq)))
    ban_row(scores, seq, 0, {tuple(seq[-3:]): allowed}, 4, guard)  # a source n-gram rule banning all it allows
    assert not torch.isinf(scores).all()


def test_word_sets():
    words = allowed_words(SOURCE)
    assert {"appealed", "appeals", "premium", "rulings", "the", "of"} <= words
    assert not {"premiumes", "could", "not", "firm"} & words
    assert content_targets("The firm's profit rose 12% in Paris, she said.") == ["firm", "profit", "rose", "paris", "said"]
    assert sentence_ends("Mr. Smith met U.S. officials. They left!") == 2


@pytest.mark.parametrize("beams", [1, 2])  # our loop (greedy), HF generate (beams)
def test_decoding_with_the_guard_writes_only_allowed_words(tiny, beams):
    """A real forward pass on the tiny random model: whatever it writes, every word is allowed and whole."""
    import re

    from paraphrase_ray.config import GenerationConfig, TemplateConfig
    from paraphrase_ray.generation.generate import paraphrase

    src = ["the cat sat on the mat", "a dog ran to the park today"]
    gen = GenerationConfig(word_guard=True, word_coverage=0.0, num_beams=beams, max_new_tokens=16)
    plain = paraphrase(tiny, src, None, TemplateConfig(), dataclasses.replace(gen, word_guard=False))
    outs = paraphrase(tiny, src, None, TemplateConfig(), gen)
    assert plain != outs  # the random model writes words the guard refuses
    for s, (o,) in zip(src, outs):
        ok = allowed_words(s)
        assert all(w.lower() in ok for w in re.findall(r"[^\W\d_]+", o)), (s, o)


def test_an_output_much_longer_than_its_source_must_end(tok):
    guard = WordGuard(tok, "The ruling raised premiums for drivers.", coverage=0.0)
    long = "The ruling raised premiums for drivers and the ruling raised"  # 10 words > 1.2 x 6 + 2
    allowed = set(range(len(guard.scan.text))) - set(guard.bans(ids_of(tok, long)))
    assert allowed and all(guard.scan.stop[i] or guard.scan.period[i] for i in allowed)
    assert writable(tok, guard, "The ruling raised premiums for drivers and the ruling")  # 9 words: not yet
