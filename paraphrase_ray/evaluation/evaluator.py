"""The shared Evaluator: one Ray actor holding one sentence-transformers model that many trials call.

Loading the embedder takes seconds and hundreds of MB per process; a sweep of many trials shares one copy.
The actor is an asyncio actor: each request is validated, queued, and a single batching loop merges every
request that arrives while the previous batch is being encoded (plus a few ms of waiting) into one
``metrics.score_rows`` call, so concurrent trials cost one encode call, not one each. Encoding runs in a
worker thread so the event loop keeps accepting (and batching) requests meanwhile.

    handle = get_evaluator()                    # named, get-if-exists: every caller gets the same actor
    client = EvaluatorClient()                  # validates locally, re-creates a dead actor, retries once
    client.score(sources, references, predictions)  # -> metrics.summarize() dict

Ownership: a named actor that is not detached dies with the process that created it, and also when its last
handle goes (``get_if_exists`` does not keep it alive). So the Tune driver creates it before trials start and
holds its handle for the whole sweep (trials only look it up); if it dies anyway, the client re-creates it. ``lifetime="detached"`` outlives the
driver: call ``shutdown_evaluator`` when done. This is the only module of the scoring path that imports Ray.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER, EmbeddingCache, load_embedder
from paraphrase_ray.evaluation.metrics import RowScore, score_rows, summarize, validate_triples

DEFAULT_NAME = "paraphrase-ray-evaluator"
DEFAULT_NAMESPACE = "paraphrase-ray"

_Request = tuple[list[str], list[str | None] | None, list[str], "asyncio.Future[list[RowScore]]"]


@ray.remote
class Evaluator:
    """Ray actor: scores (source, reference, prediction) batches with one embedder, batching requests.

    Create or look it up with ``get_evaluator`` (named, get-if-exists); call it through ``EvaluatorClient``.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        batch_wait_s: float = 0.005,
        max_batch_rows: int = 512,
        encode_batch_size: int = 64,
        cache_items: int = 20_000,
    ) -> None:
        import torch

        # GPU only when Ray gave this actor one: Ray narrows CUDA_VISIBLE_DEVICES to it, so "cuda" is that card.
        # A CPU-only test cluster started with ray.init(num_gpus=1) hands out GPU ids too: check CUDA exists.
        self._device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self._model = model
        self._embedder = load_embedder(model, device=self._device)
        self._batch_wait_s = batch_wait_s
        self._max_batch_rows = max_batch_rows
        self._encode_batch_size = encode_batch_size
        # Trials score the same held-out sources and references at every evaluation: embed them once.
        self._cache = EmbeddingCache(cache_items) if cache_items > 0 else None
        self._queue: asyncio.Queue[_Request] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._pending: _Request | None = None  # first request of the next batch (did not fit the last one)
        # One thread: batches are encoded one at a time; the event loop stays free to gather the next batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluator-encode")
        self._stats = {"requests": 0, "rows": 0, "batches": 0, "max_batch_requests": 0}

    async def score_rows(
        self,
        sources: Sequence[str],
        references: Sequence[str | None] | None,
        predictions: Sequence[str],
    ) -> list[RowScore]:
        """Per-row scores (see ``metrics.score_rows``). Bad input raises ValueError; the actor stays up."""
        validate_triples(sources, references, predictions)
        if self._queue is None:  # created lazily: the actor's event loop only exists once a call runs
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        fut: asyncio.Future[list[RowScore]] = asyncio.get_running_loop().create_future()
        refs = list(references) if references is not None else None
        self._queue.put_nowait((list(sources), refs, list(predictions), fut))
        return await fut

    async def score(
        self,
        sources: Sequence[str],
        references: Sequence[str | None] | None,
        predictions: Sequence[str],
    ) -> dict[str, float]:
        """``metrics.summarize`` of the rows: the dict a trial reports."""
        return summarize(await self.score_rows(sources, references, predictions))

    async def info(self) -> dict[str, Any]:
        """Model, device, identity and batching counters (for tests, benchmarks and debugging)."""
        import torch

        return {
            "model": self._model,
            "device": self._device,
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "cpu_s": time.process_time(),  # this process, all threads: work done, unlike wall time on a busy box
            "cache_hits": self._cache.hits if self._cache else 0,
            "cache_misses": self._cache.misses if self._cache else 0,
            **self._stats,
        }

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            first, self._pending = self._pending, None
            batch = [first if first is not None else await self._queue.get()]
            # Requests that arrived during the previous encode are already queued; a short wait catches
            # callers that were a few ms behind, which on CPU costs far less than one extra encode call.
            if self._batch_wait_s > 0 and self._queue.empty():
                await asyncio.sleep(self._batch_wait_s)
            rows = len(batch[0][0])
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if rows + len(item[0]) > self._max_batch_rows:
                    self._pending = item
                    break
                batch.append(item)
                rows += len(item[0])
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._score_batch, batch
                )
            except Exception as e:  # never let one bad batch kill the loop: hand the error to its callers
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (*_, fut), result in zip(batch, results, strict=True):
                if not fut.done():  # the caller may have been cancelled meanwhile
                    fut.set_result(result)

    def _score_batch(self, batch: list[_Request]) -> list[list[RowScore]]:
        """One encode for all requests in the batch, split back per request."""
        sources: list[str] = []
        references: list[str | None] = []
        predictions: list[str] = []
        for src, refs, preds, _ in batch:
            sources += src
            references += refs if refs is not None else [None] * len(src)
            predictions += preds
        rows = score_rows(
            sources, references, predictions, self._embedder, self._encode_batch_size, self._cache
        )
        self._stats["requests"] += len(batch)
        self._stats["rows"] += len(rows)
        self._stats["batches"] += 1
        self._stats["max_batch_requests"] = max(self._stats["max_batch_requests"], len(batch))
        out, start = [], 0
        for src, *_ in batch:
            out.append(rows[start : start + len(src)])
            start += len(src)
        return out


