"""The ingress's ASGI guard: what every request passes before the routes, in this order.

1. ``Host``: a server without an API key answers only loopback hosts (127.0.0.1, localhost, [::1], any port)
   and ``ServeSettings.allowed_hosts``: 403 otherwise, so a web page cannot drive a local server through DNS
   rebinding. Every path, the open ones too.
2. the API key (``Authorization: Bearer KEY``) on every path but the open ones: 401.
3. a body-carrying method (POST, PUT, PATCH) needs ``Content-Type: application/json``: 415 (a page's plain
   form or ``fetch`` without it is not a CORS preflight, so this stops cross-site posts too).
4. the body: at most ``MAX_BODY_BYTES``, counted as it streams (a declared ``Content-Length`` over the limit
   is refused before reading; a chunked body is read only up to the limit): 413.
5. the routes; an exception no route turned into an HTTP error is logged with an error id, and the caller gets
   a generic 500 with that id (never the exception's text: a Ray error names pids, addresses and files).

Every response on a data path is counted by route and status (``metrics.ResponseMetrics``).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from paraphrase_ray.serve.openai import error_body, openai_status
from paraphrase_ray.serve.protocol import LOOPBACK_HOSTS

log = logging.getLogger("ray.serve")
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
OPEN_PATHS = frozenset({"/healthz", "/"}) | DOC_PATHS  # never need the key, never counted
MAX_BODY_BYTES = 1 << 20
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer KEY'"
_EXPLAIN = re.compile(r"^/prompts/[^/]+/explain$")


def key_ok(given: str | None, key: str | None) -> bool:
    """Constant-time comparison; no key configured means open."""
    return not key or (given is not None and hmac.compare_digest(given.strip().encode(), key.encode()))


def route_label(path: str) -> str:
    """A bounded set of metric labels: the route template, or 'other' (unknown paths, probes)."""
    if path in ("/paraphrase", "/prompts", "/stats", "/v1/models", "/v1/completions", "/v1/chat/completions"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/prompts/{name}/explain" if _EXPLAIN.match(path) else "other"


def error_payload(path: str, status: int, detail: str) -> dict[str, Any]:
    """``{"detail": ...}``, or on the OpenAI routes (``/v1/...``) the OpenAI error object their clients read."""
    return error_body(openai_status(status), detail) if path.startswith("/v1/") else {"detail": detail}


def host_name(host: str) -> str:
    """``Host`` header -> host name, lower case, without the port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    name = host_name(host or "")
    return bool(name) and ("*" in allowed or name in LOOPBACK_HOSTS or name in {h.lower() for h in allowed})


def error_id() -> str:
    return uuid.uuid4().hex[:12]


def internal_error(where: str, exc: BaseException | str) -> tuple[str, str]:
    """Log ``exc`` with a new error id; (id, what the caller is told)."""
    eid = error_id()
    log.error("error %s on %s: %s", eid, where, exc, exc_info=isinstance(exc, BaseException))
    return eid, f"internal error; the server logged it as error {eid}"


class Guard:
    """Pure ASGI middleware (``app.add_middleware(Guard, replica=...)``); ``replica()`` is the ingress replica
    (its ``api_key``, ``settings.allowed_hosts`` and ``metrics``)."""

    def __init__(self, app: Any, replica: Callable[[], Any]) -> None:
        self.app, self.replica = app, replica

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        rep = self.replica()
        if not rep.api_key and not host_allowed(headers.get("host"), rep.settings.allowed_hosts):
            detail = ("this server has no API key, so it answers only requests for a loopback host (127.0.0.1, "
                      "localhost, [::1]) or one of --allowed-hosts; use one of those, or set an API key")
            return await self._finish(rep, path, send, 403, detail)
        if path in OPEN_PATHS:
            return await self._call(scope, receive, send, path)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length", "")
        if not key_ok(given if scheme.lower() == "bearer" else None, rep.api_key):
            return await self._finish(rep, path, send, 401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        if scope.get("method") in BODY_METHODS and media != "application/json":
            return await self._finish(rep, path, send, 415, "send the body as JSON with 'Content-Type: application/json'")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await self._finish(rep, path, send, 413, f"request body over the limit of {MAX_BODY_BYTES} bytes")
        if scope.get("method") in BODY_METHODS:
            body = await _read_body(receive, MAX_BODY_BYTES)
            if body is None:
                return await self._finish(rep, path, send, 413, f"request body over the limit of {MAX_BODY_BYTES} bytes")
            receive = _replay(body, receive)
        status = await self._call(scope, receive, send, path)
        rep.metrics.response(route_label(path), status)

    async def _call(self, scope: dict, receive: Callable, send: Callable, path: str) -> int:
        """The app; its status (500 with an error id when it raised before answering)."""
        status = [0]

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:
            eid, detail = internal_error(path, e)
            if status[0]:
                raise  # the response had started: nothing better to send
            await _send_json(send, 500, {**error_payload(path, 500, detail), "error_id": eid})
            return 500
        return status[0]

    async def _finish(self, rep: Any, path: str, send: Callable, status: int, detail: str,
                      headers: dict[str, str] | None = None) -> None:
        await _send_json(send, status, error_payload(path, status, detail), headers)
        if path not in OPEN_PATHS:
            rep.metrics.response(route_label(path), status)


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that gives ``body`` once, then the original's messages (a disconnect)."""
    sent = [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Callable, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
