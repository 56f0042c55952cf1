"""Fact faithfulness: a metric that sees changed names and numbers, and a decoding guard that cannot invent them.

Embedding cosine cannot tell "on Thursday" from "on Wednesday", or "Rasheed" from "Rassheed"; a 135M paraphraser
changes exactly such facts. Two pieces, both keyed on the same notion of a fact:

**Metric** (``facts`` / ``check`` / ``faithful_rate``; plain Python). Facts of a text are its numbers and its
capitalised words. A row is ``faithful`` when the output invents no fact (none missing from the source) and
drops no number of the source. Rules, so that what a reader calls the same fact compares equal:

- Numbers are digit runs: "1,200", "1 200" and "1200" are one number; "1.5" stays a number; "1990s" holds 1990.
  Spelled-out numbers (one..twenty, thirty..ninety, hundred) are not facts, but match their digits both ways:
  "two" in the source lets the output say "2", and "2" in the source is not dropped by an output saying "two".
- Names are capitalised words (first letter upper-case), except a reader's sentence start: the first word of
  the text, the first word after ".", "?", "!" or a line break, and a word written directly after a quotation
  mark (the start of a quote or a quoted title: ``said "The plan works"``). A "." that ends a known
  abbreviation, an initial ("W.") or a dotted acronym ("U.S.") does not end a sentence. The pronoun "I" is no
  name. Hyphens split words ("Al-Qaeda" is "Al" and "Qaeda").
- Compare case-insensitively against *every* source word, so source "the senate" lets the output write "the
  Senate". Possessives drop ("Bush's", "Jones'" = "Bush", "Jones"); "U.S." = "U.S" = "US"; a small table maps
  titles, months and company words to one form ("Sen." = "Senator", "Jan." = "January", "Corp." = ...).
- Reports keep the surface form ("Morcdes"); comparison uses the normalised one.

**Guard** (``FactGuard`` / ``FactGuardProcessor``): token-level bans so decoding cannot invent a fact. A token
that would start a capitalised word or a digit run is banned unless its text is a prefix of a source word
(case-sensitive); while such a word is being written, a continuation token must keep it a prefix of a source
word. So "Ras"+"heed" is reachable but "Rassheed" and "El Pines" are not. The output's first word is exempt from
the capital rule (not from the digit rule). Punctuation, whitespace, newline and special (eos) tokens are never
banned, nor is a lower-case word (its continuations are free too). Guard words are letter runs and digit-initial
runs (which may hold letters, and "," or "." between digits: "1,200", "1990s"); a digit glued to letters starts a
new, guarded word. Source numbers are also allowed comma-free and with thousands commas, spelled-out numbers as
digits, table abbreviations in both forms. Words are checked as prefixes only, so a truncated source word ("Sen"
from "Senator") passes. Unlike the metric, the guard is case-sensitive and does not exempt later sentence starts.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from paraphrase_ray.errors import InputError

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
    if i > 0
}
_NUMBER_WORDS.update({w: str(10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_NUMBER_WORDS["hundred"] = "100"
# long form -> short form; every form of a fact is compared through the short one
_ABBREVIATIONS = {
    "senator": "sen", "representative": "rep", "governor": "gov", "general": "gen", "doctor": "dr",
    "mister": "mr", "lieutenant": "lt", "colonel": "col", "sergeant": "sgt", "captain": "capt",
    "professor": "prof", "saint": "st", "street": "st", "january": "jan", "february": "feb", "march": "mar",
    "april": "apr", "june": "jun", "july": "jul", "august": "aug", "september": "sep", "sept": "sep",
    "october": "oct", "november": "nov", "december": "dec", "corporation": "corp", "incorporated": "inc",
    "company": "co", "department": "dept",
}
_SHORT_FORMS = frozenset(_ABBREVIATIONS.values()) | {"mrs", "ms"}
_PRONOUN_I = frozenset({"i", "i'm", "i'd", "i'll", "i've"})
_QUOTES = "\"'“”‘’«»"
# One pass over a text: numbers (comma / space thousands, decimals), dotted acronyms, words, sentence ends.
_TOKEN = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?:[ \u00a0]\d{3})+(?![\d,.])|\d+(?:\.\d+)?)"
    r"|(?P<acr>[^\W\d_](?:\.[^\W\d_])+\.?)"
    r"|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*['’]?)"
    r"|(?P<end>[.?!]+|\n)"
)
# The guard's words: letter runs, and digit-initial alphanumeric runs that may hold "," or "." between digits
# ("1,200", "1990s"); a digit after letters starts a new word, as the metric reads "the2001" as holding 2001.
_GUARD_WORD = re.compile(r"\d[^\W_]*(?:[.,]\d[^\W_]*)*|[^\W\d_]+")


@dataclass(frozen=True)
class Facts:
    """Normalised facts of a text: numbers ("1200", "1.5") and names (lower-case, abbreviations shortened)."""

    numbers: frozenset[str]
    names: frozenset[str]


@dataclass(frozen=True)
class FactCheck:
    """One row: facts the output invented, source numbers it dropped (surface forms, in order of appearance)."""

    invented: tuple[str, ...]
    dropped: tuple[str, ...]
    faithful: bool


def _number_key(surface: str) -> str:
    return surface.replace(",", "").replace(" ", "").replace("\u00a0", "")


def _word_key(surface: str) -> str:
    """Case-, possessive-, acronym- and abbreviation-insensitive form: "Bush's" -> "bush", "U.S." -> "us"."""
    w = surface.replace("’", "'").lower()
    if w.endswith("'s"):
        w = w[:-2]
    w = w.rstrip("'").replace(".", "")
    return _ABBREVIATIONS.get(w, w)


def _scan(text: str) -> list[tuple[str, str, str, bool]]:
    """(kind, surface, key, at_sentence_start) per number ("num") and word ("word") of ``text``, in order."""
    out: list[tuple[str, str, str, bool]] = []
    at_start, prev_word = True, ""
    for m in _TOKEN.finditer(text):
        kind, surface = m.lastgroup, m.group()
        if kind == "end":
            # "Sen." / "W." / a closing "U.S." do not end a sentence; "?", "!" and line breaks always do
            short = prev_word.lower() in _SHORT_FORMS or (len(prev_word) == 1 and prev_word.isupper())
            if not (surface == "." and short):
                at_start = True
            prev_word = ""
            continue
        quoted = m.start() > 0 and text[m.start() - 1] in _QUOTES  # a quotation's (or quoted title's) first word
        if kind == "num":
            out.append(("num", surface, _number_key(surface), at_start))
        else:
            out.append(("word", surface, _word_key(surface), at_start or quoted))
        at_start, prev_word = False, surface if kind == "word" else ""
    return out


def _is_name(kind: str, surface: str, key: str, at_start: bool) -> bool:
    return kind == "word" and surface[0].isupper() and not at_start and key not in _PRONOUN_I


def facts(text: str) -> Facts:
    """Numbers and names of ``text``, normalised (see the module docstring for the rules)."""
    scanned = _scan(text)
    return Facts(
        numbers=frozenset(k for kind, _, k, _ in scanned if kind == "num"),
        names=frozenset(k for kind, s, k, st in scanned if _is_name(kind, s, k, st)),
    )


def check(source: str, output: str) -> FactCheck:
    """Facts ``output`` invents (names or numbers not in ``source``) and source numbers it drops.

    An empty output invents nothing and drops every source number (faithful only if the source has none).
    """
    src, out = _scan(source), _scan(output)
    src_numbers = {k for kind, _, k, _ in src if kind == "num"}
    src_keys = {k for kind, _, k, _ in src if kind == "word"}
    src_spelled = {_NUMBER_WORDS[k] for k in src_keys if k in _NUMBER_WORDS}
    out_numbers = {k for kind, _, k, _ in out if kind == "num"}
    out_numbers |= {_NUMBER_WORDS[k] for kind, _, k, _ in out if kind == "word" and k in _NUMBER_WORDS}
    invented: dict[str, str] = {}  # key -> first surface form
    for kind, surface, key, at_start in out:
        if kind == "num" and key not in src_numbers and key not in src_spelled:
            invented.setdefault(key, surface)
        elif _is_name(kind, surface, key, at_start) and key not in src_keys:
            invented.setdefault(key, surface)
    dropped: dict[str, str] = {}
    for kind, surface, key, _ in src:
        if kind == "num" and key not in out_numbers:
            dropped.setdefault(key, surface)
    return FactCheck(tuple(invented.values()), tuple(dropped.values()), not invented and not dropped)


def faithful_rate(sources: Sequence[str], outputs: Sequence[str]) -> float:
    """Share of rows whose output is ``faithful`` to its source, in [0, 1]."""
    if len(sources) != len(outputs):
        raise InputError(f"got {len(sources)} sources but {len(outputs)} outputs; pass one output per source")
    if not sources:
        raise InputError("nothing to score: sources and outputs are empty lists")
    return sum(check(s, o).faithful for s, o in zip(sources, outputs)) / len(sources)


# ---------------------------------------------------------------------------------------------- decoding guard


def _source_words(source: str) -> set[str]:
    """Every word the guard lets the output write (by prefix): the source's guard words and their variants."""
    words = set(_GUARD_WORD.findall(source))
    for kind, surface, key, _ in _scan(source):
        if kind == "num":
            words.add(key)  # "1,200" / "1 200" -> "1200"
            whole, _, frac = key.partition(".")
            if whole.isdigit():
                words.add(f"{int(whole):,}" + (f".{frac}" if frac else ""))  # "1200" -> "1,200"
        elif key in _NUMBER_WORDS:
            words.add(_NUMBER_WORDS[key])
        elif key in _SHORT_FORMS:
            forms = [long for long, short in _ABBREVIATIONS.items() if short == key] + [key]
            for form in forms:  # in the source's capitalisation: "Sen" -> "Senator", "SEN"
                cased = form.upper() if surface.isupper() and len(surface) > 1 else form
                words.add(cased[0].upper() + cased[1:] if surface[0].isupper() else cased)
    return words


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable-char -> byte map (its ``bytes_to_unicode``, inverted)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {chr(c): b for b, c in zip(bs, cs)}


