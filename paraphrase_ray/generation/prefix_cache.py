"""Prefix KV cache: the soft prompt and the template's head are computed once, not once per row.

Every row built from one prompt and one template starts with the same positions: ``[soft prompt][template head]``
(for the chat template, the system turn and the user turn's instruction: ~65 of a ~90-token input). A causal
model's keys and values at a position depend only on the positions up to it, so those of a shared prefix are the
same for every row; ``generation.prefix_cache`` (on by default) computes them once per (model, prompt values,
head ids), keeps them (a small LRU per model), and each generation call prefills only the rest of its rows on a
copy (``decode.decode`` / ``lookup.lookup_decode`` ``past=``). Same keys and values, so the same tokens up to float
summation order (tests/generation/test_prefix_cache.py); the prefill is where batch-1 generation spent ~30% of its time.

Rows left-padded *after* the prefix (``[prefix][pad][rest]``) keep the positions HF gives ``[pad][prefix][rest]``
(positions are the attention mask's cumulative sum), so a batch shares one prefix too -- except where a sliding
attention window (Gemma 3) could cut such a batch: it counts cache slots, pads included (``shared_prefix``).
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_ENTRIES = 8  # per model: Serve hosts several prompts on one base model (~3 MB each for the 135M)
MIN_PREFIX = 4  # positions; below this a cached prefix saves less than the copy costs

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> (cache, length))
_LOCK = threading.Lock()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def head_of(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The ids every row of one template starts with, from two encodings that differ only in the source."""
    return tuple(a[: common_prefix(a, b)])


def prompt_key(prompt) -> str | None:
    """Content hash of a soft prompt's values (a trained prompt changes between evaluations: never stale)."""
    if prompt is None:
        return None
    w = prompt.weight.detach().to("cpu", torch.float32).contiguous()  # numpy has no bf16
    return f"{tuple(w.shape)}:{w.dtype}:{hashlib.blake2b(w.numpy().tobytes(), digest_size=16).hexdigest()}"


def shared_prefix(rows, window: int | None = None) -> int:
    """How many leading ids every row shares with its template head (0: no shared prefix worth caching).

    Rows must carry the same prompt values and the same head; every row keeps at least one id after it (the
    prefill of the rest must produce a last position). ``window``: the model's sliding attention window
    (``models.sliding_window``). A window counts cache slots, and ``[prefix][pad][rest]`` puts a row's pads
    between its prefix and its rest where HF's ``[pad][prefix][rest]`` does not, so rows of different lengths
    that could outgrow the window would see different keys: no shared prefix then (rows of one length, or
    rows that fit the window, get exactly HF's keys)."""
    if not rows or any(r.head is None for r in rows):
        return 0
    if window is not None and len({len(r.ids) for r in rows}) > 1:
        n_prompt = rows[0].prompt.n_tokens if rows[0].prompt is not None else 0
        if n_prompt + max(len(r.ids) for r in rows) + max(r.max_new_tokens for r in rows) > window:
            return 0
    head = rows[0].head
    if any(r.head != head for r in rows):
        return 0
    n = min(common_prefix(r.ids, head) for r in rows)
    n = min(n, min(len(r.ids) for r in rows) - 1)
    key = prompt_key(rows[0].prompt)
    if any(r.prompt is not rows[0].prompt and prompt_key(r.prompt) != key for r in rows[1:]):
        return 0
    n_prompt = rows[0].prompt.n_tokens if rows[0].prompt is not None else 0
    return n if n + n_prompt >= MIN_PREFIX else 0


@torch.no_grad()
def prefix_kv(model: torch.nn.Module, embed: torch.nn.Module, prompt, ids: Sequence[int], batch: int, cache_key: str):
    """(cache for ``batch`` rows, length): the keys and values of ``[prompt][ids]``, from the LRU or computed.

    The caller owns the returned cache (a deep copy; decoding grows and crops it)."""
    key = (prompt_key(prompt), tuple(ids))
    with _LOCK:
        entries = _CACHES.setdefault(model, OrderedDict())
        hit = entries.get(key)
        if hit is None:
            dev = embed.weight.device
            x = embed(torch.tensor(list(ids), device=dev))  # (n_ids, d_embed)
            if prompt is not None:
                x = torch.cat([prompt.weight.to(device=dev, dtype=x.dtype), x], dim=0)  # (P + n_ids, d_embed)
            res = model(inputs_embeds=x[None], use_cache=True, **_keep_one(model))
            hit = (res.get(cache_key), x.shape[0])
            entries[key] = hit
            while len(entries) > MAX_ENTRIES:
                entries.popitem(last=False)
        entries.move_to_end(key)
        cache = copy.deepcopy(hit[0])
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache, hit[1]


def _keep_one(model) -> dict:
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def clear() -> None:
    with _LOCK:
        _CACHES.clear()
