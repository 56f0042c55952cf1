"""The Python API: ``Paraphraser.from_pretrained(...).paraphrase(texts)`` is the CLI's generation, in code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paraphrase_ray.config import RunConfig
from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.prompt.directory import PromptMeta
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

TEXTS = ["The bank raised its rates again.", "Snow fell all night long.", "He sold the old car to a neighbour."]


@pytest.fixture()
def prompt_dir(tiny, tiny_model_dir, tmp_path):
    from paraphrase_ray.config import PromptConfig

    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="vocab", seed=3))
    meta = PromptMeta.record(RunConfig(model=str(tiny_model_dir)))
    sp.save(tmp_path / "p", str(tiny_model_dir), tiny.model, meta)
    return tmp_path / "p"


@pytest.fixture()
def paraphraser(prompt_dir):
    from paraphrase_ray import Paraphraser

    return Paraphraser.from_pretrained(prompt_dir, device="cpu", precision="fp32")


def test_greedy_paraphrases_equal_the_library_path(paraphraser, prompt_dir):
    from paraphrase_ray.generation.generate import paraphrase

    got = paraphraser.paraphrase(TEXTS, num_candidates=1, max_new_tokens=8)  # greedy
    info = paraphraser.meta
    expected = paraphrase(paraphraser.loaded, TEXTS, paraphraser.bundle.prompt, info.template,
                          info.decoding(max_new_tokens=8), batch_size=16, max_source_tokens=info.max_source_tokens)
    assert got == [c[0] for c in expected] and len(got) == 3 and all(isinstance(t, str) for t in got)
    assert paraphraser.n_tokens == 4 and paraphraser.meta.base_model == paraphraser.loaded.name
    assert "n_tokens=4" in repr(paraphraser)
    assert paraphraser.paraphrase([]) == []


def test_candidates_are_sampled_then_ranked_like_the_cli(paraphraser):
    from serve_helpers import assert_best_first

    from paraphrase_ray.generation.generate import paraphrase

    ranked = paraphraser.paraphrase(TEXTS[:2], num_candidates=3, return_candidates=True, max_new_tokens=8)
    best = paraphraser.paraphrase(TEXTS[:2], num_candidates=3, max_new_tokens=8)
    assert best == [c[0] for c in ranked]
    info = paraphraser.meta
    gen = info.decoding(max_new_tokens=8).with_candidates(3)
    assert gen.do_sample and gen.num_return_sequences == 3 and gen.temperature == 0.8 and gen.top_p == 0.95
    raw = paraphrase(paraphraser.loaded, TEXTS[:2], paraphraser.bundle.prompt, info.template, gen)
    # the very candidates the seeded sampler draws, reordered best first by the documented rule
    assert [sorted(c) for c in ranked] == [sorted(c) for c in raw] and len(set(raw[0])) > 1
    assert_best_first(TEXTS[:2], ranked)


def test_only_accepted_keeps_exactly_what_the_detector_accepts(paraphraser):
    """``only_accepted``: a text's paraphrase, or None where the detector rejects the best candidate; the scores come
    from ``scored`` (the same candidates, the same order) and carry the reader's flags."""
    cands, scores = paraphraser.scored(TEXTS, num_candidates=3, max_new_tokens=8)
    kept = paraphraser.paraphrase(TEXTS, num_candidates=3, only_accepted=True, max_new_tokens=8)
    assert kept == [c[0] if s[0].acceptable else None for c, s in zip(cands, scores)]
    assert [c[0] for c in cands] == paraphraser.paraphrase(TEXTS, num_candidates=3, max_new_tokens=8)
    # a tiny random model writes no acceptable paraphrase: every row is flagged, and the flags say why
    assert not any(s.acceptable for ss in scores for s in ss)
    assert all(s.garbled or s.added_words or s.dropped_words or s.copy or s.empty or not s.faithful
               or s.self_bleu >= 75 for ss in scores for s in ss)
    one, one_scores = paraphraser.scored(TEXTS[:1], num_candidates=1, max_new_tokens=8)  # greedy is scored too
    assert len(one[0]) == len(one_scores[0]) == 1


def test_bad_arguments_are_named(paraphraser):
    with pytest.raises(ConfigError, match="unknown config key 'tempreture'.*did you mean 'temperature'"):
        paraphraser.paraphrase(TEXTS, tempreture=0.5)
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer, got 'many'"):
        paraphraser.paraphrase(TEXTS, max_new_tokens="many")
    with pytest.raises(ConfigError, match="num_candidates must be an integer >= 1"):
        paraphraser.paraphrase(TEXTS, num_candidates=0)
    with pytest.raises(TypeError, match="wrap one text in a list"):
        paraphraser.paraphrase("It rained.")
    with pytest.raises(ValueError, match="source 1 is empty"):
        paraphraser.paraphrase(["It rained.", " "])


def test_missing_directory_and_unreachable_hub_id_are_clear(tmp_path, monkeypatch):
    from paraphrase_ray import Paraphraser

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the network from tests
    with pytest.raises(PromptFileError, match="not a USER/NAME hub id"):
        Paraphraser.from_pretrained(tmp_path / "no" / "such" / "dir")
    with pytest.raises(PromptFileError, match="no-such-user/no-such-prompt is not a local prompt directory"):
        Paraphraser.from_pretrained("no-such-user/no-such-prompt")


def test_importing_the_package_stays_light():
    code = "import sys, paraphrase_ray, paraphrase_ray.config; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    code = "from paraphrase_ray import Paraphraser; print(Paraphraser.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "paraphrase_ray.api", out.stderr


def test_roundtrip_rerank_reorders_the_same_candidates_by_the_lm(paraphraser):
    """``rerank="roundtrip"`` (a decoding option): the very candidates the detector's rerank returns, in
    ``likelihood.rerank_roundtrip``'s order -- the API runs the round trip on its own base model."""
    from paraphrase_ray.evaluation.likelihood import rerank_roundtrip, round_trips

    det_c, det_s = paraphraser.scored(TEXTS, num_candidates=4, max_new_tokens=8)
    rt_c, rt_s = paraphraser.scored(TEXTS, num_candidates=4, max_new_tokens=8, rerank="roundtrip")
    assert (rt_c, rt_s) == rerank_roundtrip(paraphraser.loaded, TEXTS, det_c, det_s)
    assert [sorted(c) for c in rt_c] == [sorted(c) for c in det_c]  # reordered, never resampled
    moved = 0
    for text, cands, scores, before in zip(TEXTS, rt_c, rt_s, det_c, strict=True):
        trips = round_trips(paraphraser.loaded, [text] * len(cands), cands, pmi=False)
        tiers = [(s.copy or s.empty, not s.faithful, bool(s.garbled)) for s in scores]
        assert tiers == sorted(tiers)
        for j in range(len(cands) - 1):  # within a tier, best round trip first
            if tiers[j] == tiers[j + 1]:
                assert trips[j].score >= trips[j + 1].score
        moved += cands != before
    assert moved  # the round trip reordered some text's candidates (else this test would prove nothing)
