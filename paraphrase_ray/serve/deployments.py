"""The Ray Serve application: one frozen base model, many soft prompts, mixed-prompt batches over HTTP.

A soft prompt is a few KB of input embeddings on a shared frozen model, so one replica hosts any number of
prompts and puts rows for *different* prompts in the same forward pass (``generate.generate_rows``). Each
request is validated in the FastAPI handler, split into rows, and every row enters one ``@serve.batch``
queue; the batch is grouped only by decoding options, never by prompt.

    serve run serve/config.yaml                      # this module's app_builder with the file's args
    paraphrase-ray serve --prompt best=runs/best      # the same app from the shell (serve/runner.py)

Endpoints (``routes.py``, behind ``guard.py``): ``POST /paraphrase``, ``GET /prompts``, ``GET /stats``,
``GET /healthz``, ``GET /docs``, and the OpenAI ones (``openai.py``: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``) on the same batch. Prompts come from ``args.prompts`` and the prompt store
(``store.py``: any prompt directory under it, loaded on first use). Operations: requests are admitted in work units (``admission.py``: 413 over
``max_request_work``, 503 + Retry-After over ``max_queued_work`` or ``max_queued_rows``); a request is answered
within ``request_timeout_s`` or gets 504 and its generation stops; ``check_health`` fails on a stuck batch or a
model that fails its probe batch after batch (Serve then replaces the replica), and each replica posts that
state for ``/healthz`` (``health.py``); counters go to ``ray.serve.metrics`` (``metrics.py``). What a request
may ask and how rows are batched is decided in ``policy.py`` (no Ray).
"""

# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from ray import serve
from ray.serve.exceptions import RayServeException

from paraphrase_ray.config import GenerationConfig, TemplateConfig, from_dict
from paraphrase_ray.errors import ConfigError, GenerationStopped
from paraphrase_ray.prompt.bundle import System
from paraphrase_ray.serve import health, policy
from paraphrase_ray.serve.admission import Admission, StopHook
from paraphrase_ray.serve.guard import internal_error
from paraphrase_ray.serve.ingress import ParaphraseAPI
from paraphrase_ray.serve.metrics import ReplicaMetrics
from paraphrase_ray.serve.protocol import (
    DEBUG_RAISE_MARK,
    ENV_API_KEY,
    ZERO_SHOT,
    ParaphraseRequest,
    ParaphraseResponse,
    ParaphraseResult,
    ServeSettings,
    parse_prompt_specs,
    split_prompt_spec,
)
from paraphrase_ray.storage import is_uri

APP_NAME = "paraphrase"
DEPLOYMENT_NAME = "ParaphraseModel"  # the model replicas
INGRESS_NAME = "ParaphraseAPI"  # the HTTP ingress: survives a model replica's crash and answers 503 for it
FAILED_BATCHES_UNHEALTHY = 3  # this many failed batches in a row, each confirmed by the probe: the model is unusable
# Serve's own options for the deployment; serve/config.yaml and build_app's options override them.
# max_queued_requests: requests waiting at a caller (the ingress) for a model replica beyond max_ongoing_requests;
# past it the ingress answers 503 at once (Serve's BackPressureError) instead of letting them wait into a 504.
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 64, "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 1},
    "health_check_period_s": 10, "health_check_timeout_s": 30,
}
INGRESS_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 512, "max_queued_requests": 1024, "ray_actor_options": {"num_cpus": 0}
}


def _replica() -> "ParaphraseAPI":
    """The replica serving this request (Serve pickles the app by value, so no module-level state)."""
    try:
        return serve.get_replica_context().servable_object
    except RayServeException as e:  # not inside a replica
        raise RuntimeError("the paraphrase API runs only inside a Serve replica") from e


