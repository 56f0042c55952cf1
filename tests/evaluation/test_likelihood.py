"""The LM round-trip features (evaluation/likelihood.py): batched log-probs equal one-row forwards (tiny OPT),
word indices follow whitespace words on both tokenizers, and on the real SmolLM2 a faithful rewording outscores a dropped
clause, an added one, an antonym, another day and a modal shift (each direction where it should)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paraphrase_ray.evaluation.likelihood import _target, round_trips, token_logprobs


def test_batched_logprobs_equal_one_row_forwards(tiny):
    model = tiny.model
    pairs = [([2, 10, 11, 12], [13, 14]), ([2, 20], [21, 22, 23, 24, 25]), ([2, 5, 6, 7, 8, 9, 10], [30])]
    batched = token_logprobs(model, 1, pairs, batch_size=2)
    for (ctx, tgt), got in zip(pairs, batched):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ctx + tgt])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(ctx) - 1, len(ctx) + len(tgt) - 1), torch.tensor(tgt)]
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "smollm"])
def test_word_index_of_each_token(which, request):
    tok = request.getfixturevalue(which).tokenizer
    text = "Shares of Mattel fell 13 cents to $19.72 on Monday."
    ids, word_of = _target(tok, text)
    assert len(ids) == len(word_of) and word_of[0] == 0 and word_of == sorted(word_of)
    assert word_of[-1] == len(text.split()) - 1
    # every word's tokens decode back to that word
    plain = not getattr(tok, "chat_template", None)
    for w, word in enumerate(text.split()):
        piece = tok.decode([i for i, k in zip(ids, word_of) if k == w]).strip()
        assert piece == word, (plain, w, piece, word)


@pytest.mark.slow
def test_a_faithful_rewording_outscores_each_way_of_getting_it_wrong(smollm):
    src = "The company's profits rose sharply in the second quarter, the chief executive said on Tuesday."
    good = "The chief executive said on Tuesday that the firm's profits rose steeply in the second quarter."
    wrong = {
        "dropped": "The firm's profits rose steeply in the second quarter.",
        "added": good[:-1] + ", and that the board will sell the airline next year.",
        "antonym": good.replace("rose", "fell"),
        "day": good.replace("Tuesday", "Monday"),
        "modality": "The chief executive will say on Tuesday that the firm's profits could rise steeply in the second "
                    "quarter.",
    }
    g, *rest = round_trips(smollm, [src] * 6, [good, *wrong.values()])
    by = dict(zip(wrong, rest))
    for name, r in by.items():
        assert r.score < g.score - 0.3, name
    assert by["dropped"].bwd < g.bwd - 0.5  # what the output dropped cannot be read back from it
    assert by["dropped"].pmi_src_min < g.pmi_src_min - 0.5
    assert by["added"].fwd < g.fwd - 0.5 and by["added"].pmi_out_min < g.pmi_out_min - 1.0  # "airline": unexplained
    assert g.pmi_src > 0 and g.pmi_out > 0  # a faithful rewording explains, and is explained by, its source


def test_roundtrip_rerank_keeps_the_hard_tiers_and_orders_within_them(smollm):
    """``generation.rerank: roundtrip`` through the product path: a copy and an unfaithful candidate stay behind a
    usable faithful one however the LM scores them, and among faithful ones the higher round-trip score leads."""
    from paraphrase_ray.evaluation.embedder import load_embedder
    from paraphrase_ray.evaluation.likelihood import rerank_roundtrip
    from paraphrase_ray.evaluation.metrics import rerank

    src = "The company's profits rose sharply in the second quarter, the chief executive said on Tuesday."
    good = "The chief executive said on Tuesday that the firm's profits rose steeply in the second quarter."
    dropped = "The firm's profits rose steeply in the second quarter."
    cands = [[src, good.replace("Tuesday", "Monday"), dropped, good]]  # a copy, a wrong day, a drop, the good one
    ranked, scores = rerank([src], cands, load_embedder(device="cpu"))
    out, out_scores = rerank_roundtrip(smollm, [src], ranked, scores)
    assert out[0] == [good, dropped, good.replace("Tuesday", "Monday"), src]  # faithful by score; unfaithful; copy
    assert [(s.copy, s.faithful) for s in out_scores[0]] == [(False, True), (False, True), (False, False), (True, True)]
