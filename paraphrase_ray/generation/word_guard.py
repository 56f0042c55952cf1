"""The word guard: decoding may reword, but may not add content, drop it, or leave a word half-written.

Blind readers rejected ~97% of the 135M model's paraphrases (docs/BENCHMARKS.md, "The reader's measure"): it
adds clauses ("...and officials tried to hide it"), drops the attribution ("..., she said"), flips a claim
("higher" -> "lower", "will appeal" -> "has appealed") and breaks words ("premiums" -> "premiumes"). The fact
guard (``fact_guard.py``) stops only invented names and numbers. This guard extends it to every word:

- **Nothing added.** A word may be written only if it is a *source word* (any case), an inflection of one that is
  an English word (``wordfreq``: "appeal" -> "appealed", "premium" -> "premiums", never "premiumes"), or a
  *grammar word* (``GRAMMAR_WORDS``: articles, pronouns, prepositions, conjunctions, forms of be/have/do). Modal
  verbs and negations are not grammar words: "could", "will" or "not" appear only when the source has them, so a
  claim cannot be softened, moved in time or negated.
- **Nothing half-written.** A token that would end a word (a space, punctuation, end of text) is banned while the
  word being written is only a prefix of an allowed word ("premi" must go on to "premium(s)").
- **Nothing dropped.** A sentence end (".", "!", "?"), the line end and the end of text are banned until the output
  holds a counterpart (same word or stem) of at least ``coverage`` of the source's content words, weighted as the
  detector weights them (``text.weight``: rarer words count more). Once the output has as many sentences as the
  source, it ends (a second sentence is where a small model rambles); past ``LENGTH_RATIO`` x the source's words it
  finishes its word and ends the sentence (guarded, the tuned prompt went on with comma clauses).
- **Nothing strange.** Symbols other than ``,.;:-`` and apostrophes only when the source has them ("#", "[", "*"); no capital
  inside a word ("lEgItImAtE"); clitics ("s", "t", "ll") only after an apostrophe.

Rewording is left to the model and to the source n-gram ban (``rules.SourceNgramBlock``): with the content words
fixed, a change of wording is a change of structure and of grammar words ("X said on Monday that Y" -> "On
Monday, X said Y"). Digits are left to the fact guard, which runs beside this one (``bans`` is their union).

Same interface as ``FactGuard`` (``bans`` / ``bans_tensor`` after a row's generated ids), so the fast loop, prompt
lookup and the HF processor all apply it. Masks are memoised per (row, word being written).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from paraphrase_ray.generation.fact_guard import FactGuard, _vocab
from paraphrase_ray.text import NUMBER_WORDS, is_content, stem, weight, words, zipf

# Closed-class English: what a rewording may add or drop freely. Deliberately without modals (can, could, will,
# would, may, might, must, shall, should), negations, quantifiers (all, more, some, many...) and adverbs of time:
# each of those changes a claim, so it appears only when the source has it.
GRAMMAR_WORDS = frozenset("""
a an the this that these those it its it's they them their theirs he him his she her hers we us our i me my you
your who whom whose which what there here
of to in on at by for from with into onto about as than over under after before between through during against
among within without upon via per
and or but nor so yet also both either neither whether if because while although though since
is are was were be been being am has have had having do does did done
""".split())
CLITICS = frozenset({"s", "t", "d", "ll", "re", "ve", "m"})  # only right after an apostrophe ("it's", "don't")
LENGTH_RATIO = 1.2  # words: an output this much longer than its source rambles (the tuned prompt did, guarded)
PLAIN_PUNCT = frozenset(",.;:-'’")  # punctuation any output may write; any other symbol only if the source has it
_ABBREV = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "sen", "rep", "gov", "gen", "lt", "col",
                     "inc", "co", "corp", "no", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
                     "oct", "nov", "dec", "u", "s"})
_LETTERS = re.compile(r"[^\W\d_]+")
_END = re.compile(r"(\w*)[.!?]+[\"”’')]*(?=\s|$)")


def sentence_ends(text: str) -> int:
    """Sentence ends in ``text``: ".", "!" or "?" before a space or the end, not after an abbreviation or an
    initial ("Mr.", "U.S.", "W.")."""
    return sum(1 for m in _END.finditer(text) if m.group(1) and m.group(1).lower() not in _ABBREV
               and not (len(m.group(1)) == 1 and m.group(1).isupper()))
_SUFFIXES = ("", "s", "es", "ed", "d", "ing", "er", "ers", "ly", "ion", "ions", "al", "ment", "ments", "ive")


def allowed_words(source: str) -> set[str]:
    """Lower-case letter words the output may write: grammar words, the source's words and their inflections
    that are English words (``stem`` + a suffix, or the word + a suffix, with a ``wordfreq`` frequency)."""
    out = set(GRAMMAR_WORDS)
    for w in _LETTERS.findall(source):
        w = w.lower()
        out.add(w)
        for base in {w, stem(w), w[:-1] if w.endswith("e") else w}:
            for suf in _SUFFIXES:
                cand = base + suf
                if cand not in out and len(cand) > 2 and zipf(cand) >= 2.0:
                    out.add(cand)
    out.update(k for k, v in NUMBER_WORDS.items() if v in source)  # "2" in the source lets it say "two"
    return out


def content_targets(source: str) -> list[str]:
    """The source's content words (as the detector reads them), each once, that the output must cover."""
    return list(dict.fromkeys(w for w in words(source) if is_content(w) and not w.isdigit()))


