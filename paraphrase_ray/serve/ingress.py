"""The HTTP ingress deployment (``ParaphraseAPI``): auth, schema and status counters; the work is the model's.

A separate deployment from the model (``deployments.ParaphraseModel``), so that when a model replica dies under a
request (SIGKILL, OOM, a failed health check) the caller gets a 503 with ``Retry-After`` instead of the proxy's
bare 500. The OpenAI routes' streams (``complete`` with ``stream``) are read from the model's ``answer_stream``
through a streaming handle: the first event arrives once the request is admitted (errors before it keep their HTTP
status), each text's choices as soon as that text is generated, then ``data: [DONE]``.
"""

# No `from __future__ import annotations`: FastAPI must see real annotation objects.
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from paraphrase_ray.config import from_dict
from paraphrase_ray.serve import health, openai
from paraphrase_ray.serve.admission import busy
from paraphrase_ray.serve.guard import internal_error
from paraphrase_ray.serve.metrics import ResponseMetrics
from paraphrase_ray.serve.protocol import ENV_API_KEY, ParaphraseRequest, ParaphraseResponse, ServeSettings

RESTART_RETRY_S = 2  # Retry-After when a model replica died under a request


class ParaphraseAPI:
    """The HTTP ingress (``routes.make_api``): auth, schema, status counters; the work is ``ParaphraseModel``'s."""

    def __init__(self, model, settings: dict[str, Any]):
        self.model = model  # DeploymentHandle of ParaphraseModel
        self.settings = s = from_dict(ServeSettings, settings)
        self.api_key = s.api_key or os.environ.get(ENV_API_KEY) or None
        self.metrics = ResponseMetrics()
        # the model answers 504 itself at request_timeout_s; this bounds a model replica that stopped answering
        self._timeout = s.request_timeout_s + 10 if s.request_timeout_s else None
        self._health = health.Reader(serve.get_replica_context().app_name)

    def http_error(self, e: BaseException, method: str, timeout: float | None) -> HTTPException:
        """A model replica's error as the HTTP error the caller gets; any other error is logged here with an id,
        and the caller gets only the id."""
        if isinstance(e, HTTPException):  # raised on the model replica: re-raise it plainly here
            cause = getattr(e, "cause", e)
            return HTTPException(cause.status_code, cause.detail, headers=cause.headers)
        if isinstance(e, BackPressureError):
            return busy("server busy: the model replicas' queues are full; retry after the Retry-After seconds",
                        e.retry_after_s or RESTART_RETRY_S)
        if isinstance(e, RayActorError):
            return busy(
                "the model replica stopped while serving this request and is being replaced; it changed nothing, "
                "so send the same request again after the Retry-After seconds",
                RESTART_RETRY_S,
            )
        if isinstance(e, asyncio.TimeoutError):
            return HTTPException(504, f"the model replica did not answer within {timeout:g} s")
        if isinstance(e, RayTaskError):  # its text names pids, node addresses, files and source lines
            _, detail = internal_error(f"the model replica's {method}", e)
            return HTTPException(500, detail)
        raise e

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``ParaphraseModel.<method>(*args)`` on a model replica, with its errors as HTTP errors."""
        timeout = timeout or self._timeout
        try:
            return await asyncio.wait_for(getattr(self.model, method).remote(*args), timeout)
        except (HTTPException, BackPressureError, RayActorError, asyncio.TimeoutError, RayTaskError) as e:
            raise self.http_error(e, method, timeout) from None

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

    # -- the OpenAI routes -----------------------------------------------------------------------------------------
    async def complete(self, kind: str, req: Any, body: dict[str, Any]) -> Any:
        """``/v1/completions`` (``kind`` "text") or ``/v1/chat/completions`` ("chat"): ``body`` is the
        ``/paraphrase`` body ``openai.to_paraphrase`` made of ``req``; a whole response, or a stream of events."""
        if not req.stream:
            return openai.response(kind, req.model, await self.call("answer", body), req.n)
        events = self.model.options(stream=True).answer_stream.remote(body)
        try:  # the first event: validated and admitted (or the request's error, with its status)
            first = await asyncio.wait_for(events.__anext__(), self._timeout)
        except (HTTPException, BackPressureError, RayActorError, asyncio.TimeoutError, RayTaskError) as e:
            events.cancel()
            raise self.http_error(e, "answer_stream", self._timeout) from None
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._sse(kind, req, first, events, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(self, kind: str, req: Any, first: dict[str, Any], events: Any, usage: bool) -> AsyncIterator[str]:
        head = {"id": openai.new_id(kind), "created": int(time.time()), "model": req.model,
                "system_fingerprint": first["replica"]}
        if kind == "chat":  # each choice's role at once: the client sees the answer start
            yield openai.chunk(kind, head, openai.role_choices(first["texts"] * req.n))
        results = []
        try:
            async for result in events:
                results.append(result)
                yield openai.chunk(kind, head, openai.stream_choices(kind, result, req.n))
        except (HTTPException, BackPressureError, RayActorError, asyncio.TimeoutError, RayTaskError) as e:
            err = self.http_error(e, "answer_stream", self._timeout)  # the status is sent: an error event instead
            yield f"data: {json.dumps(openai.error_body(err.status_code, str(err.detail)))}\n\n"
            return
        finally:
            events.cancel()  # the client left, or the stream ended: nothing more to read
        if usage:
            yield openai.chunk(kind, head, [], openai.usage(results))
        yield openai.DONE