class _Vocab:
    """Per-tokenizer scan (one pass over the vocabulary): what each token would write.

    A token's text is its piece with the word-start marker as a space ("Ġ"/"▁"; byte-level pieces decoded to
    UTF-8, so "ĠNiÃ±o" is " Niño"). ``lead``: it starts with whitespace, so it starts a new word. ``head``: the
    guard word at the start of its text, or "" when the text starts with no letter or digit, holds a newline,
    or the token is special -- such tokens are never banned. ``rest_words``: guard words after the head (rare
    multi-word pieces such as "▁U.S."), checked once per source.
    """

    def __init__(self, tokenizer: Any) -> None:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        byte_level = sum(p.startswith("Ġ") for p in pieces if p) > sum(p.startswith("▁") for p in pieces if p)
        dec = _byte_decoder() if byte_level else {}
        special = set(tokenizer.all_special_ids)
        self.size = len(pieces)
        self.lead = np.zeros(self.size, dtype=bool)
        self.head = [""] * self.size
        self.text = [""] * self.size  # special tokens write nothing (they are skipped when decoding)
        self.rest_words: dict[int, list[str]] = {}
        for i, p in enumerate(pieces):
            if not p or i in special:
                continue
            if dec and all(c in dec for c in p):
                text = bytes(dec[c] for c in p).decode("utf-8", errors="replace")
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", p):  # SentencePiece byte fallback
                text = chr(int(p[3:5], 16)) if int(p[3:5], 16) < 128 else "\ufffd"
            else:
                text = p.replace("▁", " ")
            self.text[i] = text
            content = text.lstrip(" \t")
            m = _GUARD_WORD.match(content)
            if "\n" in text or "\r" in text or m is None:
                continue
            self.lead[i], self.head[i] = content != text, m.group()
            rest = _GUARD_WORD.findall(content[m.end() :])
            if rest:
                self.rest_words[i] = rest
        # (vocab,) bool masks; a guarded start is a head that begins upper-case or with a digit
        self.digit = np.array([bool(h) and h[0].isdigit() for h in self.head])
        self.upper = np.array([bool(h) and h[0].isupper() for h in self.head])
        self.start = self.digit | self.upper
        self.cont = np.array([bool(h) for h in self.head]) & ~self.lead  # continues the word before it
        self.start_index = _index(np.flatnonzero(self.start).tolist(), self.head)
        self.cont_index = _index(np.flatnonzero(self.cont).tolist(), self.head)


