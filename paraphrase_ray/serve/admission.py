"""What a model replica lets in, in work units, and how it stops the work of a request that timed out (no Ray).

A **work unit** is one token of one sequence through the model: a row costs its input tokens (soft prompt +
template + source, the prefill) plus its sequences (candidates, or beams) x its max new tokens (the decode).
Texts are a poor measure of work: one text with 8 candidates and 128 new tokens costs as much as 64 short
greedy ones. Two limits, both in ``ServeSettings``:

    max_request_work   one request's work; over it: 413 naming what to send less of (texts, candidates, tokens)
    max_queued_work    work admitted and not yet answered, per replica; over it: 503 with Retry-After

Rows that share decoding options share a forward pass; a request whose options match nothing queued (another
temperature, top_p, beams...) needs a pass of its own, which costs about ``PASS_OVERHEAD_ROWS`` rows' worth of
steps beyond its own rows, and is charged that in the queue.

    admission = Admission(settings)
    ticket = admission.admit(items)          # 413 / 503 before the batch queue
    ...                                     # ticket.cancel() when the request times out: its rows stop
    admission.release(ticket)
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

from paraphrase_ray.errors import GenerationStopped
from paraphrase_ray.serve.policy import Item
from paraphrase_ray.serve.protocol import ServeSettings

PASS_OVERHEAD_ROWS = 8  # a pass of one row costs about this many rows' steps of a full batch (per-step overhead)
MAX_RETRY_AFTER_S = 60.0


def busy(detail: str, retry_after_s: float) -> HTTPException:
    """503 with ``Retry-After`` (whole seconds, at least 1)."""
    return HTTPException(503, detail, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


@dataclass
class Ticket:
    """One admitted request: what it holds of the budgets, and its cancel flag (read by its rows)."""

    rows: int
    work: int
    key: Any = None  # its rows' batch key (GenerationConfig)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def request_work(items: Sequence[Item]) -> dict[str, int]:
    """The work of one request's rows, in parts: ``input`` (prefill tokens), ``decode`` (sequences x new tokens)."""
    prefill = sum(it.input_tokens for it in items)
    return {"input": prefill, "decode": sum(it.work for it in items) - prefill}


def too_much_work(items: Sequence[Item], cap: int) -> str | None:
    """Why one request is over ``max_request_work`` (which part to shrink), or None."""
    parts = request_work(items)
    total = parts["input"] + parts["decode"]
    if total <= cap:
        return None
    first = items[0]
    return (
        f"request needs {total} work units, over the per-request limit of {cap} (max_request_work): "
        f"{len(items)} texts x {first.cost} candidates/beams x up to {max(it.row.max_new_tokens for it in items)} "
        f"new tokens = {parts['decode']} decode units, plus {parts['input']} input tokens; send fewer texts, "
        "fewer candidates or a lower max_new_tokens (GET /prompts lists the limits)"
    )


class Admission:
    """The replica's budgets: texts (``max_queued_rows``) and work (``max_queued_work``) admitted, not answered.

    Used from the replica's event loop only (``admit`` / ``release``); ``finished`` from the generation thread
    updates only the throughput estimate behind Retry-After."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.rows = 0
        self.work = 0
        self.keys: Counter = Counter()  # batch keys of the admitted requests
        self.work_per_s = 0.0  # recent generation throughput, for Retry-After

    def admit(self, items: Sequence[Item]) -> Ticket:
        s = self.settings
        why = too_much_work(items, s.max_request_work)
        if why:
            raise HTTPException(413, why)
        key = items[0].gen
        work = sum(it.work for it in items)
        charged = work if self.keys[key] else work + PASS_OVERHEAD_ROWS * max(it.row.max_new_tokens for it in items)
        if self.rows + len(items) > s.max_queued_rows:
            raise busy(
                f"server busy: {self.rows} texts queued, {len(items)} more would pass the limit of "
                f"{s.max_queued_rows}; retry after the Retry-After seconds",
                self.retry_after(),
            )
        if self.work and self.work + charged > s.max_queued_work:  # an empty queue admits any request under the cap
            raise busy(
                f"server busy: {self.work} work units queued, this request's {charged} would pass the limit of "
                f"{s.max_queued_work} (max_queued_work); retry after the Retry-After seconds",
                self.retry_after(),
            )
        self.rows += len(items)
        self.work += charged
        self.keys[key] += 1
        return Ticket(len(items), charged, key)

    def release(self, ticket: Ticket) -> None:
        self.rows -= ticket.rows
        self.work -= ticket.work
        self.keys[ticket.key] -= 1
        if self.keys[ticket.key] <= 0:
            del self.keys[ticket.key]

    def finished(self, items: Sequence[Item], seconds: float) -> None:
        """A batch took ``seconds``: the throughput estimate (a moving average of work per second)."""
        rate = sum(it.work for it in items) / max(seconds, 1e-3)
        self.work_per_s = rate if not self.work_per_s else 0.7 * self.work_per_s + 0.3 * rate

    def retry_after(self) -> float:
        return min(self.work / self.work_per_s, MAX_RETRY_AFTER_S) if self.work_per_s else 1.0

    def summary(self) -> dict[str, Any]:
        return {"queued_work": self.work, "work_per_s": round(self.work_per_s, 1)}


class StopHook:
    """Stops a forward pass at its next model call: a pre-hook on the input embeddings, which every decode step
    calls (our loop, prompt lookup, the low-bit Llama step, HF ``generate``), raises ``GenerationStopped`` while the
    generation thread's ``watch`` check is true. Rows of our loop also stop one by one (``decode``'s
    ``should_stop``); this covers the paths that take a batch whole."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._hooked: set[int] = set()

    def install(self, *modules: Any) -> None:
        for m in modules:
            if id(m) not in self._hooked:
                m.register_forward_pre_hook(self._pre_hook)
                self._hooked.add(id(m))

    def install_on(self, loaded: Any, methods: Sequence[str]) -> None:
        """On the input embeddings of every model copy generation may run (``lowbit.generation_model``)."""
        from paraphrase_ray.generation.backends.lowbit import generation_model

        copies = [generation_model(loaded, m)[0] for m in sorted(set(methods))]
        self.install(loaded.model.get_input_embeddings(), *(c.get_input_embeddings() for c in copies))

    def watch(self, check: Callable[[], bool] | None) -> None:
        """In the generation thread: stop passes once ``check()`` is true (None: stop watching)."""
        self._local.check = check

    def _pre_hook(self, module: Any, args: Any) -> None:
        check = getattr(self._local, "check", None)
        if check is not None and check():
            raise GenerationStopped("every row of this pass stopped")
