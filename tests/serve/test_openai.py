"""The OpenAI-compatible schema and the prompt store, without Ray: translation to the /paraphrase body, the
unsupported-parameter 400s, the error shape, and the store's listing, LRU, freshness and base-model check on the
tiny random OPT (a real forward pass through ``generate``). The live server: test_openai_serve.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from fastapi import HTTPException
from serve_helpers import TEXTS, make_prompt

from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.serve import openai
from paraphrase_ray.serve.protocol import ServeSettings, request_model
from paraphrase_ray.serve.store import PromptStore, same_base


@pytest.fixture(scope="module")
def body_model(serve_prompt_dirs):
    return request_model(ServeSettings(prompts=(str(serve_prompt_dirs["a"]),), max_texts=3, max_new_tokens=16))


def _raises(status: int, needle: str, fn, *args):
    with pytest.raises(HTTPException) as e:
        fn(*args)
    assert e.value.status_code == status and needle in e.value.detail, (e.value.status_code, e.value.detail)
    return e.value.detail


def test_completion_and_chat_requests_become_paraphrase_bodies(body_model):
    req = openai.CompletionRequest(model="sweeps/q/best", prompt=TEXTS[:2], n=3, max_tokens=8, temperature=0.7,
                                   seed=4, user="u1", logprobs=None, frequency_penalty=0, stop=None)
    assert openai.to_paraphrase(req, body_model) == {
        "texts": TEXTS[:2], "prompt": "sweeps/q/best", "num_candidates": 3, "rerank": False, "temperature": 0.7,
        "max_new_tokens": 8, "seed": 4,
    }
    chat = openai.ChatCompletionRequest(model="a", temperature=0, max_completion_tokens=5, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}])
    body = openai.to_paraphrase(chat, body_model)
    assert body["texts"] == [TEXTS[0]] and body["do_sample"] is False and body["max_new_tokens"] == 5
    assert "temperature" not in body


def test_unsupported_and_invalid_parameters_are_400s_naming_them(body_model):
    req = openai.CompletionRequest(model="a", prompt="hi", logprobs=3, tools=[{"type": "function"}], colour="red")
    detail = _raises(400, "not supported", openai.to_paraphrase, req, body_model)
    assert detail.startswith("colour, logprobs, tools:"), detail
    _raises(400, "n:", openai.to_paraphrase, openai.CompletionRequest(model="a", prompt="hi", n=2, temperature=0),
            body_model)
    _raises(400, "temperature", openai.to_paraphrase,
            openai.CompletionRequest(model="a", prompt="hi", temperature=0.01), body_model)
    # the server's limits (request_model) hold, named by OpenAI's parameter names
    # the server's limits (request_model) hold; the HTTP error handler names them as OpenAI does (param_and_message)
    _raises(400, "max_new_tokens:", openai.to_paraphrase,
            openai.CompletionRequest(model="a", prompt="hi", max_tokens=17), body_model)
    _raises(413, "texts:", openai.to_paraphrase, openai.CompletionRequest(model="a", prompt=["hi"] * 4), body_model)
    _raises(400, "texts[1]: empty", openai.to_paraphrase, openai.CompletionRequest(model="a", prompt=["ok", " "]),
            body_model)
    no_user = openai.ChatCompletionRequest(model="a", messages=[{"role": "system", "content": "x"}])
    _raises(400, "no user message", openai.to_paraphrase, no_user, body_model)
    image = openai.ChatCompletionRequest(model="a", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    _raises(400, "text content", openai.to_paraphrase, image, body_model)


def test_error_shape_and_responses():
    assert openai.error_body(404, "unknown model 'x'") == {"error": {
        "message": "unknown model 'x'", "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    assert openai.param_and_message("texts[1]: empty or whitespace-only text") == (
        "prompt", "prompt[1]: empty or whitespace-only text")
    assert openai.param_and_message("num_candidates: 9 > num_beams") == ("n", "n: 9 > num_beams")
    assert openai.param_and_message("server busy: queue full") == (None, "server busy: queue full")
    assert openai.param_and_message("logprobs: not supported") == ("logprobs", "logprobs: not supported")
    assert openai.param_and_message("colour, tools: not supported")[0] is None
    answer = {"replica": "r1", "prompt": "a", "texts": 2, "results": [
        {"index": 1, "text": "t1", "candidates": ["x", "y"], "scores": None, "prompt_tokens": 7,
         "completion_tokens": [4, 2], "max_new_tokens": 4},
        {"index": 0, "text": "t0", "candidates": ["u", "v"], "scores": None, "prompt_tokens": 5,
         "completion_tokens": [1, 1], "max_new_tokens": 4}]}
    out = openai.response("text", "a", answer, n=2)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [
        (0, "u", "stop"), (1, "v", "stop"), (2, "x", "length"), (3, "y", "stop")]
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
    assert out["choices"][2]["paraphrase_ray"]["source"] == "t1" and out["system_fingerprint"] == "r1"
    chat = openai.response("chat", "a", answer, n=2)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"] == {"role": "assistant", "content": "u"}


# -- the store ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def store_dir(tmp_path, tiny_model_dir, tiny):
    root = tmp_path / "store"
    make_prompt(root / "sweeps" / "q" / "best", tiny_model_dir, tiny, seed=3)
    make_prompt(root / "one", tiny_model_dir, tiny, seed=4)
    make_prompt(root / ".staging" / "half", tiny_model_dir, tiny, seed=5)  # a hidden dir (publish_dir's temp)
    (root / "notes").mkdir()
    return root


def test_store_lists_loads_caches_and_serves_fresh_weights(store_dir, tiny_model_dir, tiny):
    from paraphrase_ray.generation.generate import paraphrase

    store = PromptStore(str(store_dir), str(tiny_model_dir), tiny.embed_dim, capacity=1)
    assert store.names() == ["one", "sweeps/q/best"]
    listed = {p["name"]: p for p in store.listing()}
    assert listed["one"]["servable"] and listed["one"]["metrics"] == {"objective": pytest.approx(0.4)}
    best = store.get("sweeps/q/best")
    assert store.get("sweeps/q/best") is best and store.counts["hits"] == 1  # unchanged: the loaded copy
    assert store.summary()["load_ms_last"] is not None
    store.get("one")  # capacity 1: evicts sweeps/q/best
    assert store.counts["evictions"] == 1 and store.get("sweeps/q/best") is not best and store.counts["loads"] == 3

    def run(served):
        return paraphrase(tiny, TEXTS[:2], served.prompt, served.template, served.generation)

    before = run(store.get("one"))
    new = SoftPrompt(torch.randn(4, tiny.embed_dim) * 2.0)  # new weights written over the same directory
    new.save(store_dir / "one", str(tiny_model_dir), tiny.model, {"generation": {"max_new_tokens": 12}})
    fresh = store.get("one")
    assert torch.equal(fresh.prompt.weight.cpu(), new.weight) and store.counts["reloads"] == 1
    after = run(fresh)
    assert after != before  # the new weights were generated with (the prefix cache keyed by their values)
    assert after == paraphrase(tiny, TEXTS[:2], new, fresh.template, fresh.generation)
    with pytest.raises(HTTPException) as e:
        store.get("nope/missing")
    assert e.value.status_code == 404 and "prompt store" in e.value.detail
    for bad in ("../one", "/etc", ".staging/half", "a//b"):
        with pytest.raises(HTTPException):
            store.get(bad)


def test_store_refuses_a_prompt_for_another_base_model_naming_both(store_dir, tiny_model_dir, tiny):
    other = store_dir / "gemma" / "p"
    SoftPrompt(torch.randn(3, tiny.embed_dim)).save(other, "gemma3-270m")
    store = PromptStore(str(store_dir), str(tiny_model_dir), tiny.embed_dim)
    with pytest.raises(HTTPException) as e:
        store.get("gemma/p")
    assert e.value.status_code == 422
    assert "'gemma3-270m'" in e.value.detail and repr(str(tiny_model_dir)) in e.value.detail, e.value.detail
    assert {p["name"]: p["servable"] for p in store.listing()}["gemma/p"] is False
    wide = store_dir / "wide"
    SoftPrompt(torch.randn(3, tiny.embed_dim + 1)).save(wide, str(tiny_model_dir))
    with pytest.raises(HTTPException) as e:
        store.get("wide")
    assert e.value.status_code == 422 and "wide" in e.value.detail
    assert same_base("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct") and not same_base(None, "x")


def test_store_in_a_bucket(store_dir, tiny_model_dir, tiny, tmp_path):
    from gcs_emulator import GcsEmulator

    from paraphrase_ray.storage import publish_files

    with GcsEmulator(bucket="prompts") as gcs:
        fs = gcs.fs()
        for rel in ("sweeps/q/best", "one"):
            files = {f.name: f.read_bytes() for f in (store_dir / rel).iterdir()}
            publish_files(fs, f"prompts/store/{rel}", files)
        store = PromptStore(gcs.uri("store"), str(tiny_model_dir), tiny.embed_dim)
        assert store.names() == ["one", "sweeps/q/best"]
        served = store.get("sweeps/q/best")
        assert torch.equal(served.prompt.weight, SoftPrompt.load(store_dir / "sweeps/q/best").weight)
        assert store.get("sweeps/q/best") is served
        shutil.rmtree(store_dir / "one")
        make_prompt(store_dir / "one", tiny_model_dir, tiny, seed=9)  # a new version, published over the old
        publish_files(fs, "prompts/store/one", {f.name: f.read_bytes() for f in (store_dir / "one").iterdir()})
        assert torch.equal(store.get("one").prompt.weight, SoftPrompt.load(store_dir / "one").weight)
