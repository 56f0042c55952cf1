"""The Serve app's HTTP face: a FastAPI app built per application from its ``ServeSettings``.

Built on the replica (``serve.ingress`` with a builder function), so the request schema carries this app's
limits (``protocol.request_model``) and ``/openapi.json`` states exactly what the server enforces. Routes
are plain functions that call the replica serving the request (``replica()``); the work is in ``deployments.py``.

Auth: when an API key is set, every data route needs ``Authorization: Bearer KEY``. The key is an OpenAPI
security scheme (``HTTPBearer``), so ``/docs`` shows an Authorize button; ``/healthz``, the playground ``/``,
``/docs`` and ``/openapi.json`` stay open. The middleware checks the key before the body is read.
"""

import hmac
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from paraphrase_ray.serve.protocol import ParaphraseResponse, ServeSettings, request_model

log = logging.getLogger("paraphrase_ray")
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
OPEN_PATHS = frozenset({"/healthz", "/"}) | DOC_PATHS  # never need the key, never counted
MAX_BODY_BYTES = 1 << 20
PLAYGROUND_PATH = Path(__file__).parent / "resources" / "playground.html"
_EXPLAIN = re.compile(r"^/prompts/[^/]+/explain$")
UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer KEY'"


def key_ok(given: str | None, key: str | None) -> bool:
    """Constant-time comparison; no key configured means open."""
    return not key or (given is not None and hmac.compare_digest(given.strip().encode(), key.encode()))


def route_label(path: str) -> str:
    """A bounded set of metric labels: the route template, or 'other' (unknown paths, probes)."""
    if path in ("/paraphrase", "/prompts", "/stats"):
        return path
    return "/prompts/{name}/explain" if _EXPLAIN.match(path) else "other"


def busy(detail: str, retry_after_s: float) -> HTTPException:
    """503 with ``Retry-After`` (whole seconds, at least 1)."""
    return HTTPException(503, detail, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (``texts[1]: ...``); 413 when the only problems are size limits."""
    msgs, size_only = [], True
    for err in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()) if x != "body")
        loc, kind, ctx = loc.lstrip(".") or "body", err.get("type", ""), err.get("ctx") or {}
        if kind == "too_long" and loc == "texts":
            msgs.append(f"texts: {ctx.get('actual_length')} texts exceed the limit of {ctx.get('max_length')} per request")
        elif kind == "string_too_long":
            msgs.append(f"{loc}: {len(err.get('input', ''))} characters exceed the limit of {ctx.get('max_length')}")
        else:
            size_only = False
            if kind in ("string_too_short", "string_pattern_mismatch"):
                msgs.append(f"{loc}: empty or whitespace-only text")
            elif kind == "too_short" and loc == "texts":
                msgs.append("texts: empty list; give at least one text")
            else:
                msgs.append(f"{loc}: {err.get('msg', 'invalid')}")
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(msgs), "errors": errors}, status_code=413 if size_only else 422)


def make_api(settings: ServeSettings, replica: Callable[[], Any]) -> FastAPI:
    """The FastAPI app for one Serve application; ``replica()`` returns the replica serving the request."""
    body_model = request_model(settings)
    api = FastAPI(
        title="paraphrase-ray",
        summary="One frozen causal LM, many soft prompts, batched across prompts.",
        version="0.1.0",
    )
    bearer = HTTPBearer(
        auto_error=False, scheme_name="APIKey", description="the server's API key (--api-key or PARAPHRASE_RAY_API_KEY)"
    )

    def require_key(cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        if not key_ok(cred.credentials if cred else None, replica().api_key):
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    keyed = [Depends(require_key)]

    @api.middleware("http")
    async def guard(request: Request, call_next):
        """Key and body size before the body is read; every response on a data path counted by status."""
        path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if path in OPEN_PATHS:
            return await call_next(request)
        rep, label = replica(), route_label(path)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        length = request.headers.get("content-length", "")
        if not key_ok(given if scheme.lower() == "bearer" else None, rep.api_key):
            response = JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        elif length.isdigit() and int(length) > MAX_BODY_BYTES:
            response = JSONResponse({"detail": f"request body over the limit of {MAX_BODY_BYTES} bytes"}, status_code=413)
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # never a bare 500: say what failed
                log.exception("unhandled error on %s", path)
                response = JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        rep.metrics.response(label, response.status_code)
        return response

    @api.exception_handler(RequestValidationError)
    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 ``{"status": "ok"}``, or 503 with the reason Serve's health check fails too."""
        problem = await replica().health_problem()
        if problem:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        """The self-contained playground page (no build step, no CDN)."""
        return HTMLResponse(PLAYGROUND_PATH.read_text(encoding="utf-8"))

    @api.get("/prompts", dependencies=keyed)
    async def list_prompts() -> dict[str, Any]:
        """Served prompts with what was recorded at export, and the request limits."""
        return await replica().list_prompts()

    @api.get("/prompts/{name}/explain", dependencies=keyed)
    async def explain(
        name: str, top_k: Annotated[int, Query(ge=1, le=50)] = 5, metric: Literal["cosine", "l2"] = "cosine"
    ) -> dict[str, Any]:
        """Nearest vocabulary tokens of each prompt vector, and norms (see ``paraphrase-ray explain``)."""
        return await replica().explain(name, top_k, metric)

    @api.get("/stats", dependencies=keyed)
    async def stats() -> dict[str, Any]:
        """A model replica's counters and this ingress's responses (``ray.serve.metrics`` has all replicas')."""
        return await replica().stats()

    @api.post(
        "/paraphrase",
        dependencies=keyed,
        response_model=ParaphraseResponse,
        response_model_by_alias=True,
        responses={
            413: {"description": "too many texts, or a text too long (see GET /prompts for the limits)"},
            503: {"description": "queue full or replica restarting: retry after the Retry-After seconds"},
            504: {"description": "not answered within the server's request timeout"},
        },
    )
    async def paraphrase(req: body_model) -> ParaphraseResponse:  # type: ignore[valid-type]
        """Paraphrases in input order; every row joins the shared cross-prompt batch."""
        return await replica().paraphrase(req)

    return api
