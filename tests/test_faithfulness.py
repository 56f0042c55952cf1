"""Faithfulness: the fact metric on hand-written rows, and FactGuard's token bans against the rule they implement."""

from __future__ import annotations

import random

import pytest

from paraphrase_ray.generation.fact_guard import FactGuard
from paraphrase_ray.text import GUARD_WORD, FactCheck, check, facts, faithful_rate

# ---------------------------------------------------------------------------------------------- metric

ISSUE_ROWS = [  # (source, output, invented, dropped): the failures the issue quotes
    ("They met on Thursday.", "They met on Wednesday.", ("Wednesday",), ()),
    ("He lives in El Paso now.", "He now lives in El Pines.", ("Pines",), ()),
    ("Police said Rasheed left.", "Police said Rassheed left.", ("Rassheed",), ()),
    ("He was held by Moroccan police.", "He was held by Morcdes police.", ("Morcdes",), ()),
    ("The minister resigned.", "The minister resigned, he told CNN.", ("CNN",), ()),
    ("The plane had 75 people aboard including 62 Spanish peacekeepers.", "The plane had 75 Spanish peacekeepers.",
     (), ("62",)),
    ("He was tried in that case.", "He was tried in the trial of 2001.", ("2001",), ()),
]


@pytest.mark.parametrize("source,output,invented,dropped", ISSUE_ROWS)
def test_issue_examples_are_caught(source, output, invented, dropped):
    assert check(source, output) == FactCheck(invented, dropped, False)


NOT_FACTS = [  # (source, output): nothing invented, nothing dropped
    ("he left early.", "Yesterday he left early."),  # a capitalised first word
    ("He left. the rain came.", "He left. Then the rain came."),  # a sentence start after a period
    ("Was it late? he asked.", "Was it late? Nobody knew, he asked."),  # ... and after "?"
    ("he said the plan works.", 'He said "The plan works".'),  # a quotation's (quoted title's) first word
    ("she thinks it is fine.", "I think she thinks it is fine."),  # the pronoun
    ("The bill passed the senate.", "The bill passed the Senate."),  # lower case in the source
    ("1,200 people came.", "There came 1200 people."),
    ("1200 people came.", "There came 1 200 people."),
    ("1 200 people came.", "There came 1,200 people."),
    ("Sen. Kerry spoke.", "Senator Kerry spoke."),
    ("Senator Kerry spoke.", "The speaker was Sen. Kerry."),  # "Kerry" after "Sen." is no sentence start
    ("Bush's plan failed.", "The plan of Bush failed."),
    ("The plan of Jones failed.", "It was Jones' plan that failed."),
    ("The U.S. agreed.", "The US agreed."),
    ("The US agreed.", "The U.S agreed."),
    ("Two men left.", "The 2 men left."),  # a spelled-out number matches its digits
    ("2 men left.", "Two men left."),  # ... both ways: "2" is not dropped
    ("It grew 1.5 percent in March.", "In Mar. it grew 1.5 percent."),
    ("It was built by Al-Qaeda.", "Al Qaeda built it."),
]


@pytest.mark.parametrize("source,output", NOT_FACTS)
def test_what_a_reader_calls_the_same_fact_is_not_a_change(source, output):
    assert check(source, output) == FactCheck((), (), True)


def test_facts_normalises_and_skips_sentence_starts():
    f = facts('Yesterday Sen. Kerry\'s aides said "The 1,200 men" in the U.S. were paid 1.5 million.')
    assert f.numbers == frozenset({"1200", "1.5"})
    assert f.names == frozenset({"sen", "kerry", "us"})
    assert facts("") == facts("...") == facts("I") == type(f)(frozenset(), frozenset())


def test_surface_forms_are_reported_once_in_order():
    got = check("A 1 200 ton ship.", "A 1 200 ton ship on Monday, Monday's ship by 7 and 7, Jan.")
    assert got.invented == ("Monday", "7", "Jan")
    assert check("It cost 1,200 and 62 dollars.", "It was costly.").dropped == ("1,200", "62")


def test_empty_output_drops_every_number_and_invents_nothing():
    assert check("It has 3 cats and 1,200 fleas.", "") == FactCheck((), ("3", "1,200"), False)
    assert check("It has cats.", "") == FactCheck((), (), True)