@dataclass(frozen=True)
class EvaluatorOptions:
    """How a new Evaluator actor is placed and batches (an existing actor keeps the options it started with)."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0  # also the actor's torch threads (Ray sets OMP_NUM_THREADS to floor(num_cpus))
    lifetime: str | None = None  # None fate-shares with the creating process; "detached" outlives it (module doc)
    max_concurrency: int = 256  # requests in flight inside the actor (all of them may join one batch)
    batch_wait_s: float = 0.005
    max_batch_rows: int = 512
    cache_items: int = 20_000  # embeddings kept for texts seen again (0 turns the cache off)
    scheduling_strategy: Any = None  # where a new actor goes (the Tune driver prefers its own node)
    # Ray restarts a dead actor (its node lost) elsewhere, same name, and retries the calls in flight; the Tune
    # driver sets it, so trials keep scoring after a node loss.
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.lifetime not in (None, "detached", "non_detached"):
            raise ConfigError(f"lifetime must be None, 'detached' or 'non_detached', got {self.lifetime!r}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError(f"num_gpus and num_cpus must be >= 0, got {self.num_gpus} and {self.num_cpus}")


def get_evaluator(
    name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, model: str = DEFAULT_EMBEDDER, **options: Any
) -> ray.actor.ActorHandle:
    """The named Evaluator actor, created on first use (``get_if_exists``); returns at once, loads async.

    ``options``: the fields of ``EvaluatorOptions``. An existing actor is returned as is, whatever its model:
    use another ``name`` for another model.
    """
    o = EvaluatorOptions(**options)
    actor = {k: getattr(o, k) for k in ("lifetime", "num_cpus", "num_gpus", "max_concurrency", "scheduling_strategy")}
    return Evaluator.options(
        name=name, namespace=namespace, get_if_exists=True, **actor,
        max_restarts=o.max_restarts, max_task_retries=-1 if o.max_restarts else 0,  # retry calls in flight
    ).remote(model, batch_wait_s=o.batch_wait_s, max_batch_rows=o.max_batch_rows, cache_items=o.cache_items)


def shutdown_evaluator(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Kill the named evaluator if it exists (needed for detached ones). True when one was killed."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle)
    return True


class EvaluatorClient:
    """Calls the shared evaluator: validates input locally, re-creates a dead actor and retries once."""

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        model: str = DEFAULT_EMBEDDER,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        timeout_s: float | None = 600.0,
        **actor_options: Any,
    ) -> None:
        self.name, self.namespace, self.model = name, namespace, model
        self._create_kwargs = {"num_gpus": num_gpus, "num_cpus": num_cpus, **actor_options}
        self.timeout_s = timeout_s
        self._handle: ray.actor.ActorHandle | None = None

    def _get_handle(self) -> ray.actor.ActorHandle:
        if self._handle is None:
            handle = get_evaluator(self.name, self.namespace, self.model, **self._create_kwargs)
            # get_if_exists hands back an existing actor as is; scoring with another model would be silent.
            info = ray.get(handle.info.remote(), timeout=self.timeout_s)
            if info["model"] != self.model:
                raise ConfigError(
                    f"evaluator {self.name!r} in namespace {self.namespace!r} runs model {info['model']!r}, "
                    f"not {self.model!r}. Fix: pass another name for this model, or the same model."
                )
            self._handle = handle
        return self._handle

    def _call(self, method: str, *args: Any) -> Any:
        for attempt in range(2):
            try:
                handle = self._get_handle()
                return ray.get(getattr(handle, method).remote(*args), timeout=self.timeout_s)
            except RayActorError as e:  # includes ActorDiedError and ActorUnavailableError
                self._handle = None
                if e.actor_init_failed:  # e.g. a bad model id: a new actor would fail the same way
                    raise ConfigError(f"evaluator {self.name!r} could not start: {_init_error(e)}") from e
                if attempt == 1:
                    raise
                _wait_until_name_released(self.name, self.namespace)
        raise AssertionError("unreachable")

    def score_rows(
        self, sources: Sequence[str], references: Sequence[str | None] | None, predictions: Sequence[str]
    ) -> list[RowScore]:
        validate_triples(sources, references, predictions)  # a clear error here, before any Ray call
        refs = list(references) if references is not None else None
        return self._call("score_rows", list(sources), refs, list(predictions))

    def score(
        self, sources: Sequence[str], references: Sequence[str | None] | None, predictions: Sequence[str]
    ) -> dict[str, float]:
        validate_triples(sources, references, predictions)
        refs = list(references) if references is not None else None
        return self._call("score", list(sources), refs, list(predictions))

    def info(self) -> dict[str, Any]:
        return self._call("info")


def _init_error(e: RayActorError) -> str:
    """The user-facing line of an actor's constructor failure (Ray wraps it in a traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ValueError:"):
            return line.removeprefix("ValueError:").strip()
    return lines[-1] if lines else type(e).__name__


def _wait_until_name_released(name: str, namespace: str, timeout_s: float = 10.0) -> None:
    """Wait until a dead actor's name is free, so get_if_exists creates a new actor, not the dead one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return  # free
        try:
            ray.get(handle.info.remote(), timeout=1.0)
            return  # someone else already re-created it and it answers
        except RayActorError:
            time.sleep(0.1)
        except GetTimeoutError:
            return  # alive but still loading its model: a new actor, use it