def _index(ids: list[int], heads: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in ids:
        out.setdefault(heads[i], []).append(i)
    return out


_VOCABS: dict[int, tuple[weakref.ref, _Vocab]] = {}  # id(tokenizer) -> (ref to it, its scan)


def _vocab(tokenizer: Any) -> _Vocab:
    """The per-tokenizer scan, made once per tokenizer object (~1 s for SmolLM2's 49k pieces)."""
    hit = _VOCABS.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    scan = _Vocab(tokenizer)
    _VOCABS[id(tokenizer)] = (weakref.ref(tokenizer), scan)
    return scan


class FactGuard:
    """Token bans for one source row: a decoder using them cannot write a capitalised word or a number the
    source lacks (rules in the module docstring). Build one per row, ``FactGuard(tokenizer, source)``; then
    ``bans(generated_ids)`` gives the ids to set to -inf before choosing the next token.

    Work per row: set look-ups per source-word prefix and one vectorised pass over the tokens that can start a
    guarded word (~13k of SmolLM2's 49k). Per step: a regex over the generated text (to find the word being
    written) and a memoised look-up; a word's continuation bans are computed once per (row, word prefix).
    """

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.vocab = v = _vocab(tokenizer)
        self.words = sorted(_source_words(source))
        self.prefixes = {w[:k] for w in self.words for k in range(1, len(w) + 1)}
        bad = v.start.copy()  # (vocab,) bool: starts a guarded word that no source word begins with
        bad[[i for p in self.prefixes for i in v.start_index.get(p, ())]] = False
        # multi-word pieces whose later words are guarded and not in the source are banned everywhere
        bad[[i for i, rest in v.rest_words.items()
             if any((w[0].isupper() or w[0].isdigit()) and w not in self.prefixes for w in rest)]] = True
        self._lead = bad & v.lead  # right after a word, a token with a leading space starts a new one ...
        self._glued_digit = bad & v.digit & ~v.lead  # ... and after letters, so does a digit with no space
        self._upper_glued = bad & v.upper & ~v.lead  # after "1,": a capitalised token with no space starts one
        self._masks: dict[tuple[str, str], np.ndarray] = {
            ("first", ""): bad & v.digit,  # the output's first word: the digit rule only
            ("free", ""): bad,  # after a space or punctuation: any guarded start
            ("in", ""): self._lead | self._glued_digit,  # in an unguarded (letter) word: letters are free
        }
        self._ids: dict[tuple[str, str], np.ndarray] = {}  # state -> sorted banned ids (int64)
        self._lists: dict[tuple[str, str], list[int]] = {}
        self._tensors: dict[tuple[tuple[str, str], str], Any] = {}

    def state(self, generated_ids: Sequence[int]) -> tuple[str, str]:
        """What the bans depend on: ("first" | "free" | "in" | "sep", the guarded word being written or "")."""
        texts, n = self.vocab.text, self.vocab.size
        text = "".join(texts[t] for t in generated_ids if t < n)
        words = list(_GUARD_WORD.finditer(text))
        if not words:
            return ("first", "")
        last = words[-1]
        w = last.group()
        guarded = w[0].isdigit() or (w[0].isupper() and len(words) > 1)
        if last.end() == len(text):
            return ("in", w if guarded else "")
        if w[0].isdigit() and last.end() == len(text) - 1 and text[-1] in ".,":
            return ("sep", w + text[-1])  # "1," may go on as "1,200"
        return ("free", "")

    def bans(self, generated_ids: Sequence[int]) -> list[int]:
        """Token ids banned after ``generated_ids`` (this row's generated tokens only, prompt excluded).

        Sorted, memoised per state and shared between calls: do not modify the list.
        """
        key = self.state(generated_ids)
        if key not in self._lists:
            self._lists[key] = self._ban_ids(key).tolist()
        return self._lists[key]

    def bans_tensor(self, generated_ids: Sequence[int], device: Any = "cpu", vocab_size: int | None = None):
        """``bans`` as a LongTensor on ``device``, ids >= ``vocab_size`` dropped; memoised per state, so a loop
        that indexes ``scores[row, bans]`` does not rebuild a ~10k-long tensor from a list every step."""
        import torch

        key = self.state(generated_ids)
        cache_key = (key, f"{device}/{vocab_size}")
        if cache_key not in self._tensors:
            ids = self._ban_ids(key)
            if vocab_size is not None:
                ids = ids[: int(np.searchsorted(ids, vocab_size))]
            self._tensors[cache_key] = torch.from_numpy(ids).to(device)
        return self._tensors[cache_key]

    def _ban_ids(self, key: tuple[str, str]) -> np.ndarray:
        if key not in self._ids:
            self._ids[key] = np.flatnonzero(self._mask(key))
        return self._ids[key]

    def _mask(self, key: tuple[str, str]) -> np.ndarray:
        if key in self._masks:
            return self._masks[key]
        v, (kind, word) = self.vocab, key
        # a continuation is allowed when `word` + its head is still a prefix of a source word
        ok = np.zeros_like(v.cont)
        ok[[i for w in self.words if w.startswith(word) for k in range(len(word) + 1, len(w) + 1)
            for i in v.cont_index.get(w[len(word) : k], ())]] = True
        if kind == "sep":  # "1," + a digit token goes on with the number; other glued tokens start a word
            return self._lead | self._upper_glued | (v.cont & v.digit & ~ok)
        if word[0].isdigit():  # "1990" + "s": a digit word takes letters and digits
            return self._lead | (v.cont & ~ok)
        return self._lead | self._glued_digit | (v.cont & ~v.digit & ~ok)


def _processor_class() -> type:
    from transformers import LogitsProcessor

    class FactGuardProcessor(LogitsProcessor):
        """``FactGuard`` bans for Hugging Face ``generate`` (greedy, sampling, beams), one guard per source row.

        With ``inputs_embeds`` generation ``input_ids`` holds the generated tokens only: (rows, new_tokens). HF
        expands rows for beams / num_return_sequences with repeat_interleave, so score row r belongs to guard
        r // k, as in ``SourceNgramBlock``.
        """

        def __init__(self, guards: Sequence[FactGuard]):
            self.guards = list(guards)

        def __call__(self, input_ids, scores):
            k = scores.shape[0] // len(self.guards)
            for r, seq in enumerate(input_ids.tolist()):
                banned = self.guards[r // k].bans_tensor(seq, scores.device, scores.shape[1])
                if banned.numel():
                    scores[r, banned] = -float("inf")
            return scores

    return FactGuardProcessor


def __getattr__(name: str) -> Any:
    # PEP 562: the metric imports without transformers / torch; the processor class is made on first use.
    if name == "FactGuardProcessor":
        cls = _processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
