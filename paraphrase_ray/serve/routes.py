"""The Serve app's HTTP face: a FastAPI app built per application from its ``ServeSettings``.

Built on the replica (``serve.ingress`` with a builder function), so the request schema carries this app's
limits (``protocol.request_model``) and ``/openapi.json`` states exactly what the server enforces. Routes
are plain functions that call the replica serving the request (``replica()``); the work is in ``deployments.py``.

Auth: when an API key is set, every data route needs ``Authorization: Bearer KEY``. The key is an OpenAPI
security scheme (``HTTPBearer``), so ``/docs`` shows an Authorize button; ``/healthz``, the playground ``/``,
``/docs`` and ``/openapi.json`` stay open. The middleware checks the key before the body is read.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from paraphrase_ray.serve.guard import UNAUTHORIZED, Guard, key_ok
from paraphrase_ray.serve.protocol import (
    PROMPT_NAME_PATTERN,
    ParaphraseResponse,
    ServeSettings,
    request_model,
)

PLAYGROUND_PATH = Path(__file__).parent / "resources" / "playground.html"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (``texts[1]: ...``); 413 when the only problems are size limits."""
    msgs, size_only = [], True
    for err in exc.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.get("loc", ()) if x != "body")
        loc, kind, ctx = loc.lstrip(".") or "body", err.get("type", ""), err.get("ctx") or {}
        if kind == "too_long" and loc == "texts":
            msgs.append(f"texts: {ctx.get('actual_length')} texts exceed the limit of {ctx.get('max_length')} per request")
        elif kind == "string_too_long" and loc.startswith("text"):
            msgs.append(f"{loc}: {len(err.get('input', ''))} characters exceed the limit of {ctx.get('max_length')}")
        else:
            size_only = False
            if loc == "prompt" and kind in ("string_too_long", "string_pattern_mismatch"):
                msgs.append("prompt: a name is 1-64 letters, digits, '_', '.' or '-' (GET /prompts lists them)")
            elif kind in ("string_too_short", "string_pattern_mismatch"):
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

    api.add_middleware(Guard, replica=replica)  # host, key, content type, body size, error ids (guard.py)

    @api.exception_handler(RequestValidationError)
    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 ``{"status": "ok"}``, or 503 with the reason Serve's health check fails too (never queued behind
        generation: the ingress reads what the model replicas post, ``health.py``)."""
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
        name: Annotated[str, PathParam(max_length=64, pattern=PROMPT_NAME_PATTERN)], top_k: Annotated[int, Query(ge=1, le=50)] = 5, metric: Literal["cosine", "l2"] = "cosine"
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
            413: {"description": "too many texts, a text too long, a body over 1 MiB, or more work than "
                   "max_request_work (see GET /prompts for the limits)"},
            415: {"description": "the body is not sent as application/json"},
            503: {"description": "queue full (texts or work) or replica restarting: retry after Retry-After"},
            504: {"description": "not answered within the server's request timeout (generation stopped)"},
        },
    )
    async def paraphrase(req: body_model) -> ParaphraseResponse:  # type: ignore[valid-type]
        """Paraphrases in input order; every row joins the shared cross-prompt batch."""
        return await replica().paraphrase(req)

    return api