class ParaphraseModel:
    """One model replica: the base model once, every prompt, one batch queue. ``ParaphraseAPI`` calls it."""

    def __init__(self, settings: dict[str, Any]):
        import ray
        import torch

        from paraphrase_ray.models import load_model
        from paraphrase_ray.prompt.bundle import load_bundle
        from paraphrase_ray.prompt.directory import PromptMeta
        from paraphrase_ray.serve.store import PromptStore

        self.settings = s = from_dict(ServeSettings, settings)
        self.api_key = s.api_key or os.environ.get(ENV_API_KEY) or None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if cpus >= 1:  # use the CPUs Ray gave this replica, no more (neighbours share the machine)
            torch.set_num_threads(int(cpus))
        specs = parse_prompt_specs(s.prompts, s.default)
        first = PromptMeta.read(specs[0][1]) if specs else PromptMeta()
        model = s.model or first.base_model
        if not model:
            raise ConfigError(f"{specs[0][1]} does not record its base model; set args.model")
        self.loaded = load_model(model, s.precision or first.precision, s.device)
        self.prompts: dict[str, System] = {}
        for name, path in specs:
            bundle = load_bundle(path, expected_dim=self.loaded.embed_dim)
            if s.model is None and bundle.base_model not in (None, model):
                raise ConfigError(f"prompt {name!r} was trained on {bundle.base_model!r}, not {model!r}")
            bundle.prompt.to(self.loaded.device)
            self.prompts[name] = System.from_bundle(bundle, name)
        self.default = specs[0][0] if specs else ZERO_SHOT
        base = self.prompts[specs[0][0]] if specs else System(ZERO_SHOT, None, TemplateConfig(), GenerationConfig())
        self.prompts[ZERO_SHOT] = dataclasses.replace(
            base, name=ZERO_SHOT, prompt=None, chat=self.loaded.is_chat, kind=ZERO_SHOT, path=None, meta=PromptMeta()
        )
        # the prompt store (store.py): prompts under it load on first use, in their own thread, into a bounded LRU
        self.store = None if s.prompt_store is None else PromptStore(
            s.prompt_store, model, self.loaded.embed_dim, s.prompt_cache_size)
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="prompt-store")
        self._generate.set_max_batch_size(s.max_batch_size)
        self._batch_wait = s.batch_wait_timeout_s
        self._generate.set_batch_wait_timeout_s(self._batch_wait)
        # One generation thread: the event loop keeps accepting (and queueing) rows while a batch runs.
        self._gen_pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="rerank")
        self._embedder = None
        self.metrics = ReplicaMetrics()
        self.admission = Admission(s)
        self._stop_hook = StopHook()  # a timed-out request's pass stops at its next model call
        self._stop_hook.install_on(self.loaded, [p.generation.quantize for p in self.prompts.values()])
        self._probe = (base, policy.probe_row(self.loaded, base))
        self._batch_started: float | None = None  # monotonic start of the batch in the generation thread
        self._failed_batches = 0
        ctx = serve.get_replica_context()
        self._health = health.Publisher(ctx.app_name, ctx.replica_id.unique_id, self.health_problem)

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        publisher = getattr(self, "_health", None)
        if publisher is not None:
            publisher.stop()

    # -- health ------------------------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """Why this replica should be replaced, or None: a stuck batch, or a model that fails every batch.

        Fixed sentences (the open ``/healthz`` shows them): the errors themselves are in the replica's log."""
        started, limit = self._batch_started, self.settings.stuck_batch_s
        if started is not None and time.monotonic() - started > limit:
            return f"a generation batch has run longer than stuck_batch_s ({limit:g} s)"
        if self._failed_batches >= FAILED_BATCHES_UNHEALTHY:
            return f"the model failed {self._failed_batches} batches in a row (see the replica's log)"
        return None

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        self.metrics.queue()  # keeps the queue-depth gauge alive between requests
        problem = self.health_problem()
        if problem:
            raise RuntimeError(problem)

    # -- what the routes in routes.py call -----------------------------------------------------------------
    def explain(self, name: str, top_k: int, metric: str) -> dict[str, Any]:
        from paraphrase_ray.prompt.explain import explain_prompt

        served = self.prompts.get(name)
        if served is None or served.prompt is None:
            names = [n for n, p in self.prompts.items() if p.prompt is not None]
            raise HTTPException(404, f"unknown prompt {name!r}; available: {', '.join(names)}")
        table = self.loaded.model.get_input_embeddings()  # the module: Gemma scales its table rows
        return explain_prompt(served.prompt, table, self.loaded.tokenizer, top_k, metric)

    async def list_prompts(self) -> dict[str, Any]:
        out = policy.prompt_listing(self.prompts, self.default, self.loaded, self.settings)
        if self.store is not None:  # read in the store's thread: a bucket's listing is a network call
            listing = await asyncio.get_running_loop().run_in_executor(self._store_pool, self.store.listing)
            out["store"] = {"location": self.store.location, "prompts": listing}
        return out

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.summary(),
            **self.admission.summary(),
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batch_wait_s": round(self._batch_wait, 3),
            "device": str(self.loaded.device),
            "prompt_store": self.store.summary() if self.store is not None else None,
        }

    async def paraphrase(self, body: dict[str, Any]) -> ParaphraseResponse:
        """``POST /paraphrase``: every text's result, in input order."""
        head, done = await self._collect(body)
        results = [res for _, res, _ in done]
        return ParaphraseResponse(prompt=head["prompt"], model=self.loaded.name, results=results)

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI routes' answer: ``paraphrase`` with token counts per text (``openai.response`` shapes it)."""
        head, done = await self._collect(body)
        return {**head, "results": [self._counted(*d) for d in done]}

    async def answer_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Streamed (``handle.options(stream=True)``): the head once admitted, then each text as it is done."""
        async for event in self._events(body, stream=True):
            yield event if isinstance(event, dict) else self._counted(*event)

    async def _collect(self, body: dict[str, Any]) -> tuple[dict[str, Any], list]:
        events = self._events(body, stream=False)
        head = await events.__anext__()
        return head, sorted([e async for e in events], key=lambda e: e[0])

    async def _events(self, body: dict[str, Any], stream: bool) -> AsyncIterator[Any]:
        """Validate, admit under the budgets, then answer within ``request_timeout_s``: first ``{"replica",
        "prompt", "texts"}`` once admitted, then ``(index, ParaphraseResult, Item)`` per text as its rows finish
        (``stream``: reranked one by one; else all at once, in one scoring call).

        A request that times out, or whose caller leaves, is cancelled: its rows that have not started are
        skipped and the ones generating stop at the next decode step."""
        s, m, req = self.settings, self.metrics, ParaphraseRequest.model_validate(body)
        cancel = threading.Event()
        prompts = await self._prompts_for(req.prompt or self.default)
        served, texts, items = policy.request_items(s, self.loaded, prompts, self.default, req, cancel.is_set)
        if s.debug_stall_s and any(DEBUG_RAISE_MARK in t for t in texts):
            raise RuntimeError(f"{DEBUG_RAISE_MARK}: a plain exception on the model replica (tests only)")
        ticket = self.admission.admit(items)
        m.admitted(len(items))
        deadline = time.monotonic() + s.request_timeout_s if s.request_timeout_s else None
        tasks = [asyncio.ensure_future(self._one(i, it, t)) for i, (it, t) in enumerate(zip(items, texts, strict=True))]
        try:
            yield {"replica": serve.get_replica_context().replica_id.unique_id, "prompt": served.name,
                   "texts": len(texts)}
            left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
            if stream:
                for fut in asyncio.as_completed(tasks, timeout=left):
                    i, res, it = await fut
                    if req.rerank:
                        await self._rerank([res], cancel.is_set)
                    yield i, res, it
            else:
                done = await asyncio.wait_for(self._all(tasks, req.rerank, cancel.is_set), left)
                for d in done:
                    yield d
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                f"not answered within the server's request timeout of {s.request_timeout_s:g} s "
                f"({self.admission.rows} texts were queued); its generation was stopped; retry later or send "
                "fewer texts",
            ) from None
        finally:
            cancel.set()  # answered, timed out or abandoned: nothing more to generate for it
            for t in tasks:
                t.cancel()
            self.admission.release(ticket)
            m.queue(-len(items))

    async def _prompts_for(self, name: str) -> dict[str, System]:
        """The prompts ``request_items`` looks ``name`` up in: the fixed ones, or the one the store holds at
        ``name`` (loaded in the store's thread on first use, or when its files changed)."""
        if name in self.prompts or self.store is None:
            return self.prompts
        loop = asyncio.get_running_loop()
        return {name: await loop.run_in_executor(self._store_pool, self._from_store, name)}

    def _from_store(self, name: str) -> System:
        served = self.store.get(name, self.loaded.device)
        self._stop_hook.install_on(self.loaded, [served.generation.quantize])  # its model copy stops too
        return served

    async def _one(self, i: int, item: policy.Item, text: str) -> tuple[int, ParaphraseResult, policy.Item]:
        out = await self._generate(item)
        if isinstance(out, Exception):
            _, detail = internal_error("generation", out)
            raise HTTPException(500, f"generation failed: {detail}")
        return i, ParaphraseResult(text=text, paraphrase=out[0] if out else "", candidates=out), item

    async def _all(self, tasks: list, rerank: bool, stopped) -> list:
        done = await asyncio.gather(*tasks)
        if rerank:
            await self._rerank([res for _, res, _ in done], stopped)
        return done

    def _counted(self, i: int, res: ParaphraseResult, item: policy.Item) -> dict[str, Any]:
        """One text's result with its token counts: what the model read, what each returned text holds."""
        tok = self.loaded.tokenizer
        return {"index": i, "text": res.text, "candidates": res.candidates,
                "scores": [x.model_dump(by_alias=True) for x in res.scores] if res.scores else None,
                "prompt_tokens": item.input_tokens, "max_new_tokens": item.row.max_new_tokens,
                "completion_tokens": [len(tok(c, add_special_tokens=False)["input_ids"]) for c in res.candidates]}

    # -- the shared batch --------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=policy.batch_cost)
    async def _generate(self, items: list[policy.Item]) -> list[list[str] | Exception]:
        """Rows of any prompts, grouped only by decoding options (``policy.run_batch``)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._gen_pool, self._run_batch, items)
        took = time.perf_counter() - t0
        self.metrics.generated(took)
        self.admission.finished(items, took)
        # Closed-loop callers resend the moment their batch returns; a fixed 10 ms wait then starts the next
        # batch without them and the callers split into convoys of half-size batches. Waiting a small share of
        # the last batch's time lets them rejoin, costing at most that share of throughput.
        s = self.settings
        self._batch_wait = max(s.batch_wait_timeout_s, min(s.batch_wait_max_s, s.batch_wait_fraction * took))
        self._generate.set_batch_wait_timeout_s(self._batch_wait)
        return out

    def _run_batch(self, items: list[policy.Item]) -> list[list[str] | Exception]:
        """In the generation thread; ``check_health`` watches how long this takes and whether it keeps failing.

        A failed row counts against the model only when the model then fails the probe too (a short greedy
        row of a plain sentence): a row that failed for what its request asked never makes the replica
        unhealthy."""
        self._batch_started = time.monotonic()
        try:
            out = policy.run_batch(
                self.loaded, items, self.metrics.batch, self.settings.debug_stall_s, self._stop_hook.watch
            )
            if any(isinstance(o, Exception) and not isinstance(o, GenerationStopped) for o in out):
                self._failed_batches = 0 if self._probe_ok() else self._failed_batches + 1
            elif any(isinstance(o, list) for o in out):
                self._failed_batches = 0
        finally:
            self._batch_started = None
        return out

    def _probe_ok(self) -> bool:
        from paraphrase_ray.generation.generate import generate_rows

        served, row = self._probe
        try:
            generate_rows(self.loaded, [row], policy.probe_gen(served))
            return True
        except Exception as e:
            internal_error("the model probe", e)
            return False

    async def _rerank(self, results: list[ParaphraseResult], stopped) -> None:
        """Score every candidate; the best usable, faithful candidate comes first (``metrics.rank_candidates``)."""
        from paraphrase_ray.evaluation.embedder import load_embedder
        from paraphrase_ray.evaluation.metrics import rerank

        def score():
            if stopped():  # the request timed out (or left) while waiting for this thread
                raise GenerationStopped("the request stopped before its rerank")
            if self._embedder is None:
                self._embedder = load_embedder(self.settings.embedder, device=str(self.loaded.device))
            return rerank([r.text for r in results], [r.candidates for r in results], self._embedder)

        ordered, scores = await asyncio.get_running_loop().run_in_executor(self._score_pool, score)
        for r, cands, row in zip(results, ordered, scores, strict=True):
            r.candidates, r.paraphrase = cands, cands[0]
            r.scores = [policy.candidate_score(x) for x in row]


# -- building ------------------------------------------------------------------------------------------------------
def build_app(settings: ServeSettings, **deployment_options: Any) -> serve.Application:
    """The bound application: ``ParaphraseAPI`` (HTTP) in front of ``ParaphraseModel`` (the model).

    ``deployment_options`` override ``DEPLOYMENT_DEFAULTS`` for the model deployment (replicas, resources,
    health checks); its ``runtime_env`` goes to the ingress too (the API key may come from there). The FastAPI
    app is built on each ingress replica from ``settings`` (``serve.ingress`` with a builder function), so its
    request schema carries this application's limits.
    """

    def asgi_app():
        from paraphrase_ray.serve.routes import make_api

        return make_api(settings, _replica)

    options = {**DEPLOYMENT_DEFAULTS, **deployment_options}
    ingress_options = dict(INGRESS_DEFAULTS)
    runtime_env = (options.get("ray_actor_options") or {}).get("runtime_env")
    if runtime_env:
        ingress_options["ray_actor_options"] = {**ingress_options["ray_actor_options"], "runtime_env": runtime_env}
    model = serve.deployment(name=DEPLOYMENT_NAME, **options)(ParaphraseModel)
    ingress = serve.deployment(name=INGRESS_NAME, **ingress_options)(serve.ingress(asgi_app)(ParaphraseAPI))
    args = dataclasses.asdict(settings)
    return ingress.bind(model.bind(args), args)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for ``serve run``/``serve deploy``: ``paraphrase_ray.serve.deployments:app_builder`` with ``args``.

    ``args.prompts`` may be a ``NAME: DIR`` mapping or a list of ``[NAME=]DIR``; relative dirs resolve against
    the working directory of ``serve run`` (use absolute paths with ``serve deploy`` on a cluster).
    """
    args = dict(args or {})
    prompts = args.get("prompts")
    if isinstance(prompts, dict):
        args["prompts"] = [f"{k}={v}" for k, v in prompts.items()]
    elif isinstance(prompts, str):
        args["prompts"] = [prompts]
    settings = from_dict(ServeSettings, args, where="args.")
    uris = dict(np_ for np_ in map(split_prompt_spec, settings.prompts) if is_uri(np_[1]))  # each replica fetches
    resolved = tuple(f"{n}={uris.get(n, p)}" for n, p in parse_prompt_specs(settings.prompts, settings.default))
    store = settings.prompt_store  # a local store resolves against the working directory too
    store = store if store is None or is_uri(store) else str(Path(store).expanduser().resolve())
    return build_app(dataclasses.replace(settings, prompts=resolved, default=None, prompt_store=store))
