"""Decode steps through a static KV cache, replayed as CUDA graphs captured once per (rows, capacity) bucket.

Why: on a GPU, a 125M-1.3B model's decode step is launch-bound. One step of OPT-125m is ~300 small kernels
whose launches (Python + dispatcher + driver, ~5-10 us each) cost more than their math at batch <= 64. A CUDA
graph replays the whole step's kernels with one launch. Graphs need fixed shapes and fixed addresses, so:

- the KV cache is Hugging Face's ``StaticCache``: per-layer (rows, heads, capacity, head_dim) buffers written
  in place at a device-side position counter (no host sync, no reallocation);
- the step's inputs live in fixed buffers: token ids (R, 1), position ids (R, 1), ``cache_position`` (1,) and a
  2D attention mask (R, capacity); the batch is padded up to a power-of-two row bucket R (dummy rows attend to
  real slots and are never read) and the capacity is rounded up to a multiple of 64;
- one graph per (R, capacity), captured on first use and kept (LRU, ``MAX_BUCKETS``).

The prefill stays the plain forward (any length, prefix cache, k candidates): ``decode.decode`` asks
``graph_engine(model, rules.graphs)`` for the model's engine, and ``start`` copies its prefilled
``DynamicCache`` into the bucket's static cache; ``step`` then writes the new token's inputs into the buffers and
replays. Every captured graph is checked once against the same step run eagerly; a graph that fails to capture
or disagrees is dropped for that model and its steps run eagerly through the same static cache (same tokens,
no speed-up), with a warning.

``mode="eager"`` runs the identical static-cache step without capturing, on any device: the CPU tests use it to
check tokens against the plain loop (tests/generation/test_cuda_graphs.py). Capture itself needs CUDA.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections import OrderedDict

import torch
from torch import nn

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.models import cache_kwarg, sliding_window

log = logging.getLogger(__name__)

CAP_ROUND = 64  # capacity buckets: multiples of this many positions
MAX_BUCKETS = 4  # graphs (with their static caches) kept per model
# A bucket's static KV cache: OPT-1.3b at 128 rows x 256 positions is 6.4 GB. Larger batches take the plain
# forward (their steps are not launch-bound anyway); the buckets kept stay under the total.
MAX_BUCKET_BYTES = 8 << 30
MAX_TOTAL_BYTES = 16 << 30
# model -> {capture: engine}. Engines and buckets hold the model weakly, so an entry (with its static caches)
# goes when the model does.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def row_bucket(n: int) -> int:
    """The power of two >= n: graphs for 1, 2, 4, ... rows."""
    return 1 << max(0, (n - 1).bit_length())


def applies(model: nn.Module) -> bool:
    """A Hugging Face causal LM whose forward takes a static cache (``_can_compile_fullgraph``)."""
    return bool(getattr(model, "_can_compile_fullgraph", False)) and hasattr(model, "config")


def graph_engine(model: nn.Module, mode: str = "auto") -> GraphEngine | None:
    """The model's engine, or None where it does not apply. ``mode``: ``auto`` (CUDA graphs on a CUDA model,
    None elsewhere), ``eager`` (the static-cache step without capture, any device), ``off`` (None)."""
    if mode == "off" or not applies(model):
        return None
    if mode not in ("auto", "eager"):
        raise ConfigError(f"graph mode must be auto, eager or off, got {mode!r}")
    capture = mode == "auto"
    if capture and next(model.parameters()).device.type != "cuda":
        return None
    with _LOCK:
        per_model = _ENGINES.setdefault(model, {})
        if capture not in per_model:
            per_model[capture] = GraphEngine(model, capture)
        engine = per_model[capture]
    return None if engine.unsupported else engine


class GraphEngine:
    """Static-cache buckets of one model; ``start`` picks (and on first use builds) the bucket for a batch."""

    def __init__(self, model: nn.Module, capture: bool):
        self._model, self.capture = weakref.ref(model), capture
        self.buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self.disabled = ""  # why graphs were given up for this model (then steps run eagerly)
        self._lock = threading.Lock()  # a bucket serves one decode at a time (threads may share the model)
        # why no static cache fits this model: plain forward. Sliding-window layers (Gemma 3): HF's static
        # sliding layers roll their buffer on a host-side counter, which a replayed graph cannot follow
        window = sliding_window(model)
        self.unsupported = f"sliding-window attention (window {window})" if window else ""

    def start(self, cache, attn: torch.Tensor | None, extra: int) -> _Bucket | None:
        """Copy a prefilled Hugging Face cache (B rows, n positions; ``attn`` (B, n) or None: all valid) into the
        static cache of the bucket that fits B rows and n + ``extra`` positions; returns that bucket, ready to
        step, or None when its cache would exceed ``MAX_BUCKET_BYTES`` or another decode is using it (the caller
        then uses the plain forward). The caller hands it back with ``release()`` when its decode ends."""
        rows, n = cache.layers[0].keys.shape[0], cache.get_seq_length()  # keys (B, H_kv, n, D)
        need = -(-(n + extra) // CAP_ROUND) * CAP_ROUND
        r = row_bucket(rows)
        with self._lock:
            # a free bucket with these rows and room enough (up to twice the need) saves a capture
            fits = [
                k for k, b in self.buckets.items() if k[0] == r and need <= k[1] <= 2 * need and not b.busy
            ]
            key = min(fits, key=lambda k: k[1]) if fits else (r, need)
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self._new_bucket(cache, r, need)
                if bucket is None:
                    return None
            elif bucket.busy:
                return None
            self.buckets.move_to_end(key)
            bucket.busy = True
        try:
            bucket.adopt(cache, attn, rows, n)
        except Exception:
            bucket.busy = False
            raise
        return bucket

    def _new_bucket(self, cache, rows: int, cap: int) -> _Bucket | None:
        """Build (and capture) a bucket, making room by evicting free ones; None when it cannot be had."""
        size = cache_bytes(cache, rows, cap)
        if size > MAX_BUCKET_BYTES:
            return None
        for k in [k for k, b in self.buckets.items() if not b.busy]:  # least recently used first
            if len(self.buckets) < MAX_BUCKETS and self.bytes() + size <= MAX_TOTAL_BYTES:
                break
            del self.buckets[k]  # its graph and static cache are freed with it
        if len(self.buckets) >= MAX_BUCKETS or self.bytes() + size > MAX_TOTAL_BYTES:
            return None  # the rest are in use by other decodes
        try:
            bucket = _Bucket(self._model(), cache, rows, cap)
        except _Unsupported as e:
            self.unsupported = str(e)
            log.info("no static-cache decode for this model: %s", e)
            return None
        except torch.OutOfMemoryError:
            return None  # the plain forward needs less
        if self.capture and not self.disabled:
            self.disabled = bucket.capture()
            if self.disabled:
                log.warning("CUDA graphs off for this model, decoding eagerly: %s", self.disabled)
        self.buckets[(rows, cap)] = bucket
        return bucket

    def bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets.values())


def cache_bytes(like, rows: int, cap: int) -> int:
    """Bytes of a static cache of ``rows`` x ``cap`` positions shaped like the HF cache ``like``."""
    return sum(
        rows * cap * (t.shape[1] * t.shape[3]) * t.element_size()
        for layer in like.layers
        for t in (layer.keys, layer.values)
    )


class _Unsupported(Exception):
    pass


class _Bucket:
    """One (R rows, capacity) static cache, its input buffers and (once captured) its CUDA graph."""

    def __init__(self, model: nn.Module, like, rows: int, cap: int):
        from transformers import StaticCache

        self._model, self.rows, self.cap = weakref.ref(model), rows, cap
        dev = like.layers[0].keys.device
        self.cache = StaticCache(config=model.config, max_cache_len=cap)
        kinds = {type(layer).__name__ for layer in self.cache.layers}
        if kinds != {"StaticLayer"}:  # sliding-window layers roll their buffer on a host-side counter
            raise _Unsupported(f"cache layers {sorted(kinds)}: only full-attention StaticLayer is supported")
        for layer, src in zip(self.cache.layers, like.layers, strict=True):  # allocate (R, H, cap, D) buffers
            k, v = src.keys, src.values
            layer.lazy_initialization(k.new_empty(rows, *k.shape[1:]), v.new_empty(rows, *v.shape[1:]))
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.cpos = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(rows, cap, dtype=torch.long, device=dev)
        params = inspect.signature(model.forward).parameters
        self.pass_pos = "position_ids" in params
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # (R, 1, V): the captured step's logits (static address)
        self.used, self.length = 0, 0  # real rows; positions held
        self.nbytes = cache_bytes(like, rows, cap)
        self.busy = False  # adopted by a decode that has not released it yet

    def _forward(self) -> torch.Tensor:
        kw = dict(self.keep, position_ids=self.pos) if self.pass_pos else dict(self.keep)
        model = self._model()  # alive: a decode on this bucket holds it
        kw[cache_kwarg(model)] = self.cache
        res = model(
            input_ids=self.ids, attention_mask=self.mask, cache_position=self.cpos, use_cache=True, **kw
        )
        return res.logits  # (R, 1, V)

    def _set_length(self, n: int) -> None:
        for layer in self.cache.layers:  # the device-side write position of every layer
            layer.cumulative_length.fill_(n)

    def _inputs(self, t: int) -> None:
        """Test inputs for slot t (capture check): token t + 1 in every row, every slot up to t valid."""
        self.ids.fill_(t + 1), self.pos.fill_(t), self.cpos.fill_(t)
        self.mask.zero_()
        self.mask[:, : t + 1] = 1

    def capture(self) -> str:
        """Capture the step as a CUDA graph; '' when it worked and agrees with the eager step, else the reason.

        The check runs two steps (slots 0 and 1) eagerly, then replays the graph over the same two: a value the
        capture had baked in instead of reading from the buffers would show at the second slot."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():  # warm-up (cuBLAS handles, allocator) + references
                for _ in range(2):
                    self._set_length(0)
                    eager = []
                    for t in (0, 1):
                        self._inputs(t)
                        eager.append(self._forward().float().clone())
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self._inputs(0)
            self._set_length(0)
            # thread_local: another thread's CUDA work (Serve's rerank thread) cannot invalidate this capture
            with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._forward()
            self._set_length(0)
            for t in (0, 1):
                self._inputs(t)
                graph.replay()
                ref = eager[t]
                err = (out.float() - ref).abs().max().item()
                if not err <= 1e-2 * max(1.0, ref.abs().max().item()):
                    return f"the captured step's logits differ from the eager step's by {err:.3g} at slot {t}"
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        self.graph, self.out = graph, out
        return ""

    def adopt(self, cache, attn: torch.Tensor | None, rows: int, n: int) -> None:
        for layer, src in zip(self.cache.layers, cache.layers, strict=True):
            layer.keys[:rows, :, :n].copy_(src.keys)
            layer.values[:rows, :, :n].copy_(src.values)
        self._set_length(n)
        self.mask.zero_()
        self.mask[:rows, :n] = attn if attn is not None else 1
        self.mask[rows:, :n] = 1  # dummy rows: attend somewhere real; their logits are never read
        self.ids.zero_(), self.pos.zero_()
        self.used, self.length = rows, n

    def get_seq_length(self) -> int:
        return self.length

    def release(self) -> None:
        """The decode using this bucket is over: the next one may adopt it."""
        self.busy = False

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for one new token per row: ``ids``, ``pos`` (B, 1); ``attn`` (B, length + 1) or None."""
        b, t = self.used, self.length
        if t >= self.cap:
            raise RuntimeError(f"static cache full: {self.cap} positions")
        self.ids[:b].copy_(ids)
        self.pos[:b].copy_(pos)
        if attn is not None:
            self.mask[:b, : t + 1].copy_(attn)
        else:
            self.mask[:b, t] = 1
        self.mask[b:, t] = 1
        self.cpos.fill_(t)
        if self.graph is not None:
            self.graph.replay()  # writes the KV at slot t and bumps every layer's position, as the eager step does
            out = self.out
        else:
            out = self._forward()
        self.length = t + 1
        return out[:b, -1]
