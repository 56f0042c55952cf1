"""The Ray Serve application: one frozen base model, many soft prompts, mixed-prompt batches over HTTP.

A soft prompt is a few KB of input embeddings on a shared frozen model, so one replica hosts any number of
prompts and puts rows for *different* prompts in the same forward pass (``generate.generate_rows``). Each
request is validated in the FastAPI handler, split into rows, and every row enters one ``@serve.batch``
queue; the batch is grouped only by decoding options, never by prompt.

    serve run serve/config.yaml                      # this module's app_builder with the file's args
    paraphrase-ray serve --prompt best=runs/best      # the same app from the shell (serve_runner.py)

Endpoints: ``POST /paraphrase``, ``GET /prompts``, ``GET /stats`` (batch sizes), ``GET /healthz`` (never needs
the API key), ``GET /docs``. Routes live on the module-level ``api``: add one as a method of ``Paraphraser``.
What a request may ask and how rows are batched and reranked is decided in ``serve_policy.py`` (no Ray).
"""

# No `from __future__ import annotations`: Serve rebinds the class's FastAPI routes, and FastAPI must then see
# real annotation objects (string annotations resolve in the wrong module and the body turns into a query).
import asyncio
import dataclasses
import hmac
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from . import serve_policy as policy
from .config import ConfigError, from_dict
from .prompt import System
from .serve_schema import (  # noqa: F401  (ZERO_SHOT, ServeSettings, parse_prompt_specs: this module's API)
    ENV_API_KEY,
    ZERO_SHOT,
    ParaphraseRequest,
    ParaphraseResponse,
    ParaphraseResult,
    ServeSettings,
    parse_prompt_specs,
)

APP_NAME = "paraphrase"
DEPLOYMENT_NAME = "Paraphraser"
# Everything else needs the API key when one is set. The playground page itself holds no data: it asks the
# person for the key and sends it with every API call.
OPEN_PATHS = frozenset({"/healthz", "/"})
MAX_BODY_BYTES = 1 << 20
PLAYGROUND_PATH = Path(__file__).parent / "resources" / "playground.html"


api = FastAPI(
    title="paraphrase-ray",
    summary="One frozen causal LM, many soft prompts, batched across prompts.",
    version="0.1.0",
)


