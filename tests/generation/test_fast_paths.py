"""The fast paths give what the straightforward ones give.

Training: the default ``prompt_loss`` (prompt run once per batch through a shared KV cache, logits only at
target positions) equals the full-logits forward in loss and gradient, in fp32 and in bf16, and a few steps
of training follow the same loss curve. Generation: the greedy decode loop equals ``model.generate``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from paraphrase_ray.config import GenerationConfig, PromptConfig, RunConfig, TemplateConfig, TrainConfig
from paraphrase_ray.data import SAMPLE_PATH, Pair, collate, encode_pair
from paraphrase_ray.generation.decode import decode, fast_greedy_applies
from paraphrase_ray.generation.generate import (
    build_batch,
    generate_rows,
    hf_generate,
    paraphrase,
    row_for,
)
from paraphrase_ray.generation.rules import DecodeRules
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.training.loss import length_groups, loss_terms, prompt_loss, token_weights
from paraphrase_ray.training.trainer import train

T = TemplateConfig()
PAIRS = [Pair(r["source"], r["target"]) for r in map(json.loads, SAMPLE_PATH.read_text().splitlines()[:12])]
SOURCES = [p.source for p in PAIRS[:5]] + ["Hi."]


def _batch(loaded, pairs, max_target=64):
    enc = [encode_pair(loaded.tokenizer, p, T, 64, max_target) for p in pairs]
    return collate(enc, loaded.tokenizer.pad_token_id)


def _loss_and_grad(model, prompt, batch, fast, copy_weight=1.0):
    prompt.weight.grad = None
    loss = prompt_loss(model, prompt, batch, fast=fast, copy_weight=copy_weight)
    loss.backward()
    return loss.detach().float(), prompt.weight.grad.detach().clone()


SHORT = [Pair("Hi.", "Hello."), Pair("Snow fell.", "It snowed."), Pair("He left.", "He went away."),
         Pair("Yes.", "Indeed.")]


@pytest.mark.parametrize("copy_weight", [1.0, 0.3])
@pytest.mark.parametrize("rows", ["one", "padded", "two-length-groups"])
def test_fast_loss_and_grad_equal_full_logits_fp32(tiny, rows, copy_weight):
    # right padding, target-length truncation, and the split of short and long rows are all exercised
    pairs = {"one": PAIRS[:1], "padded": PAIRS[:5], "two-length-groups": PAIRS[:4] + SHORT}[rows]
    batch = _batch(tiny, pairs, max_target=6 if rows == "one" else 64)
    assert rows == "one" or bool((batch.attention_mask == 0).any())
    assert len(length_groups(batch.attention_mask)) == (2 if rows == "two-length-groups" else 1)
    prompt = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="random_std"))
    full_loss, full_grad = _loss_and_grad(tiny.model, prompt, batch, False, copy_weight)
    fast_loss, fast_grad = _loss_and_grad(tiny.model, prompt, batch, True, copy_weight)
    torch.testing.assert_close(fast_loss, full_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, full_grad, rtol=1e-4, atol=1e-7)
    assert full_grad.abs().sum() > 0


def test_copy_token_weight_discounts_target_tokens_found_in_the_input(tiny):
    batch = _batch(tiny, [Pair("the cat sat", "the cat slept"), Pair("Snow fell.", "It snowed.")])
    w = token_weights(batch, 0.25)
    tgt = batch.labels != -100
    assert (w[~tgt] == 0).all() and set(w[tgt].tolist()) == {0.25, 1.0}
    for b in range(2):
        inp = set(batch.input_ids[b][~tgt[b] & (batch.attention_mask[b] == 1)].tolist())
        for j in tgt[b].nonzero().flatten().tolist():
            assert w[b, j] == (0.25 if int(batch.labels[b, j]) in inp else 1.0)
    assert torch.equal(token_weights(batch, 1.0), tgt.float())  # 1.0 is plain cross-entropy
    prompt = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=3, init="random_std"))
    with torch.no_grad():
        plain = prompt_loss(tiny.model, prompt, batch)
        weighted = prompt_loss(tiny.model, prompt, batch, copy_weight=0.25)
    assert not torch.isclose(plain, weighted)


def test_fast_loss_within_bf16_tolerance_of_fp32(tiny):
    batch = _batch(tiny, PAIRS[:4])
    prompt = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4))
    ref_loss, ref_grad = _loss_and_grad(tiny.model, prompt, batch, fast=False)
    tiny.model.to(torch.bfloat16)  # the fixture is function-scoped: this copy is ours to change
    for fast in (True, False):
        loss, grad = _loss_and_grad(tiny.model, prompt, batch, fast=fast)
        assert grad.dtype == torch.float32  # the fp32 master prompt gets an fp32 gradient
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        assert cos > 0.98


def test_training_loss_curves_match(tiny, monkeypatch):
    import paraphrase_ray.training.loss as loss_mod

    cfg = RunConfig(train=TrainConfig(steps=4, batch_size=6, lr=0.1, warmup_steps=0, eval_every=1, progress=False,
                                      early_stop_patience=None, device="cpu", precision="fp32"),
                    prompt=PromptConfig(n_tokens=4))
    curves = {}
    for fast in (True, False):  # train() and its validation both go through the patched loss_terms
        monkeypatch.setattr(loss_mod, "loss_terms", lambda *a, fast=fast, **k: loss_terms(*a[:3], fast=fast, **k))
        res = train(tiny, cfg, train_pairs=PAIRS[:5] + SHORT, val_pairs=PAIRS[9:11])
        curves[fast] = [(e["train_loss"], e["val_loss"]) for e in res.history]
    assert len(curves[True]) == 4
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=1e-4, atol=1e-5)
    assert curves[True][-1][0] < curves[True][0][0]  # it trains


GREEDY = GenerationConfig(max_new_tokens=12, source_repetition_penalty=1.0, stop_at_newline=False)


@pytest.mark.parametrize(
    ("gen", "stops"),
    [
        (GREEDY, "real"),
        (dataclasses.replace(GREEDY, source_repetition_penalty=1.3, stop_at_newline=True), "real"),  # old defaults
        (dataclasses.replace(GREEDY, source_repetition_penalty=1.3, stop_at_newline=True), "frequent"),
        (dataclasses.replace(GREEDY, source_repetition_penalty=3.0, max_new_tokens_ratio=0.5), "frequent"),
        (dataclasses.replace(GREEDY, no_repeat_ngram_size=2), "real"),
        (dataclasses.replace(GREEDY, no_repeat_ngram_size=3, source_repetition_penalty=1.3), "frequent"),
        (GenerationConfig(max_new_tokens=12), "real"),  # the defaults
        (dataclasses.replace(GREEDY, source_no_repeat_ngram_size=1), "real"),
        (dataclasses.replace(GREEDY, source_no_repeat_ngram_size=2, no_repeat_ngram_size=2), "frequent"),
        (dataclasses.replace(GREEDY, fact_guard=False), "real"),
        (dataclasses.replace(GREEDY, fact_guard=False, source_no_repeat_ngram_size=2), "frequent"),
    ],
    ids=["plain", "penalty-1.3", "rows-stop-early", "strong-penalty-short-limits", "no-repeat-2",
         "no-repeat-3-rows-stop-early", "defaults", "source-block-1", "source-block-2-rows-stop-early",
         "no-fact-guard", "no-fact-guard-rows-stop-early"],
)
def test_decode_equals_hf_generate(tiny, gen, stops):
    prompts = [SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=n, init="random", seed=n))
               for n in (3, 6)]
    # mixed prompts, no prompt, and very different lengths: left padding and per-row limits differ
    rows = [row_for(tiny, s, [prompts[0], prompts[1], None][i % 3], T, gen) for i, s in enumerate(SOURCES)]
    assert fast_greedy_applies(tiny.model, gen, tiny.tokenizer)
    x, mask = build_batch(tiny, rows)
    tok = tiny.tokenizer
    rules = DecodeRules.build(gen, tok, x.device)  # eos, the newline ids, and every rule of gen
    with torch.no_grad():
        if stops == "frequent":
            # a random tiny model never says eos or newline: stand in its two most frequent tokens, so rows
            # stop at different steps and leave the batch (the pruning path)
            free = decode(tiny.model, x, mask, rows, dataclasses.replace(rules, stop_ids=(), newline_ids=()))
            common = torch.bincount(free.flatten()).argsort(descending=True)[:2].tolist()
            rules = dataclasses.replace(rules, stop_ids=common[:1], newline_ids=common[1:] if gen.stop_at_newline else [])
        ours = decode(tiny.model, x, mask, rows, rules)
        ref = hf_generate(tiny, x, mask, rows, gen, rules, use_cache=True)
    lengths = []
    for i, r in enumerate(rows):  # token for token, up to each row's own limit
        a, b = ours[i, : r.max_new_tokens].tolist(), ref[i, : r.max_new_tokens].tolist()
        a += [tok.pad_token_id] * (len(b) - len(a))
        assert a[: len(b)] == b, f"row {i}"
        lengths.append(sum(t != tok.pad_token_id for t in a))
    assert max(lengths) > 0
    if stops == "frequent":
        assert len(set(lengths)) > 1  # rows did stop at different steps


def test_generate_rows_fast_path_equals_uncached_generate(tiny):
    p = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=5, init="random", seed=2))
    gen = GenerationConfig(max_new_tokens=16)  # the defaults: source 4-gram block, no-repeat 3-grams, stop at the newline
    rows = [row_for(tiny, s, p, T, gen) for s in SOURCES]
    assert generate_rows(tiny, rows, gen) == generate_rows(tiny, rows, gen, use_cache=False)
    one_by_one = [generate_rows(tiny, [r], gen)[0] for r in rows]
    assert generate_rows(tiny, rows, gen) == one_by_one


def test_fast_path_routes_other_configs_to_hf_generate(tiny):
    tok = tiny.tokenizer
    assert fast_greedy_applies(tiny.model, GenerationConfig(), tok)
    assert fast_greedy_applies(tiny.model, GenerationConfig(no_repeat_ngram_size=3), tok)
    for other in (dict(do_sample=True), dict(num_beams=2), dict(repetition_penalty=1.2)):
        assert not fast_greedy_applies(tiny.model, GenerationConfig(**other), tok), other
    tiny.model.generation_config.suppress_tokens = [5]
    assert not fast_greedy_applies(tiny.model, GenerationConfig(), tok)


def test_paraphrase_is_unchanged_by_the_fast_path(tiny, monkeypatch):
    p = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=5, init="random", seed=3))
    gen = GenerationConfig(max_new_tokens=16)
    fast = paraphrase(tiny, SOURCES, p, T, gen, batch_size=4)
    import paraphrase_ray.generation.generate as gen_mod

    monkeypatch.setattr(gen_mod, "fast_greedy_applies", lambda *a: False)
    assert paraphrase(tiny, SOURCES, p, T, gen, batch_size=4) == fast


def test_auto_precision_is_fp32_on_every_cpu(monkeypatch):
    import paraphrase_ray.models as models

    cpu = torch.device("cpu")
    for has_bf16 in (True, False):  # AVX512-BF16 or not: CPU decoding is a GEMV, and bf16 GEMV crawls
        monkeypatch.setattr(models, "cpu_has_bf16", lambda v=has_bf16: v)
        assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice is kept


def test_no_repeat_ngram_bans_what_the_free_run_repeats(tiny):
    # a random tiny model loops; with n-gram bans its greedy output has no repeated bigram at all
    gen = dataclasses.replace(GREEDY, max_new_tokens=24, max_new_tokens_ratio=10.0)
    rows = [row_for(tiny, s, None, T, gen) for s in SOURCES]
    x, mask = build_batch(tiny, rows)
    with torch.no_grad():  # each row to its own limit, no rule but the no-repeat ban
        free = decode(tiny.model, x, mask, rows, DecodeRules(pad_id=tiny.tokenizer.pad_token_id))
        banned = decode(tiny.model, x, mask, rows, DecodeRules(pad_id=tiny.tokenizer.pad_token_id, no_repeat_ngram=2))

    def repeats(ids):
        bigrams = list(zip(ids, ids[1:]))
        return len(bigrams) - len(set(bigrams))

    assert sum(repeats(r.tolist()) for r in free) > 0  # the free run does repeat, so the ban is exercised
    assert all(repeats(r.tolist()) == 0 for r in banned)


def test_source_ngram_block_never_copies_a_source_ngram(tiny):
    from paraphrase_ray.generation.rules import source_ngrams

    assert source_ngrams([1, 2, 3, 1, 2, 4], 3) == {(1, 2): [3, 4], (2, 3): [1], (3, 1): [2]}
    # make the free greedy output itself the "source": unblocked, the model would copy it token for token
    free_gen = dataclasses.replace(GREEDY, max_new_tokens=12)
    free = generate_rows(tiny, [row_for(tiny, SOURCES[0], None, T, free_gen)], free_gen)[0][0]
    ids = tiny.tokenizer(free, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    for n in (1, 2):
        gen = dataclasses.replace(free_gen, source_no_repeat_ngram_size=n)
        row = row_for(tiny, SOURCES[0], None, T, gen)
        # penalise the free run's n-grams; 12 new tokens
        row = dataclasses.replace(row, source_ngrams=source_ngrams(ids, n), max_new_tokens=12)
        x, mask = build_batch(tiny, [row])
        plain = DecodeRules(pad_id=tiny.tokenizer.pad_token_id)
        with torch.no_grad():
            unblocked = decode(tiny.model, x, mask, [row], plain)[0].tolist()
            out = decode(tiny.model, x, mask, [row], dataclasses.replace(plain, source_ngram_n=n))[0].tolist()

        def grams(t, n=n):
            return {tuple(t[j : j + n]) for j in range(len(t) - n + 1)}

        assert grams(unblocked) & grams(ids), n  # unblocked, it does copy them
        assert not grams(out) & grams(ids), n


def test_source_block_never_cuts_a_word_in_half(smollm):
    from paraphrase_ray.generation.rules import source_ngrams, word_continuation_ids

    tok = smollm.tokenizer
    cont = word_continuation_ids(tok)
    ids = tok("Gary Nicklaus, the 34-year-old son", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # 'ĠNick' starts a word; 'laus' and the digits continue one (the space marker is a letter to isalnum)
    assert ids[pieces.index("ĠNick")] not in cont and ids[pieces.index("laus")] in cont
    grams = source_ngrams(ids, 2, cont)
    banned = {t for follow in grams.values() for t in follow}
    assert ids[pieces.index("laus")] not in banned  # "Nick" may always be finished as "Nicklaus"
    assert ids[pieces.index(",")] in banned and ids[pieces.index("Ġthe")] in banned
    assert source_ngrams(ids, 2) != grams  # without the exemption, continuations are banned too


def _copied_ngrams(out: list[int], src: list[int], n: int = 4) -> list[tuple[int, ...]]:
    grams = {tuple(src[j : j + n]) for j in range(len(src) - n + 1)}
    return [tuple(out[j : j + n]) for j in range(len(out) - n + 1) if tuple(out[j : j + n]) in grams]


def test_whole_word_exemption_reaches_real_generation(tiny):
    """Rows from ``row_for`` with the default n = 4: generation may finish a copied word (a source 4-gram that
    ends in a word-continuation token) but never copies a 4-gram that ends on a word start; without the
    exemption (the strict ban) it copies neither, and the outputs differ."""
    from paraphrase_ray.generation.generate import clean_text
    from paraphrase_ray.generation.rules import source_ngrams, word_continuation_ids

    tok = tiny.tokenizer
    cont = word_continuation_ids(tok)
    # the fact guard is another rule (tested on its own): off here, so only the n-gram bans differ
    gen = GenerationConfig(max_new_tokens=24, max_new_tokens_ratio=10.0, stop_at_newline=False, fact_guard=False)
    assert gen.source_no_repeat_ngram_size == 4  # the default
    free_gen = dataclasses.replace(gen, source_no_repeat_ngram_size=0, no_repeat_ngram_size=0)
    finished_words = differ = 0
    for pair in PAIRS[:12]:
        model_input = row_for(tiny, pair.source, None, T, free_gen)
        x, mask = build_batch(tiny, [model_input])
        with torch.no_grad():  # 24 new tokens, no rule
            free = decode(tiny.model, x, mask, [dataclasses.replace(model_input, max_new_tokens=24)],
                          DecodeRules(pad_id=tok.pad_token_id))[0].tolist()
        # the "source" is the model's own free run, so unblocked it would copy it; the model still reads the
        # sample sentence, and the bans come from row_for on the source text
        source = tok.decode(free, skip_special_tokens=True)
        row = dataclasses.replace(row_for(tiny, source, None, T, gen), ids=model_input.ids)
        src = tok(source, add_special_tokens=False)["input_ids"]
        strict = dataclasses.replace(row, source_ngrams=source_ngrams(src, 4))
        if not _copied_ngrams(free, src):
            continue  # the text does not tokenize back to the run here: nothing for the bans to do
        outs = []
        for r in (row, strict):
            with torch.no_grad():
                out = decode(tiny.model, x, mask, [r], DecodeRules(
                    stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, no_repeat_ngram=3, source_ngram_n=4,
                ))[0].tolist()
            outs.append(out)
        ours, theirs = outs
        assert all(g[-1] in cont for g in _copied_ngrams(ours, src)), "copied a 4-gram ending on a word start"
        assert not _copied_ngrams(theirs, src)
        finished_words += bool(_copied_ngrams(ours, src))
        # and generate_rows, the path paraphrase / Serve take, gives the same text as the loop above
        text = generate_rows(tiny, [row], gen)[0][0]
        assert text == clean_text(tok.decode(ours, skip_special_tokens=True))
        differ += text != generate_rows(tiny, [strict], gen)[0][0]
    assert finished_words >= 3 and differ >= 3, (finished_words, differ)


@pytest.mark.slow
def test_whole_word_exemption_keeps_copied_names_whole_on_smollm(smollm):
    """The embedded model, zero-shot chat, default decoding (n = 4): "Nicklaus" comes out whole; with the strict
    ban (no exemption) the same decoding cuts or mangles it."""
    from paraphrase_ray.generation.rules import source_ngrams

    src = "Gary Nicklaus, the 34-year-old son of Jack Nicklaus, shot a 66 at Pinehurst on Thursday."
    gen = GenerationConfig(max_new_tokens=40)
    assert gen.source_no_repeat_ngram_size == 4
    row = row_for(smollm, src, None, T, gen, chat=True)
    ours = generate_rows(smollm, [row], gen)[0][0]
    ids = smollm.tokenizer(src, add_special_tokens=False)["input_ids"]
    strict = generate_rows(smollm, [dataclasses.replace(row, source_ngrams=source_ngrams(ids, 4))], gen)[0][0]
    assert "Gary Nicklaus" in ours, ours
    assert ours != strict, (ours, strict)
