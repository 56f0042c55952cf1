"""The Ray Serve application: one frozen base model, many soft prompts, mixed-prompt batches over HTTP.

A soft prompt is a few KB of input embeddings on a shared frozen model, so one replica hosts any number of
prompts and puts rows for *different* prompts in the same forward pass (``generate.generate_rows``). Each
request is validated in the FastAPI handler, split into rows, and every row enters one ``@serve.batch``
queue; the batch is grouped only by decoding options, never by prompt.

    paraphrase-ray serve --prompt best=runs/best --prompt other=runs/other   # foreground, Ctrl-C stops
    serve run serve/config.yaml                                               # same app from a config file
    python -m paraphrase_ray.serving --demo PROMPT_DIR                        # deploy, ask, print, shut down

Endpoints: ``POST /paraphrase``, ``GET /prompts``, ``GET /stats`` (batch sizes), ``GET /healthz`` (never needs
the API key), ``GET /docs``. Routes live on the module-level ``api``: add one as a method of ``Paraphraser``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from .config import ConfigError, GenerationConfig, TemplateConfig, from_dict
from .prompt import SoftPrompt
from .serve_schema import (
    ENV_API_KEY,
    MAX_CANDIDATES,
    ZERO_SHOT,
    CandidateScore,
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


@dataclass
class ServedPrompt:
    name: str
    prompt: SoftPrompt | None  # None: zero-shot
    template: TemplateConfig
    gen: GenerationConfig
    max_source_tokens: int
    chat: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Item:
    """One row in the batch queue; ``gen`` is normalised so rows differing only in length limits share it."""

    prompt: str
    row: Any  # generate.Row
    gen: GenerationConfig

    @property
    def cost(self) -> int:  # sequences this row adds to the forward pass
        return max(self.gen.num_beams, self.gen.num_return_sequences)


def _batch_cost(items: list[_Item]) -> int:
    return sum(i.cost for i in items)


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

        from .cli import generation_from_meta
        from .models import load_model
        from .prompt import load_bundle, read_meta

        self.settings = s = from_dict(ServeSettings, settings)
        self.api_key = s.api_key or os.environ.get(ENV_API_KEY) or None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if cpus >= 1:  # use the CPUs Ray gave this replica, no more (neighbours share the machine)
            torch.set_num_threads(int(cpus))
        specs = parse_prompt_specs(s.prompts, s.default)
        default_meta = read_meta(specs[0][1])
        model = s.model or default_meta.get("base_model")
        if not model:
            raise ConfigError(f"{specs[0][1]} does not record its base model; set args.model")
        precision = s.precision or (default_meta.get("train_config") or {}).get("precision", "auto")
        self.loaded = load_model(model, precision, s.device)
        self.prompts: dict[str, ServedPrompt] = {}
        for name, path in specs:
            bundle = load_bundle(path, expected_dim=self.loaded.embed_dim)
            if s.model is None and bundle.base_model not in (None, model):
                raise ConfigError(f"prompt {name!r} was trained on {bundle.base_model!r}, not {model!r}")
            template, gen = generation_from_meta(bundle.meta)
            bundle.prompt.to(self.loaded.device)
            self.prompts[name] = ServedPrompt(
                name,
                bundle.prompt,
                template,
                gen,
                int(bundle.meta.get("max_source_tokens", 64)),
                meta=bundle.meta,
            )
        first = self.prompts[specs[0][0]]
        self.default = first.name
        self.prompts[ZERO_SHOT] = ServedPrompt(
            ZERO_SHOT, None, first.template, first.gen, first.max_source_tokens, chat=self.loaded.is_chat
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
        s = self.settings
        items = []
        for p in self.prompts.values():
            meta = p.meta
            items.append(
                {
                    "name": p.name,
                    "default": p.name == self.default,
                    "n_tokens": p.prompt.n_tokens if p.prompt is not None else 0,
                    "init": meta.get("init") or (meta.get("prompt_config") or {}).get("init"),
                    "base_model": meta.get("base_model", self.loaded.name),
                    "max_source_tokens": p.max_source_tokens,
                    "metrics": meta.get("metrics") or {},
                }
            )
        limits = {
            "max_texts": s.max_texts,
            "max_chars": s.max_chars,
            "max_new_tokens": s.max_new_tokens,
            "max_candidates": MAX_CANDIDATES,
            "context_tokens": self.loaded.max_positions,
        }
        return {"base_model": self.loaded.name, "default": self.default, "prompts": items, "limits": limits}

    @api.get("/stats")
    def get_stats(self) -> dict[str, Any]:
        """This replica's counters; ``mean_batch_size`` is rows per forward pass."""
        import torch

        st, batches = self.stats, self.stats["batches"]
        return {
            "requests": st["requests"],
            "rows": st["rows"],
            "batches": batches,
            "mean_batch_size": round(st["batch_rows"] / batches, 3) if batches else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "mixed_prompt_batches": st["mixed_prompt_batches"],
            "generate_seconds": round(st["gen_s"], 3),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "rejected": {k[4:]: v for k, v in st.items() if k.startswith("rej_")},
            "batch_wait_s": round(self._batch_wait, 3),
            "torch_threads": torch.get_num_threads(),
            "device": str(self.loaded.device),
        }

    @api.post("/paraphrase", response_model=ParaphraseResponse, response_model_by_alias=True)
    async def paraphrase(self, req: ParaphraseRequest) -> ParaphraseResponse:
        """Paraphrases in input order; every row joins the shared cross-prompt batch."""
        try:
            served, texts, items = self._validate(req)
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

    # -- validation: everything a caller can get wrong is rejected here, before the batch queue ----------------
    def _validate(self, req: ParaphraseRequest) -> tuple[ServedPrompt, list[str], list[_Item]]:
        from .generate import row_for

        s = self.settings
        name = req.prompt or self.default
        if name not in self.prompts:
            raise HTTPException(404, f"unknown prompt {name!r}; available: {', '.join(self.prompts)}")
        served = self.prompts[name]
        if (req.text is None) == (req.texts is None):
            raise HTTPException(422, "give exactly one of 'text' or 'texts'")
        field_name = "text" if req.text is not None else "texts"
        texts = [req.text] if req.text is not None else list(req.texts or [])
        if not texts:
            raise HTTPException(422, "texts: empty list; give at least one text")
        if len(texts) > s.max_texts:
            raise HTTPException(
                413, f"texts: {len(texts)} texts exceed the limit of {s.max_texts} per request"
            )
        for i, t in enumerate(texts):
            where = field_name if req.text is not None else f"texts[{i}]"
            if not t.strip():
                raise HTTPException(422, f"{where}: empty or whitespace-only text")
            if len(t) > s.max_chars:
                raise HTTPException(413, f"{where}: {len(t)} characters exceed the limit of {s.max_chars}")
        gen = self._decoding(served, req)
        tok, n_prompt = self.loaded.tokenizer, served.prompt.n_tokens if served.prompt is not None else 0
        key = dataclasses.replace(
            gen,
            max_new_tokens=s.max_new_tokens,
            max_new_tokens_ratio=1.0,
            seed=gen.seed if gen.do_sample else 0,
        )
        items = []
        for i, t in enumerate(texts):
            where = field_name if req.text is not None else f"texts[{i}]"
            n_src = len(tok(served.template.prefix + t, add_special_tokens=True)["input_ids"])
            if not served.chat and n_src > served.max_source_tokens:
                raise HTTPException(
                    413,
                    f"{where}: {n_src} tokens exceed prompt {name!r}'s limit of "
                    f"{served.max_source_tokens} source tokens",
                )
            row = row_for(
                self.loaded, t, served.prompt, served.template, gen, served.max_source_tokens, served.chat
            )
            total = n_prompt + len(row.ids) + row.max_new_tokens
            if total > self.loaded.max_positions:
                raise HTTPException(
                    413,
                    f"{where}: {n_prompt} prompt + {len(row.ids)} input + {row.max_new_tokens} "
                    f"new tokens exceed the model's context of {self.loaded.max_positions}",
                )
            items.append(_Item(name, row, key))
        return served, texts, items

    def _decoding(self, served: ServedPrompt, req: ParaphraseRequest) -> GenerationConfig:
        """The prompt's recorded decoding options with the request's on top (CLI rules for K > 1)."""
        k, cap = req.num_candidates, self.settings.max_new_tokens
        if req.max_new_tokens is not None and req.max_new_tokens > cap:
            raise HTTPException(422, f"max_new_tokens: {req.max_new_tokens} exceeds the server cap of {cap}")
        beams = req.num_beams or served.gen.num_beams
        sample = req.do_sample
        if sample is None:
            sample = k > beams or req.temperature is not None or req.top_p is not None or served.gen.do_sample
        if not sample and k > beams:
            raise HTTPException(
                422, f"num_candidates: {k} > num_beams {beams} needs do_sample=true or more beams"
            )
        opts = {
            "num_return_sequences": k,
            "num_beams": beams,
            "do_sample": sample,
            "temperature": req.temperature or (0.8 if sample and k > 1 else None),
            "top_p": req.top_p or (0.95 if sample and k > 1 else None),
            "repetition_penalty": req.repetition_penalty,
            "source_repetition_penalty": req.source_repetition_penalty,
            "source_no_repeat_ngram_size": req.source_no_repeat_ngram_size,
            "seed": req.seed,
            "max_new_tokens": min(req.max_new_tokens or served.gen.max_new_tokens, cap),
        }
        try:
            return dataclasses.replace(served.gen, **{k_: v for k_, v in opts.items() if v is not None})
        except ConfigError as e:
            raise HTTPException(422, str(e).replace("generation.", "")) from e

    # -- the shared batch --------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_batch_cost)
    async def _generate(self, items: list[_Item]) -> list[list[str] | Exception]:
        """Rows of any prompts, grouped only by decoding options; a failing group never fails the others."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._gen_pool, self._run_batch, items)
        # Closed-loop callers resend the moment their batch returns; a fixed 10 ms wait then starts the next
        # batch without them and the callers split into convoys of half-size batches. Waiting a small share of
        # the last batch's time lets them rejoin, costing at most that share of throughput.
        s = self.settings
        wait = min(s.batch_wait_max_s, s.batch_wait_fraction * (time.perf_counter() - t0))
        self._batch_wait = max(s.batch_wait_timeout_s, wait)
        self._generate.set_batch_wait_timeout_s(self._batch_wait)
        return out

    def _run_batch(self, items: list[_Item]) -> list[list[str] | Exception]:
        from .generate import generate_rows

        t0 = time.perf_counter()
        groups: dict[GenerationConfig, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.gen, []).append(i)
        out: list[list[str] | Exception] = [[] for _ in items]
        for gen, idx in groups.items():
            self.batch_sizes[len(idx)] += 1
            self.stats["batches"] += 1
            self.stats["batch_rows"] += len(idx)
            self.stats["mixed_prompt_batches"] += len({items[i].prompt for i in idx}) > 1
            try:
                for i, cands in zip(
                    idx, generate_rows(self.loaded, [items[i].row for i in idx], gen), strict=True
                ):
                    out[i] = cands
            except Exception:  # retry one row at a time so one bad row cannot fail its neighbours
                for i in idx:
                    try:
                        out[i] = generate_rows(self.loaded, [items[i].row], gen)[0]
                    except Exception as e:
                        out[i] = e
        self.stats["gen_s"] += time.perf_counter() - t0
        return out

    async def _rerank(self, results: list[ParaphraseResult]) -> None:
        """Score every candidate (adequacy, novelty); the best non-copy, non-empty candidate comes first."""
        from .metrics import load_embedder, score_rows

        def score():
            if self._embedder is None:
                self._embedder = load_embedder(self.settings.embedder, device=str(self.loaded.device))
            srcs = [r.text for r in results for _ in r.candidates]
            cands = [c for r in results for c in r.candidates]
            return score_rows(srcs, None, cands, self._embedder)

        scores = iter(await asyncio.get_running_loop().run_in_executor(self._score_pool, score))
        for r in results:
            pairs = [(c, next(scores)) for c in r.candidates]
            pairs.sort(key=lambda cs: (cs[1].copy or cs[1].empty, -cs[1].objective))
            r.candidates = [c for c, _ in pairs]
            r.paraphrase = r.candidates[0]
            r.scores = [
                CandidateScore(
                    adequacy=round(x.adequacy, 4),
                    self_bleu=round(x.self_bleu, 2),
                    objective=round(x.objective, 4),
                    copy=x.copy,
                )
                for _, x in pairs
            ]


# -- building and running ----------------------------------------------------------------------------------------
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


def start_local(
    address: str | None = None, num_cpus: int | None = None, port: int = 8000, host: str = "127.0.0.1"
) -> None:
    """Connect to ``address`` or start a fresh local Ray (never someone else's), then Serve on host:port."""
    import ray

    if not ray.is_initialized():
        kwargs = (
            {"address": address}
            if address
            else {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
        )
        ray.init(**kwargs, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})


def run_local(
    settings: ServeSettings, host: str, port: int, address: str | None = None, device: str = "auto"
) -> str:
    """Deploy ``settings`` on a local (or given) Ray; returns the base URL once the app is ready."""
    import ray

    start_local(address, port=port, host=host)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if address is None else 1
    gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    serve.run(
        build_app(settings, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}),
        name=APP_NAME,
        route_prefix="/",
    )
    return f"http://{host}:{port}"


