"""What a text says, with no model: its facts (numbers and names) and whether an output keeps them, and the
plain-text measures beside them (copy, empty, sentence BLEU). Torch-free; data cleaning, the decoding guard
(``generation/fact_guard.py``) and the metrics (``evaluation/metrics.py``) all build on it.

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

The decoding guard (``generation/fact_guard.py``) keys on the same facts: ``source_words`` is what it lets
an output write.
"""


from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from paraphrase_ray.errors import InputError

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
    if i > 0
}
NUMBER_WORDS.update({w: str(10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
NUMBER_WORDS["hundred"] = "100"
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
GUARD_WORD = re.compile(r"\d[^\W_]*(?:[.,]\d[^\W_]*)*|[^\W\d_]+")


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
    src_spelled = {NUMBER_WORDS[k] for k in src_keys if k in NUMBER_WORDS}
    out_numbers = {k for kind, _, k, _ in out if kind == "num"}
    out_numbers |= {NUMBER_WORDS[k] for kind, _, k, _ in out if kind == "word" and k in NUMBER_WORDS}
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


def source_words(source: str) -> set[str]:
    """Every word the guard lets the output write (by prefix): the source's guard words and their variants."""
    words = set(GUARD_WORD.findall(source))
    for kind, surface, key, _ in _scan(source):
        if kind == "num":
            words.add(key)  # "1,200" / "1 200" -> "1200"
            whole, _, frac = key.partition(".")
            if whole.isdigit():
                words.add(f"{int(whole):,}" + (f".{frac}" if frac else ""))  # "1200" -> "1,200"
        elif key in NUMBER_WORDS:
            words.add(NUMBER_WORDS[key])
        elif key in _SHORT_FORMS:
            forms = [long for long, short in _ABBREVIATIONS.items() if short == key] + [key]
            for form in forms:  # in the source's capitalisation: "Sen" -> "Senator", "SEN"
                cased = form.upper() if surface.isupper() and len(surface) > 1 else form
                words.add(cased[0].upper() + cased[1:] if surface[0].isupper() else cased)
    return words


# --------------------------------------------------------------------------------------------- plain-text measures

_FINAL_PUNCT = ".!?;:,…。\"'”’)]"
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-, space- and final-punctuation-insensitive form used for copy detection."""
    text = unicodedata.normalize("NFKC", text).casefold().strip().rstrip(_FINAL_PUNCT + " ")
    # Drop all whitespace, so "word ," and "word," (tokenizer detokenisation quirks) compare equal.
    return _SPACE.sub("", text)


def is_empty(prediction: str) -> bool:
    return not any(ch.isalnum() for ch in prediction)


def is_copy(source: str, prediction: str) -> bool:
    return not is_empty(prediction) and normalize(source) == normalize(prediction)


@functools.cache
def _bleu():
    """sacrebleu's BLEU, built on first use (its import costs ~0.3 s); stateless after construction, so one is
    shared across threads."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU in [0, 100] (13a, case-sensitive, exp smoothing, effective order)."""
    if not hypothesis.strip():
        return 0.0
    # Clamp: sacrebleu returns 100.00000000000004 for identical strings.
    return min(100.0, max(0.0, float(_bleu().sentence_score(hypothesis, [reference]).score)))


# ------------------------------------------------------------------------------ content words (wordfreq-weighted)
# What the reader's-verdict detector (evaluation/verdict.py) compares and the word guard (generation/word_guard.py)
# restricts: lower-cased letter/digit runs; function words are English's most frequent ones.
FUNCTION_ZIPF = 6.2  # "said" (6.0) and "told" (5.5) stay content words: dropping the attribution matters
NEGATIONS = frozenset({"not", "no", "never", "nor", "none", "nothing", "without", "cannot", "t"})  # "don't" -> t
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")


@functools.lru_cache(maxsize=200_000)
def zipf(word: str) -> float:
    from wordfreq import zipf_frequency  # its word lists load on first use (~0.5 s)

    return zipf_frequency(word, "en")


def words(text: str) -> list[str]:
    """Lower-cased words, possessives dropped ("Bush's" -> "bush"), number words as digits ("two" -> "2": numbers
    are the fact check's, ``text.check``, which also lets "two" and "2" match)."""
    out = []
    for w in WORD.findall(text):
        w = w.lower().replace("’", "'")
        w = w[:-2] if w.endswith("'s") else w
        out.append(NUMBER_WORDS.get(w, w))
    return out


def is_content(word: str) -> bool:
    return word in NEGATIONS or (not word.isdigit() and zipf(word) < FUNCTION_ZIPF)


def weight(word: str) -> float:
    return max(1.0, 8.0 - zipf(word))


def stem(word: str) -> str:
    """A crude English stem, enough to match inflections: "premiums" = "premium", "appealed" = "appeal"."""
    for suffix in ("ingly", "edly", "ies", "ing", "ied", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word
