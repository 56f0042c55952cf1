"""The OpenAI-compatible face of the Serve app: request schema, translation to ``ParaphraseRequest``, responses.

Every served prompt is a model (``model`` = its name, a path under the prompt store, or ``zero-shot``):

    POST /v1/completions        prompt: a string or a list of strings, one paraphrase (x n) each
    POST /v1/chat/completions   the last user message is the text to paraphrase (earlier messages are ignored)
    GET  /v1/models             every servable prompt, with its base model and recorded metrics

Options: ``n`` (candidates, as ``num_candidates``), ``max_tokens`` (``max_completion_tokens`` in chat),
``temperature`` (0: greedy; left out: the prompt's recorded decoding), ``top_p``, ``seed``, ``stream``
(``stream_options.include_usage``), ``user`` (accepted, unused). Extras: ``rerank`` (score the candidates; the best
comes first) in the request; ``paraphrase_ray`` on each choice (``source``: the text paraphrased, ``score``: its
rerank scores with the fact report). ``usage`` counts tokens the model read (soft prompt + template + text) and
the returned texts' tokens. A parameter of the OpenAI API this server cannot honour (``logprobs``, ``tools``,
``stop``...) with a value other than its neutral default is a 400 naming it. Errors come as
``{"error": {"message", "type", "param", "code"}}``. No Ray here.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from paraphrase_ray.serve.protocol import MAX_CANDIDATES, MAX_SEED, MODEL_NAME_MAX, MODEL_NAME_PATTERN

# OpenAI parameters we accept only with their neutral value (what clients send by default)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "stop": (None, [], ""), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}), "metadata": (None, {}), "store": (None, False),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
}
# our field -> the OpenAI parameter an error about it names
PARAMS = {"text": "prompt", "texts": "prompt", "num_candidates": "n", "max_new_tokens": "max_tokens", "prompt": "model"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error", 504: "timeout"}
ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 503: "server_busy",
               504: "timeout"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Options(BaseModel):
    """What both routes take. Unknown keys are kept (``extra="allow"``) so ``unsupported`` can name them."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN,
                       description="a prompt's name or store path, or 'zero-shot' (GET /v1/models)")
    n: int = Field(1, ge=1, le=MAX_CANDIDATES, description="candidates per text (sampled unless beams are recorded)")
    max_tokens: int | None = Field(None, ge=1, description="at most the server's max_new_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; otherwise 0.05-2 (sampled)")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted, not used")
    rerank: bool = Field(False, description="extra: score every candidate, the best comes first (choice.paraphrase_ray.score)")


class CompletionRequest(_Options):
    """``POST /v1/completions``: each string of ``prompt`` is a text to paraphrase."""

    prompt: str | list[str] = Field(..., description="a text, or a list of texts (n choices each, in order)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Options):
    """``POST /v1/chat/completions``: the last user message is the text to paraphrase."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object for ``status`` (``code``: a short name a client can switch on, or null)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
            "invalid_request_error"), "param": param, "code": ERROR_CODES.get(status)}}


def param_and_message(detail: str) -> tuple[str | None, str]:
    """Our detail ``"texts[1]: empty ..."`` -> (``"prompt"``, ``"prompt[1]: empty ..."``): OpenAI's names."""
    head, sep, rest = detail.partition(":")
    field = head.split("[")[0].strip()
    if not sep or " " in head.strip():
        return None, detail
    if field in PARAMS:
        return PARAMS[field], PARAMS[field] + head.strip()[len(field):] + sep + rest
    known = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields) | set(NEUTRAL)
    return (field, detail) if field in known else (None, detail)


def openai_status(status: int) -> int:
    """OpenAI answers a request it cannot process with 400 where we say 422."""
    return 400 if status == 422 else status


def unsupported(req: _Options) -> list[str]:
    """Parameters sent that this server cannot honour (an OpenAI one with a non-neutral value, or unknown)."""
    return sorted(k for k, v in (req.model_extra or {}).items() if k not in NEUTRAL or v not in NEUTRAL[k])


def chat_text(req: ChatCompletionRequest) -> str:
    """The last user message's text (string content, or its text parts joined)."""
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise HTTPException(400, "messages: no user message; the last user message is the text to paraphrase")
    content = user[-1].content
    if isinstance(content, list):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise HTTPException(400, "messages: only text content parts are supported ({'type': 'text', 'text': ...})")
        content = "".join(p["text"] for p in content)
    return content or ""


