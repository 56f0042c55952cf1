"""The Ray Serve application: one frozen base model, many soft prompts, mixed-prompt batches over HTTP.

A soft prompt is a few KB of input embeddings on a shared frozen model, so one replica hosts any number of
prompts and puts rows for *different* prompts in the same forward pass (``generate.generate_rows``). Each
request is validated in the FastAPI handler, split into rows, and every row enters one ``@serve.batch``
queue; the batch is grouped only by decoding options, never by prompt.

    serve run serve/config.yaml                      # this module's app_builder with the file's args
    paraphrase-ray serve --prompt best=runs/best      # the same app from the shell (serve/runner.py)

Endpoints (``routes.py``, behind ``guard.py``): ``POST /paraphrase``, ``GET /prompts``, ``GET /stats``,
``GET /healthz``, ``GET /docs``. Operations: requests are admitted in work units (``admission.py``: 413 over
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from paraphrase_ray.config import from_dict
from paraphrase_ray.errors import ConfigError, GenerationStopped
from paraphrase_ray.prompt.bundle import System
from paraphrase_ray.serve import health, policy
from paraphrase_ray.serve.admission import Admission, StopHook, busy
from paraphrase_ray.serve.guard import internal_error
from paraphrase_ray.serve.metrics import ReplicaMetrics, ResponseMetrics
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
RESTART_RETRY_S = 2  # Retry-After when a model replica died under a request
FAILED_BATCHES_UNHEALTHY = 3  # this many failed batches in a row, each confirmed by the probe: the model is unusable
# Serve's own options for the deployment; serve/config.yaml and build_app's options override them.
# max_queued_requests: requests waiting at a caller (the ingress) for a model replica beyond max_ongoing_requests;
# past it the ingress answers 503 at once (Serve's BackPressureError) instead of letting them wait into a 504.
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 64,
    "max_queued_requests": 64,
    "ray_actor_options": {"num_cpus": 1},
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
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

        self.settings = s = from_dict(ServeSettings, settings)
        self.api_key = s.api_key or os.environ.get(ENV_API_KEY) or None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if cpus >= 1:  # use the CPUs Ray gave this replica, no more (neighbours share the machine)
            torch.set_num_threads(int(cpus))
        specs = parse_prompt_specs(s.prompts, s.default)
        first = PromptMeta.read(specs[0][1])
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
        self.default = specs[0][0]
        base = self.prompts[self.default]
        self.prompts[ZERO_SHOT] = dataclasses.replace(
            base, name=ZERO_SHOT, prompt=None, chat=self.loaded.is_chat, kind=ZERO_SHOT, path=None, meta=PromptMeta()
        )
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

    def list_prompts(self) -> dict[str, Any]:
        return policy.prompt_listing(self.prompts, self.default, self.loaded, self.settings)

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.summary(),
            **self.admission.summary(),
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batch_wait_s": round(self._batch_wait, 3),
            "device": str(self.loaded.device),
        }

    async def paraphrase(self, body: dict[str, Any]) -> ParaphraseResponse:
        """Validate, admit under the budgets, answer (generation and rerank) within ``request_timeout_s``.

        A request that times out, or whose caller leaves, is cancelled: its rows that have not started are
        skipped and the ones generating stop at the next decode step."""
        s, m, req = self.settings, self.metrics, ParaphraseRequest.model_validate(body)
        cancel = threading.Event()
        served, texts, items = policy.request_items(s, self.loaded, self.prompts, self.default, req, cancel.is_set)
        if s.debug_stall_s and any(DEBUG_RAISE_MARK in t for t in texts):
            raise RuntimeError(f"{DEBUG_RAISE_MARK}: a plain exception on the model replica (tests only)")
        ticket = self.admission.admit(items)
        m.admitted(len(items))
        try:
            answer = self._answer(served, texts, items, req.rerank, cancel.is_set)
            return await asyncio.wait_for(answer, s.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                f"not answered within the server's request timeout of {s.request_timeout_s:g} s "
                f"({self.admission.rows} texts were queued); its generation was stopped; retry later or send "
                "fewer texts",
            ) from None
        finally:
            cancel.set()  # answered, timed out or abandoned: nothing more to generate for it
            self.admission.release(ticket)
            m.queue(-len(items))

    async def _answer(self, served: System, texts: list[str], items: list[policy.Item], rerank: bool, stopped):
        outs = await asyncio.gather(*(self._generate(it) for it in items))
        for o in outs:
            if isinstance(o, Exception):
                _, detail = internal_error("generation", o)
                raise HTTPException(500, f"generation failed: {detail}")
        results = [
            ParaphraseResult(text=t, paraphrase=c[0] if c else "", candidates=c)
            for t, c in zip(texts, outs, strict=True)
        ]
        if rerank:
            await self._rerank(results, stopped)
        return ParaphraseResponse(prompt=served.name, model=self.loaded.name, results=results)

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


class ParaphraseAPI:
    """The HTTP ingress (``routes.make_api``): auth, schema, status counters; the work is ``ParaphraseModel``'s.

    A separate deployment, so that when a model replica dies under a request (SIGKILL, OOM, a failed health
    check) the caller gets a 503 with ``Retry-After`` instead of the proxy's bare 500.
    """

    def __init__(self, model, settings: dict[str, Any]):
        self.model = model  # DeploymentHandle of ParaphraseModel
        self.settings = s = from_dict(ServeSettings, settings)
        self.api_key = s.api_key or os.environ.get(ENV_API_KEY) or None
        self.metrics = ResponseMetrics()
        # the model answers 504 itself at request_timeout_s; this bounds a model replica that stopped answering
        self._timeout = s.request_timeout_s + 10 if s.request_timeout_s else None
        self._health = health.Reader(serve.get_replica_context().app_name)

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``ParaphraseModel.<method>(*args)`` on a model replica, with its errors as HTTP errors; any other
        error of the model replica is logged here with an id, and the caller gets only the id."""
        try:
            return await asyncio.wait_for(getattr(self.model, method).remote(*args), timeout or self._timeout)
        except HTTPException as e:  # raised on the model replica: re-raise it plainly here
            cause = getattr(e, "cause", e)
            raise HTTPException(cause.status_code, cause.detail, headers=cause.headers) from None
        except BackPressureError as e:
            raise busy(
                "server busy: the model replicas' queues are full; retry after the Retry-After seconds",
                e.retry_after_s or RESTART_RETRY_S,
            ) from None
        except RayActorError:
            raise busy(
                "the model replica stopped while serving this request and is being replaced; it changed nothing, "
                "so send the same request again after the Retry-After seconds",
                RESTART_RETRY_S,
            ) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the model replica did not answer within {timeout or self._timeout:g} s") from None
        except RayTaskError as e:  # its text names pids, node addresses, files and source lines
            _, detail = internal_error(f"the model replica's {method}", e)
            raise HTTPException(500, detail) from None

    async def health_problem(self) -> str | None:
        """From the board the model replicas post to (``health.py``): never queued behind generation."""
        return await self._health.problem()

    async def paraphrase(self, req: ParaphraseRequest) -> ParaphraseResponse:
        return await self.call("paraphrase", req.model_dump(exclude_unset=True))

    async def list_prompts(self) -> dict[str, Any]:
        return await self.call("list_prompts")

    async def explain(self, name: str, top_k: int, metric: str) -> dict[str, Any]:
        return await self.call("explain", name, top_k, metric)

    async def stats(self) -> dict[str, Any]:
        return {**await self.call("stats"), **self.metrics.summary()}


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
    return build_app(dataclasses.replace(settings, prompts=resolved, default=None))
