"""The base LM as a reader: how well does each side of a (source, output) row explain the other?

The word-level detector (``verdict.py``) sees which content words were kept, but not what a sentence *says*: the
speaker swapped, "will appeal" for "has appealed", a clause of source words that claims something new all keep the
words. The frozen LM reads the whole sentence. For a row (s, y) it scores, token by token, under the zero-shot
paraphrase instruction (the model's chat template where it has one, else ``{a}\\nParaphrase: {b}``):

- ``fwd[t] = log P(y_t | instruction(s), y_<t)``: is y what s's paraphrase would say;
- ``bwd[t] = log P(s_t | instruction(y), s_<t)``: can s be read back from y (what y dropped is not predictable);
- the same two with an empty sentence in the instruction (``fwd0``, ``bwd0``): what the LM expects of any
  sentence. ``fwd - fwd0`` is the pointwise mutual information each output token has with the source: a token the
  source does not explain (an added fact) scores near 0 or below; ``bwd - bwd0`` is the same for each source token
  given the output (a dropped fact scores near 0).

Scores are summed per word (a word is its tokens), and a row keeps the mean and the minimum over content words
(``text.is_content``) in each direction. Cost: 4 forward passes per row (the two empty-instruction passes are shared
by every candidate of one source), all batched; no sampling.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from paraphrase_ray.data import collate, encode_chat
from paraphrase_ray.generation.generate import ZERO_SHOT_INSTRUCTION
from paraphrase_ray.text import is_content

INSTRUCTION = ZERO_SHOT_INSTRUCTION.format(source="")  # the zero-shot-chat baseline's own instruction
PLAIN = "{a}\nParaphrase:"  # base models (no chat template): the seed's own prompt


@dataclass(frozen=True)
class RoundTrip:
    """Per-row likelihood features; log-probs in nats, per token means unless named ``_min``."""

    fwd: float  # mean log P(y_t | s, y_<t)
    bwd: float  # mean log P(s_t | y, s_<t)
    pmi_out: float  # mean over output tokens of fwd - fwd0: how much the source explains the output
    pmi_src: float  # mean over source tokens of bwd - bwd0: how much the output explains the source
    pmi_out_min: float  # the least-explained output content word (summed over its tokens); 0 when none
    pmi_src_min: float  # the least-explained source content word

    @property
    def score(self) -> float:
        """The rerank's score: ``fwd + bwd / 2``. Against 800 blind-labeled items (benchmarks/reader/lm_detect.py;
        docs/BENCHMARKS.md "Quality") ``fwd`` alone has ROC AUC 0.79 for the readers' ``acceptable`` and 0.77 for
        ``fluent``; ``bwd`` 0.83 for "nothing dropped" and 0.77 for "meaning kept"; this sum 0.76 / 0.81 / 0.76."""
        return self.fwd + 0.5 * self.bwd


def _context(tok, text: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        return encode_chat(tok, INSTRUCTION, text, "", 10_000)
    return tok(PLAIN.format(a=text), add_special_tokens=True)["input_ids"]


def _target(tok, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` as the answer (a leading space for plain prompts) and each token's word index
    (words: whitespace-separated runs, as ``_words`` splits them)."""
    shift = 0 if getattr(tok, "chat_template", None) else 1
    enc = tok(" " * shift + text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    word_of = []
    for a, b in enc["offset_mapping"]:
        a = max(a - shift, 0)
        while a < len(text) - 1 and text[a].isspace() and a < b - shift:  # BPE tokens carry their leading space
            a += 1
        word_of.append(max(bisect.bisect_right(starts, a) - 1, 0))
    return list(enc["input_ids"]), word_of


@torch.inference_mode()
def token_logprobs(model, pad_id: int, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> list[np.ndarray]:
    """log P(target_t | context, target_<t) for each (context ids, target ids) pair; right-padded batches sorted by
    length so padding stays small. Returns one float array per pair, in input order."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[np.ndarray | None] = [None] * len(pairs)
    dev = next(model.parameters()).device
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        batch = collate([(s, []) for s in seqs], pad_id)  # right-padded, as training batches are
        ids, mask = batch.input_ids, batch.attention_mask
        # logits only where a target token is predicted (as training computes them): the vocabulary projection
        # at every position would cost more than the whole body on a 49k-262k vocabulary
        hidden = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state  # (b, w, h)
        pos = [torch.arange(len(pairs[i][0]) - 1, len(seqs[r]) - 1) for r, i in enumerate(idx)]
        rows = torch.cat([torch.full((len(p),), r) for r, p in enumerate(pos)])
        cols = torch.cat(pos)
        logp = torch.log_softmax(model.get_output_embeddings()(hidden[rows, cols]).float(), dim=-1)  # (n, vocab)
        tgt = torch.tensor([t for i in idx for t in pairs[i][1]], device=logp.device)
        got = logp[torch.arange(len(tgt)), tgt].cpu().numpy()
        k0 = 0
        for i in idx:
            out[i] = got[k0 : k0 + len(pairs[i][1])]
            k0 += len(pairs[i][1])
    return out  # type: ignore[return-value]


def _words(text: str) -> list[str]:
    return text.split()


def _per_word(values: np.ndarray, word_of: list[int], n_words: int) -> np.ndarray:
    sums = np.zeros(max(n_words, 1))
    for v, w in zip(values, word_of):
        if 0 <= w < n_words:
            sums[w] += v
    return sums


def _content_min(gain: np.ndarray, word_of: list[int], text: str) -> float:
    ws = _words(text)
    per = _per_word(gain, word_of, len(ws))
    vals = [per[i] for i, w in enumerate(ws) if is_content("".join(ch for ch in w.lower() if ch.isalnum()))]
    return float(min(vals)) if vals else 0.0


def round_trips(
    loaded, sources: Sequence[str], outputs: Sequence[str], batch_size: int = 16, pmi: bool = True
) -> list[RoundTrip]:
    """One ``RoundTrip`` per (source, output) row (``loaded``: a ``models.LoadedModel``). ``pmi=False`` skips the
    empty-instruction passes (the ``pmi_*`` fields are then NaN): 2 passes per row instead of up to 4, all that
    ``RoundTrip.score`` needs."""
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    empty = _context(tok, "")
    ctx = {t: _context(tok, t) for t in {*sources, *outputs}}
    tgt = {t: _target(tok, t) for t in {*sources, *outputs}}
    jobs: list[tuple[list[int], list[int]]] = []
    for s, y in zip(sources, outputs, strict=True):
        jobs += [(ctx[s], tgt[y][0]), (ctx[y], tgt[s][0])]
    uniq = sorted({*sources, *outputs}) if pmi else []
    jobs0 = [(empty, tgt[t][0]) for t in uniq]
    lp = token_logprobs(model, pad, jobs + jobs0, batch_size)
    prior = dict(zip(uniq, lp[len(jobs):]))
    rows = []
    for r, (s, y) in enumerate(zip(sources, outputs)):
        fwd, bwd = lp[2 * r], lp[2 * r + 1]
        if not pmi:
            rows.append(RoundTrip(fwd=float(fwd.mean()) if len(fwd) else 0.0,
                                  bwd=float(bwd.mean()) if len(bwd) else 0.0, pmi_out=math.nan, pmi_src=math.nan,
                                  pmi_out_min=math.nan, pmi_src_min=math.nan))
            continue
        g_out, g_src = fwd - prior[y], bwd - prior[s]
        rows.append(RoundTrip(
            fwd=float(fwd.mean()) if len(fwd) else 0.0,
            bwd=float(bwd.mean()) if len(bwd) else 0.0,
            pmi_out=float(g_out.mean()) if len(g_out) else 0.0,
            pmi_src=float(g_src.mean()) if len(g_src) else 0.0,
            pmi_out_min=_content_min(g_out, tgt[y][1], y),
            pmi_src_min=_content_min(g_src, tgt[s][1], s),
        ))
    return rows


def rerank_roundtrip(loaded, sources: Sequence[str], candidates: Sequence[Sequence[str]], scores: Sequence[Sequence]):
    """``generation.rerank: roundtrip``: each source's candidates (already scored by ``metrics.rerank``) reordered
    best first: usable (not a copy, not empty), then faithful (``text.check``), then no broken word, as the
    detector's rerank orders them, and within a tier by ``RoundTrip.score`` instead of the word-level verdict and
    novelty. Returns (candidates, scores), each row in the new order; costs 2 forward passes per candidate."""
    flat = round_trips(loaded, [s for s, c in zip(sources, candidates, strict=True) for _ in c],
                       [x for c in candidates for x in c], pmi=False)
    out_c, out_s, i = [], [], 0
    for cands, row in zip(candidates, scores, strict=True):
        trips = flat[i : i + len(cands)]
        i += len(cands)
        order = sorted(range(len(cands)), key=lambda j: (row[j].copy or row[j].empty, not row[j].faithful,
                                                         bool(row[j].garbled), -trips[j].score))
        out_c.append([cands[j] for j in order])
        out_s.append([row[j] for j in order])
    return out_c, out_s