def test_faithful_rate():
    rows = [("On Thursday.", "On Thursday."), ("On Thursday.", "On Friday."), ("In 2001.", "In 2002.")]
    assert faithful_rate([s for s, _ in rows], [o for _, o in rows]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one output per source"):
        faithful_rate(["a"], [])
    with pytest.raises(ValueError, match="nothing to score"):
        faithful_rate([], [])


# ---------------------------------------------------------------------------------------------- guard


def rule_ok(guard: FactGuard, text: str) -> bool:
    """The rule the bans implement, on text: every guarded word (a digit run, or a capitalised word other than
    the first) is a prefix of a word the source allows."""
    words = GUARD_WORD.findall(text)
    return all(
        any(s.startswith(w) for s in guard.words)
        for j, w in enumerate(words)
        if w[0].isdigit() or (w[0].isupper() and j > 0)
    )


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def writable(tok, guard: FactGuard, text: str) -> bool:
    """True when no token of ``text``'s tokenisation is banned after the tokens before it."""
    ids = ids_of(tok, text)
    return all(ids[j] not in set(guard.bans(ids[:j])) for j in range(len(ids)))


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from conftest import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2's tokenizer alone: from the converted model directory when present, else from the GGUF (~10 s)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from paraphrase_ray.models import OFFLINE_ALIASES, cache_dir

    converted = cache_dir() / "models" / "smollm2-135m"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    package, gguf = OFFLINE_ALIASES["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0])), gguf_file=gguf)


SOURCE = "Rasheed said on Thursday that 1,200 people in El Paso met Sen. Kerry and two aides."


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smol_tok")
    return request.getfixturevalue("tiny_tok")


@pytest.mark.parametrize("text,ok", [
    ("He said Rasheed left.", True),
    ("He said Rassheed left.", False),
    ("They met on Thursday.", True),
    ("They met on Wednesday.", False),
    ("They met in El Paso.", True),
    ("They met in El Pines.", False),
    ("Wednesday was when they met.", True),  # the first word may be any capitalised word
    ("Nobody knows Kerry.", True),
    ("He saw 1,200 people.", True),
    ("He saw 1200 people.", True),  # a source "1,200" may be written without the comma
    ("He saw 2 aides.", True),  # "two" in the source
    ("He saw 1,300 people.", False),
    ("It was the trial of 2001.", False),
    ("2001 was the year.", False),  # the first word is not exempt from the digit rule
    ("Senator Kerry met them.", True),  # "Sen." in the source
    ("he said, \"of course\" - and then (quietly) left; the rest is history's.", True),
])
def test_what_the_guard_lets_through(tok, text, ok):
    guard = FactGuard(tok, SOURCE)
    assert writable(tok, guard, text) is ok


def test_single_character_spelling_cannot_sneak_a_word_in(tiny_tok):
    # "Rassheed" as one byte-level token per character: the ban falls on the second "s"
    guard = FactGuard(tiny_tok, SOURCE)
    ids = [tiny_tok.convert_tokens_to_ids(c) for c in ["Ġ", "R", "a", "s", "s"]]
    prefix = ids_of(tiny_tok, "He met")
    assert all(ids[j] not in guard.bans(prefix + ids[:j]) for j in range(4))
    assert ids[4] in guard.bans(prefix + ids[:4])


def test_never_banned_eos_newline_punctuation_lowercase(tok):
    guard = FactGuard(tok, SOURCE)
    v = guard.vocab
    keep = {tok.eos_token_id, *ids_of(tok, "\n"), *ids_of(tok, " the"), *ids_of(tok, ","), *ids_of(tok, "'")}
    for prefix in ["", "He said", "He said Ras", "He said 1,", "He said 12"]:
        banned = set(guard.bans(ids_of(tok, prefix)))
        assert not banned & keep
        assert not any("\n" in v.text[i] or not v.head[i] or v.head[i][0].islower() and v.lead[i] for i in banned)


def test_bans_match_the_rule_on_every_token(tok):
    """The fast masks equal the rule applied to text: for many prefixes and every token (a sample of SmolLM2's),
    the token is banned iff prefix + its text breaks the rule (tokens the guard never bans are skipped)."""
    guard = FactGuard(tok, SOURCE)
    v, rng = guard.vocab, random.Random(0)
    ids = list(range(v.size)) if v.size < 1000 else rng.sample(range(v.size), 3000)
    ids = [i for i in ids if v.head[i]]  # the rest is never banned (tested above)
    prefixes = ["", "He", "He said", "He said ", "He said Ras", "He said Rasheed", "In El P", "In El Pa", "Sen",
                "He saw 1", "He saw 1,", "He saw 1,2", "He saw 12", "He saw 2", "(", "He said \"", "Wednesday"]
    for prefix in prefixes:
        pids = ids_of(tok, prefix)
        text = "".join(v.text[i] for i in pids)
        assert rule_ok(guard, text), prefix
        banned = set(guard.bans(pids))
        wrong = [v.text[i] for i in ids if (i in banned) == rule_ok(guard, text + v.text[i])]
        assert not wrong, (prefix, wrong[:10])


def test_vocab_text_is_what_decode_writes(tiny_tok):
    v = FactGuard(tiny_tok, SOURCE).vocab
    special = set(tiny_tok.all_special_ids)
    assert all(v.text[i] == tiny_tok.decode([i]) for i in range(v.size) if i not in special)


def test_bans_tensor_equals_bans_and_drops_ids_past_the_vocab(tiny_tok):
    guard = FactGuard(tiny_tok, SOURCE)
    for prefix in ["", "He said", "He said Ras", "He said 1,"]:
        pids = ids_of(tiny_tok, prefix)
        assert guard.bans_tensor(pids).tolist() == guard.bans(pids)
        assert guard.bans_tensor(pids, vocab_size=100).tolist() == [i for i in guard.bans(pids) if i < 100]


# ---------------------------------------------------------------------------------------------- generation


def _capital_bias(vocab, bonus: float):
    """A processor that pushes every capitalised / digit token up, so an unguarded model invents facts."""
    import torch

    mask = torch.as_tensor(vocab.start)

    def bias(input_ids, scores):
        return scores + bonus * mask[: scores.shape[1]].to(scores.dtype)

    return bias


def test_generate_with_the_processor_cannot_invent_and_matches_a_plain_loop(tiny):
    import torch
    from transformers import LogitsProcessorList

    from paraphrase_ray.generation.fact_guard import FactGuardProcessor

    tok, model = tiny.tokenizer, tiny.model
    sources = [SOURCE, "The bank in Oslo raised rates by 3 points on Tuesday."]
    guards = [FactGuard(tok, s) for s in sources]
    bias = _capital_bias(guards[0].vocab, 8.0)
    emb = model.get_input_embeddings()
    rows = [ids_of(tok, s + "\nParaphrase:") for s in sources]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left-padded
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    common = dict(inputs_embeds=emb(ids), attention_mask=mask, max_new_tokens=16, pad_token_id=tok.pad_token_id)

    def run(processors, **kw):
        with torch.no_grad():
            out = model.generate(**common, **kw, logits_processor=LogitsProcessorList(processors))
        return out, [tok.decode(o, skip_special_tokens=True) for o in out]

    _, unguarded = run([bias], do_sample=False)
    assert not all(rule_ok(g, t) for g, t in zip(guards, unguarded))  # the bias does make it invent
    greedy, texts = run([bias, FactGuardProcessor(guards)], do_sample=False)
    assert all(rule_ok(g, t) for g, t in zip(guards, texts)), texts
    guarded_words = [w for t in texts for w in GUARD_WORD.findall(t)[1:] if w[0].isupper() or w[0].isdigit()]
    assert guarded_words  # source facts still get through (here "1200")

    # the same bans in a plain greedy loop (what the fast path does) give the same tokens
    with torch.no_grad():
        x, m, seqs = emb(ids), mask, [[] for _ in rows]
        for _ in range(greedy.shape[1]):
            scores = bias(None, model(inputs_embeds=x, attention_mask=m).logits[:, -1].float())
            for r, g in enumerate(guards):
                scores[r, g.bans(seqs[r])] = -float("inf")
            nxt = scores.argmax(-1)
            for r in range(len(rows)):
                seqs[r].append(int(nxt[r]))
            x, m = torch.cat([x, emb(nxt)[:, None]], 1), torch.cat([m, m.new_ones(len(rows), 1)], 1)
    eos = tok.eos_token_id
    for r, row in enumerate(greedy.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        assert seqs[r][:n] == row[:n]

    # beams and sampling: row r of the expanded batch uses guard r // k
    _, beams = run([bias, FactGuardProcessor(guards)], num_beams=3, num_return_sequences=2, do_sample=False)
    torch.manual_seed(0)
    _, sampled = run([bias, FactGuardProcessor(guards)], do_sample=True, num_return_sequences=2, top_k=None)
    for texts in (beams, sampled):
        assert all(rule_ok(guards[r // 2], t) for r, t in enumerate(texts)), texts
