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
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from paraphrase_ray.serve import openai
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
                msgs.append("prompt: a name is 1-64 letters, digits, '_', '.' or '-', or such names joined by '/' "
                            "for a store path (GET /prompts lists them)")
            elif kind in ("string_too_short", "string_pattern_mismatch"):
                msgs.append(f"{loc}: empty or whitespace-only text")
            elif kind == "too_short" and loc == "texts":
                msgs.append("texts: empty list; give at least one text")
            else:
                msgs.append(f"{loc}: {err.get('msg', 'invalid')}")
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(msgs), "errors": errors}, status_code=413 if size_only else 422)


def _openai_validation_response(exc: RequestValidationError) -> JSONResponse:
    """The OpenAI routes' schema errors: 400 with the OpenAI error object naming the parameter."""
    err = exc.errors()[0]
    loc = [x for x in err.get("loc", ()) if x != "body"]
    param = ".".join(str(x) for x in loc) or None
    return JSONResponse(openai.error_body(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param), status_code=400)


def _openai_error(exc: StarletteHTTPException) -> JSONResponse:
    param, message = openai.param_and_message(str(exc.detail))
    status = openai.openai_status(exc.status_code)
    return JSONResponse(openai.error_body(status, message, param), status_code=status, headers=exc.headers)


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
        if request.url.path.startswith("/v1/"):
            return _openai_validation_response(exc)
        return _validation_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # OpenAI's clients read {"error": {...}}
            return _openai_error(exc)
        return await http_exception_handler(request, exc)

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

    _add_openai_routes(api, replica, keyed, body_model)
    return api


OPENAI_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion; with stream=true, server-sent events ending with 'data: [DONE]'",
          "content": {"application/json": {}, "text/event-stream": {}}},
    400: {"description": "an invalid or unsupported parameter, named in error.param / error.message"},
    401: {"description": "missing or wrong API key"},
    404: {"description": "unknown model (GET /v1/models lists them)"},
    413: {"description": "more texts, characters or work than the server's limits (GET /prompts)"},
    503: {"description": "queue full or replica restarting: retry after Retry-After"},
}


def _add_openai_routes(api: FastAPI, replica: Callable[[], Any], keyed: list, body_model: type) -> None:
    """``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``openai.py``): the same key, limits,
    admission, batch and metrics as ``/paraphrase``, whose body ``openai.to_paraphrase`` makes of each request."""

    @api.get("/v1/models", dependencies=keyed, tags=["openai"])
    async def list_models() -> dict[str, Any]:
        """Every servable prompt as a model (plus ``zero-shot``), with its base model and recorded metrics."""
        return openai.model_list(await replica().list_prompts())

    @api.get("/v1/models/{model:path}", dependencies=keyed, tags=["openai"])
    async def get_model(model: str) -> dict[str, Any]:
        """One model of ``/v1/models``; a store prompt not yet listed is found by its path too."""
        found = [m for m in openai.model_list(await replica().list_prompts())["data"] if m["id"] == model]
        if not found:
            raise HTTPException(404, f"unknown model {model!r}; GET /v1/models lists them")
        return found[0]

    @api.post("/v1/completions", dependencies=keyed, tags=["openai"], response_model=None, responses=OPENAI_RESPONSES)
    async def completions(req: openai.CompletionRequest) -> Any:
        """One paraphrase (``n`` choices) per string of ``prompt``; ``stream`` sends each text once it is done."""
        return await replica().complete("text", req, openai.to_paraphrase(req, body_model))

    @api.post("/v1/chat/completions", dependencies=keyed, tags=["openai"], response_model=None,
              responses=OPENAI_RESPONSES)
    async def chat_completions(req: openai.ChatCompletionRequest) -> Any:
        """The last user message paraphrased (``n`` choices); ``stream`` sends the role at once, then the text."""
        return await replica().complete("chat", req, openai.to_paraphrase(req, body_model))