def shutdown(local: bool = True) -> None:
    """Local Ray: stop Serve and Ray. A shared cluster: delete only this application."""
    import ray

    if not ray.is_initialized():
        return
    try:
        serve.shutdown() if local else serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def cmd_serve(args) -> int:
    """``paraphrase-ray serve``: run in the foreground until Ctrl-C (also during start-up), then clean up."""
    key = args.api_key or os.environ.get(ENV_API_KEY) or None
    settings = ServeSettings(prompts=tuple(args.prompt), device=args.device, api_key=key)
    names = [n for n, _ in parse_prompt_specs(settings.prompts)]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(
            f"warning: binding {args.host} without an API key; anyone who can reach it may use it "
            f"(set --api-key or {ENV_API_KEY})"
        )
    try:
        url = run_local(settings, args.host, args.port, args.address, args.device)
        print(
            f"serving prompts {', '.join(names)} (default {names[0]}; also {ZERO_SHOT!r}) at {url}  "
            f"docs: {url}/docs  auth: {'on' if key else 'off'}  (Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        shutdown(local=args.address is None)
    return 0


def demo(prompt_dirs: list[str], port: int = 0, texts: list[str] | None = None) -> int:
    """Deploy the prompts, ask every prompt (and zero-shot) at once over HTTP, print the answers, shut down."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    texts = texts or [
        "The committee approved the new budget after a long debate.",
        "She could not attend the meeting because her flight was delayed.",
    ]
    url = run_local(ServeSettings(prompts=tuple(prompt_dirs)), "127.0.0.1", port)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            info = client.get("/prompts").json()
            names = [p["name"] for p in info["prompts"]]
            print(f"serving {', '.join(names)} on {info['base_model']} at {url}")

            def ask(name: str) -> dict:  # concurrent requests: their rows share one forward pass
                r = client.post("/paraphrase", json={"texts": texts, "prompt": name})
                r.raise_for_status()
                return r.json()

            with ThreadPoolExecutor(len(names)) as pool:
                for answer in pool.map(ask, names):
                    print(f"[{answer['prompt']}]")
                    for res in answer["results"]:
                        print(f"  {res['text']}\n    -> {res['paraphrase']}")
            st = client.get("/stats").json()
            print(
                f"{st['rows']} rows in {st['batches']} forward passes ({st['mixed_prompt_batches']} mixed-prompt)"
            )
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    from paraphrase_ray import serving  # the importable module, so Ray pickles classes by reference

    parser = argparse.ArgumentParser(
        description="Deploy prompts with Ray Serve, ask once over HTTP, shut down."
    )
    parser.add_argument("--demo", nargs="+", required=True, metavar="[NAME=]DIR", help="prompt directories")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    ns = parser.parse_args()
    sys.exit(serving.demo(ns.demo, ns.port))