class _Scan:
    """Per tokenizer: each token's letter runs (lower-cased) and where they sit, for vectorised masks."""

    def __init__(self, tokenizer: Any) -> None:
        v = _vocab(tokenizer)
        n = v.size
        self.text = v.text
        self.first = [""] * n  # the token's first letter run, lower-cased ("" = none)
        self.starts_letter = np.zeros(n, dtype=bool)  # the run is the token's first character: it may continue
        self.closed = np.zeros(n, dtype=bool)  # something follows the first run inside the token: the word ends
        self.inner: dict[int, tuple[list[str], str]] = {}  # tokens with 2+ runs: (closed later runs, open tail)
        self.breaks = np.zeros(n, dtype=bool)  # the token writes a non-letter first: it ends the current word
        for i, t in enumerate(v.text):
            if not t:
                self.breaks[i] = True  # special tokens (eos) end the word too
                continue
            runs = list(_LETTERS.finditer(t))
            self.starts_letter[i] = bool(runs) and runs[0].start() == 0
            self.breaks[i] = not self.starts_letter[i]
            if not runs:
                continue
            self.first[i] = runs[0].group().lower()
            self.closed[i] = runs[0].end() < len(t)
            if len(runs) > 1:
                tail = runs[-1].group().lower() if runs[-1].end() == len(t) else ""
                closed = [r.group().lower() for r in runs[1:]] if not tail else [r.group().lower() for r in runs[1:-1]]
                self.inner[i] = (closed, tail)
        self.index: dict[tuple[str, bool, bool], list[int]] = {}  # (first run, starts_letter, closed) -> ids
        for i, f in enumerate(self.first):
            if f:
                self.index.setdefault((f, bool(self.starts_letter[i]), bool(self.closed[i])), []).append(i)
        self.stop = np.array(["\n" in t or "\r" in t or not t for t in v.text])  # ends the output
        self.symbols = [frozenset(c for c in t if not c.isalnum() and not c.isspace()) - PLAIN_PUNCT for t in v.text]
        # a capital inside the first run ("lEg"), or a capital first letter on a continuation: broken casing
        self.upper = np.array([any(c.isupper() for c in t[:1]) if sl else False
                               for t, sl in zip(v.text, self.starts_letter)])
        self.inner_upper = np.array([bool(f) and any(c.isupper() for c in r[1:len(f)])
                                     for f, r in zip(self.first, [t.lstrip() for t in v.text])])
        self.ends = np.array([bool(re.search(r"[.!?]", t)) for t in v.text])  # may end a sentence
        self.period = np.array([bool(re.fullmatch(r"[.!?]+[\"”’')]*", t)) for t in v.text])  # only ends one


_SCANS: dict[int, tuple[Any, _Scan]] = {}


def _scan(tokenizer: Any) -> _Scan:
    hit = _SCANS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _SCANS[id(tokenizer)] = (tokenizer, _Scan(tokenizer))
    return hit[1]


