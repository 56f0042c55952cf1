"""The fact guard: token-level bans so decoding cannot invent a name or number (facts as ``text.py`` defines them).

**Guard** (``FactGuard`` / ``FactGuardProcessor``): token-level bans so decoding cannot invent a fact. A token
that would start a capitalised word or a digit run is banned unless its text is a prefix of a source word
(case-sensitive); while such a word is being written, a continuation token must keep it a prefix of a source
word. So "Ras"+"heed" is reachable but "Rassheed" and "El Pines" are not. The output's first word is exempt from
the capital rule (not from the digit rule). Punctuation, whitespace, newline and special (eos) tokens are never
banned, nor is a lower-case word (its continuations are free too). Guard words are letter runs and digit-initial
runs (which may hold letters, and "," or "." between digits: "1,200", "1990s"); a digit glued to letters starts a
new, guarded word. Source numbers are also allowed comma-free and with thousands commas, spelled-out numbers as
digits, table abbreviations in both forms. Words are checked as prefixes only, so a truncated source word ("Sen"
from "Senator") passes. Unlike the metric, the guard is case-sensitive and does not exempt later sentence starts."""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import LogitsProcessor

from paraphrase_ray.text import GUARD_WORD, source_words


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
            m = GUARD_WORD.match(content)
            if "\n" in text or "\r" in text or m is None:
                continue
            self.lead[i], self.head[i] = content != text, m.group()
            rest = GUARD_WORD.findall(content[m.end() :])
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
        self.words = sorted(source_words(source))
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
        words = list(GUARD_WORD.finditer(text))
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