@api.middleware("http")
async def _guard(request: Request, call_next):
    """API key on every path but /healthz; oversized bodies stop here, before parsing."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    key = getattr(_replica(), "api_key", None)
    if key and path not in OPEN_PATHS:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            _count_rejected(401)
            return JSONResponse(
                {"detail": "missing or wrong API key: send 'Authorization: Bearer KEY'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        _count_rejected(413)
        return JSONResponse(
            {"detail": f"request body over the limit of {MAX_BODY_BYTES} bytes"}, status_code=413
        )
    return await call_next(request)


def _replica() -> "Paraphraser | None":
    """The replica serving this request (Serve pickles ``api`` by value, so no module-level state)."""
    try:
        return serve.get_replica_context().servable_object
    except RayServeException:  # not inside a replica
        return None


def _count_rejected(status: int) -> None:
    replica = _replica()
    if replica is not None and hasattr(replica, "stats"):
        replica.stats[f"rej_{status}"] += 1


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose ``detail`` names each bad field, e.g. ``num_candidates: Input should be ...``."""
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        msgs.append(f"{loc}: {err.get('msg', 'invalid')}")
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    _count_rejected(422)
    return JSONResponse({"detail": "; ".join(msgs), "errors": errors}, status_code=422)


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Paraphraser:
    """One replica: the base model once, every prompt, one batch queue."""

    def __init__(self, settings: dict[str, Any]):
        import ray
        import torch

        from .models import load_model
        from .prompt import PromptMeta, load_bundle

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
        self.stats: Counter = Counter()
        self.batch_sizes: Counter = Counter()  # rows per forward pass -> count

    # -- endpoints ---------------------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground(self) -> HTMLResponse:
        """The self-contained playground page (no build step, no CDN)."""
        return HTMLResponse(PLAYGROUND_PATH.read_text(encoding="utf-8"))

    @api.get("/prompts/{name}/explain")
    def explain(self, name: str, top_k: int = 5, metric: str = "cosine") -> dict[str, Any]:
        """Nearest vocabulary tokens of each prompt vector, and norms (see ``paraphrase-ray explain``)."""
        from .explain import explain_prompt

        served = self.prompts.get(name)
        if served is None or served.prompt is None:
            names = [n for n, p in self.prompts.items() if p.prompt is not None]
            raise HTTPException(404, f"unknown prompt {name!r}; available: {', '.join(names)}")
        if not 1 <= top_k <= 50 or metric not in ("cosine", "l2"):
            raise HTTPException(422, "top_k must be in 1..50 and metric 'cosine' or 'l2'")
        table = self.loaded.model.get_input_embeddings().weight
        return explain_prompt(served.prompt, table, self.loaded.tokenizer, top_k, metric)

    @api.get("/prompts")
    def list_prompts(self) -> dict[str, Any]:
        """Served prompts with what was recorded at export, and the request limits."""
        return policy.prompt_listing(self.prompts, self.default, self.loaded, self.settings)

    @api.get("/stats")
    def get_stats(self) -> dict[str, Any]:
        """This replica's counters; ``mean_batch_size`` is rows per forward pass."""
        return {
            **policy.stats_summary(self.stats, self.batch_sizes),
            "batch_wait_s": round(self._batch_wait, 3),
            "device": str(self.loaded.device),
        }

    @api.post("/paraphrase", response_model=ParaphraseResponse, response_model_by_alias=True)
    async def paraphrase(self, req: ParaphraseRequest) -> ParaphraseResponse:
        """Paraphrases in input order; every row joins the shared cross-prompt batch."""
        try:
            served, texts, items = policy.request_items(self.settings, self.loaded, self.prompts, self.default, req)
        except HTTPException as e:
            self.stats[f"rej_{e.status_code}"] += 1
            raise
        self.stats["requests"] += 1
        self.stats["rows"] += len(items)
        outs = await asyncio.gather(*(self._generate(item) for item in items))
        for o in outs:
            if isinstance(o, Exception):
                raise HTTPException(500, f"generation failed: {type(o).__name__}: {o}")
        results = [
            ParaphraseResult(text=t, paraphrase=c[0] if c else "", candidates=c)
            for t, c in zip(texts, outs, strict=True)
        ]
        if req.rerank:
            await self._rerank(results)
        return ParaphraseResponse(prompt=served.name, model=self.loaded.name, results=results)

    # -- the shared batch --------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=policy.batch_cost)
    async def _generate(self, items: list[policy.Item]) -> list[list[str] | Exception]:
        """Rows of any prompts, grouped only by decoding options (``serve_policy.run_batch``)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._gen_pool, policy.run_batch, self.loaded, items, self.stats, self.batch_sizes)
        took = time.perf_counter() - t0
        self.stats["gen_s"] += took
        # Closed-loop callers resend the moment their batch returns; a fixed 10 ms wait then starts the next
        # batch without them and the callers split into convoys of half-size batches. Waiting a small share of
        # the last batch's time lets them rejoin, costing at most that share of throughput.
        s = self.settings
        self._batch_wait = max(s.batch_wait_timeout_s, min(s.batch_wait_max_s, s.batch_wait_fraction * took))
        self._generate.set_batch_wait_timeout_s(self._batch_wait)
        return out

    async def _rerank(self, results: list[ParaphraseResult]) -> None:
        """Score every candidate; the best usable, faithful candidate comes first (``metrics.rank_candidates``)."""
        from .metrics import load_embedder, rerank

        def score():
            if self._embedder is None:
                self._embedder = load_embedder(self.settings.embedder, device=str(self.loaded.device))
            return rerank([r.text for r in results], [r.candidates for r in results], self._embedder)

        ordered, scores = await asyncio.get_running_loop().run_in_executor(self._score_pool, score)
        for r, cands, row in zip(results, ordered, scores, strict=True):
            r.candidates, r.paraphrase = cands, cands[0]
            r.scores = [policy.candidate_score(x) for x in row]


# -- building ------------------------------------------------------------------------------------------------------
def build_app(settings: ServeSettings, **deployment_options: Any) -> serve.Application:
    """The bound application; ``deployment_options`` go to ``Paraphraser.options`` (replicas, resources)."""
    dep = Paraphraser.options(**deployment_options) if deployment_options else Paraphraser
    return dep.bind(dataclasses.asdict(settings))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for ``serve run``/``serve deploy``: ``paraphrase_ray.serving:app_builder`` with ``args``.

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
    resolved = tuple(f"{n}={p}" for n, p in parse_prompt_specs(settings.prompts, settings.default))
    return build_app(dataclasses.replace(settings, prompts=resolved, default=None))