def to_paraphrase(req: _Options, body_model: type[BaseModel]) -> dict[str, Any]:
    """The ``/paraphrase`` body this request means, validated against the server's limits (``body_model``)."""
    bad = unsupported(req)
    if bad:
        raise HTTPException(400, f"{', '.join(bad)}: not supported by this server (it paraphrases; supported: "
                                 f"{', '.join(sorted(_Options.model_fields))} and prompt / messages)")
    if isinstance(req, ChatCompletionRequest):
        texts, max_tokens = [chat_text(req)], req.max_completion_tokens or req.max_tokens
    else:
        assert isinstance(req, CompletionRequest)
        texts, max_tokens = ([req.prompt] if isinstance(req.prompt, str) else list(req.prompt)), req.max_tokens
    body: dict[str, Any] = {"texts": texts, "prompt": req.model, "num_candidates": req.n, "rerank": req.rerank}
    temp = req.temperature
    if temp == 0:
        if req.n > 1:
            raise HTTPException(400, "n: more than one choice needs temperature > 0 (0 is greedy: one answer)")
        body["do_sample"] = False
    elif temp is not None:
        if temp < 0.05:
            raise HTTPException(400, "temperature: 0 (greedy) or between 0.05 and 2")
        body["temperature"] = temp
    for ours, theirs in (("max_new_tokens", max_tokens), ("top_p", req.top_p), ("seed", req.seed)):
        if theirs is not None:
            body[ours] = theirs
    try:
        return body_model.model_validate(body).model_dump(exclude_unset=True)
    except ValidationError as e:
        # our field names (texts[1], max_new_tokens): the routes' error handler names OpenAI's (param_and_message)
        err = e.errors()[0]
        loc = [x for x in err.get("loc", ()) if x != "body"]
        where = (str(loc[0]) if loc else "body") + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        kind = err.get("type", "")
        msg = "empty or whitespace-only text" if kind in ("string_pattern_mismatch", "string_too_short") else err.get("msg")
        raise HTTPException(413 if kind in ("too_long", "string_too_long") else 400, f"{where}: {msg}") from None


# -- responses ----------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def choice(kind: str, index: int, text: str, finish: str | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    if extra is not None:
        out["paraphrase_ray"] = extra
    return out


def result_choices(kind: str, result: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The choices of one text's result (``ParaphraseModel`` answer rows): index = text index x n + candidate."""
    scores = result.get("scores") or [None] * len(result["candidates"])
    return [
        choice(kind, result["index"] * n + j, c, "length" if k >= result["max_new_tokens"] else "stop",
               {"source": result["text"], "score": s})
        for j, (c, k, s) in enumerate(zip(result["candidates"], result["completion_tokens"], scores, strict=True))
    ]


def usage(results: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(sum(r["completion_tokens"]) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(kind: str, model: str, answer: dict[str, Any], n: int) -> dict[str, Any]:
    """The whole (non-streamed) response to a completion or chat completion."""
    results = sorted(answer["results"], key=lambda r: r["index"])
    return {
        "id": new_id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model, "system_fingerprint": answer["replica"],
        "choices": [c for r in results for c in result_choices(kind, r, n)], "usage": usage(results),
    }


def chunk(kind: str, head: dict[str, Any], choices: list[dict[str, Any]], usage_: dict | None = None) -> str:
    """One server-sent event: ``data: {chunk}`` and a blank line."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    doc: dict[str, Any] = {**head, "object": obj, "choices": choices}
    if usage_ is not None:
        doc["usage"] = usage_
    return f"data: {json.dumps(doc)}\n\n"


def stream_choices(kind: str, result: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A finished text's choices as stream deltas: its whole text and finish reason in one chunk per choice."""
    out = []
    for c in result_choices(kind, result, n):
        if kind == "chat":
            c["delta"] = {"content": c.pop("message")["content"]}
        out.append(c)
    return out


def role_choices(n_choices: int) -> list[dict[str, Any]]:
    """The first chat chunk: each choice's role, sent as soon as the request is admitted."""
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
            for i in range(n_choices)]


DONE = "data: [DONE]\n\n"


def model_list(info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/models`` from ``GET /prompts``: the served prompts, zero-shot, and the store's servable prompts."""
    data = [
        {"id": p["name"], "object": "model", "created": 0, "owned_by": "paraphrase-ray", "source": "args",
         "base_model": p["base_model"], "metrics": p["metrics"], "default": p["default"]}
        for p in info["prompts"]
    ]
    data += [
        {"id": p["name"], "object": "model", "created": 0, "owned_by": "paraphrase-ray", "source": "store",
         "base_model": p["base_model"], "metrics": p["metrics"], "default": False}
        for p in (info.get("store") or {}).get("prompts", []) if p["servable"]
    ]
    return {"object": "list", "data": data}