class WordGuard:
    """Bans for one source row (module docstring); ``fact`` (a ``FactGuard`` for the same row) is applied too."""

    def __init__(self, tokenizer: Any, source: str, coverage: float = 0.9, fact: FactGuard | None = None) -> None:
        self.scan = s = _scan(tokenizer)
        self.fact = fact
        self.words = allowed_words(source)
        self.prefixes = {w[:k] for w in self.words for k in range(1, len(w) + 1)}
        self.targets = content_targets(source)
        self.need = coverage * sum(weight(w) for w in self.targets)
        n = len(s.text)
        # multi-run tokens whose later runs are not allowed are banned in every state
        self._inner_bad = np.zeros(n, dtype=bool)
        for i, (closed, tail) in s.inner.items():
            if any(w not in self.words for w in closed) or (tail and tail not in self.prefixes):
                self._inner_bad[i] = True
        chars = set(source)
        self._inner_bad |= np.array([not sym <= chars for sym in s.symbols])  # "#", "*", "[" the source lacks
        self._inner_bad |= s.inner_upper
        self.sentences = max(1, sentence_ends(source))
        self.max_words = int(LENGTH_RATIO * len(_LETTERS.findall(source))) + 2
        self._masks: dict[tuple, np.ndarray] = {}
        self._tensors: dict[tuple, Any] = {}

    # -- state ---------------------------------------------------------------------------------------------------
    def state(self, generated_ids: Sequence[int]) -> tuple[str, str]:
        """(the word being written, or "" after a non-letter; the phase: "open" while the source is not covered,
        "free" once it is, "done" once the output has as many sentences as the source, "clitic" after an
        apostrophe)."""
        text = "".join(self.scan.text[t] for t in generated_ids if t < len(self.scan.text))
        m = re.search(r"(['’])?([^\W\d_]+)$", text)
        if m and m.group(1) and m.group(2).lower() in CLITICS:
            m = None  # "it's": the clitic is a whole word
        if sentence_ends(text) >= self.sentences:
            return ("", "done")
        if len(_LETTERS.findall(text)) >= self.max_words:
            return (m.group(2) if m else "", "long")
        if text.endswith(("'", "’")):
            return ("", "clitic")
        return (m.group(2) if m else "", "free" if self.covered(text) else "open")

    def covered(self, text: str) -> bool:
        have = words(text)
        exact, stems = set(have), {stem(w) for w in have}
        got = sum(weight(w) for w in self.targets if w in exact or stem(w) in stems)
        return got >= self.need - 1e-9

    # -- bans ----------------------------------------------------------------------------------------------------
    def bans_tensor(self, generated_ids: Sequence[int], device: Any = "cpu", vocab_size: int | None = None):
        import torch

        key = self.state(generated_ids)
        cache_key = (*key, f"{device}/{vocab_size}")
        if cache_key not in self._tensors:
            mask = self._mask(key)
            if self.fact is not None:
                fact = np.zeros_like(mask)
                fact[self.fact._ban_ids(self.fact.state(generated_ids))] = True
                mask = mask | fact
            mask = mask[:vocab_size] if vocab_size is not None else mask
            if mask.all():  # no allowed way on (a word both guards refuse to finish): end the row here
                mask = ~self.scan.stop[: len(mask)]
            ids = np.flatnonzero(mask)
            if self.fact is None:
                self._tensors[cache_key] = torch.from_numpy(ids).to(device)
            else:  # the fact guard's state is not part of the key: do not memoise the union
                return torch.from_numpy(ids).to(device)
        return self._tensors[cache_key]

    def bans(self, generated_ids: Sequence[int]) -> list[int]:
        return self.bans_tensor(generated_ids).tolist()

    def _mask(self, key: tuple[str, bool]) -> np.ndarray:
        if key not in self._masks:
            self._masks[key] = self._build(*key)
        return self._masks[key]

    def _build(self, cased: str, phase: str) -> np.ndarray:
        s = self.scan
        if phase == "done":  # as many sentences as the source: only the end of the output
            return ~s.stop
        partial = cased.lower()
        if phase == "long":  # longer than the source allows: finish the word, then end the sentence
            ok = s.stop | s.period
            if partial and partial not in self.words:
                ok = np.zeros_like(ok)
            for w in self.words if partial else ():  # a started word may go on to a whole allowed word
                rest = w[len(partial):] if w.startswith(partial) else ""
                for k in range(1, len(rest) + 1):
                    ok[s.index.get((rest[:k], True, False), [])] = True
                if rest:
                    ok[s.index.get((rest, True, True), [])] = True
            return ~(ok & ~self._inner_bad)
        words = self.words | CLITICS if phase == "clitic" else self.words
        ok = s.breaks & np.array([not f for f in s.first])  # non-letter tokens with no word in them
        # a token that breaks the current word and starts a new one (" said", ", and") or writes no word
        new_ok = np.zeros_like(ok)
        for w in self.prefixes:
            for closed in (False, True):
                if closed and w not in words:
                    continue
                new_ok[self.scan.index.get((w, False, closed), [])] = True
        ok = ok | new_ok
        if partial and partial not in self.words:
            ok[:] = False  # the word being written must go on: nothing may end it
        # a token that continues the current word (or, after a non-letter, starts one with no leading space)
        cont = np.zeros_like(ok)
        for w in words:
            if not w.startswith(partial):
                continue
            rest = w[len(partial):]
            for k in range(1, len(rest) + 1):
                cont[s.index.get((rest[:k], True, False), [])] = True  # the word stays open
            if rest:
                cont[s.index.get((rest, True, True), [])] = True  # the word ends inside the token
        if partial and not cased.isupper():
            cont &= ~s.upper  # "legit" + "Im": broken casing
        ok = ok | cont
        ok &= ~self._inner_bad
        if phase == "open":  # the source is not covered yet: the sentence may not end
            ok &= ~s.stop & ~s.ends
        return ~ok
