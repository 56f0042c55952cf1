"""A real ``paraphrase-ray serve`` subprocess (its own local Ray, Serve on 127.0.0.1) driven by the official
``openai`` client: models, completions with n, streamed chat, the client's own error classes; greedy
``/v1/completions`` equal to ``/paraphrase``; the prompt store serving a prompt copied in while it runs (same
replica), fresh weights after an update, and a prompt for another base model refused naming both models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serve_helpers import TEXTS, make_prompt

from paraphrase_ray.prompt.soft_prompt import SoftPrompt

KEY = "openai-key-789"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(base URL, store dir, prompts dir, loaded tiny model): ``serve --prompt a=... --prompt-store STORE``."""
    from paraphrase_ray.models import load_model
    from paraphrase_ray.serve.runner import free_port

    tmp = tmp_path_factory.mktemp("openai-serve")
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    a = make_prompt(tmp / "fixed" / "a", tiny_model_dir, loaded, seed=1)
    store = tmp / "store"
    make_prompt(store / "sweeps" / "first" / "best", tiny_model_dir, loaded, seed=2)
    port, log_path = free_port(), tmp / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PARAPHRASE_RAY_API_KEY": KEY}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paraphrase_ray.cli.main", "serve", "--prompt", f"a={a}", "--prompt-store",
             str(store), "--port", str(port), "--device", "cpu"],
            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 300  # Ray and Serve start slowly on a busy 2-core machine
        while "serving prompts" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", store, tmp, loaded
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def _offline(loaded, prompt_dir, texts):
    """Greedy paraphrases of ``texts`` with the prompt at ``prompt_dir``, in this process (no server)."""
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.prompt.bundle import System, load_bundle

    served = System.from_bundle(load_bundle(prompt_dir))
    return [c[0] for c in paraphrase(loaded, texts, served.prompt, served.template, served.generation)]


def test_openai_client_models_completions_stream_and_errors(client, server):
    import openai

    models = {m.id: m for m in client.models.list().data}
    assert {"a", "zero-shot", "sweeps/first/best"} <= set(models), models
    assert models["sweeps/first/best"].model_extra["source"] == "store"
    assert models["a"].model_extra["metrics"] == {"objective": 0.1}
    assert models["a"].model_extra["base_model"] == models["sweeps/first/best"].model_extra["base_model"]

    out = client.completions.create(model="a", prompt=TEXTS[:2], n=3, seed=7, max_tokens=8)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.model_extra["paraphrase_ray"]["source"] for c in out.choices] == [TEXTS[0]] * 3 + [TEXTS[1]] * 3
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage.prompt_tokens > 2 * 4 and out.usage.completion_tokens > 0  # soft prompt (4) + template + text
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model="a", prompt=TEXTS[:2], n=3, seed=7, max_tokens=8)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # the seed reproduces

    t0 = time.perf_counter()
    chunks = []
    stream = client.chat.completions.create(
        model="sweeps/first/best", messages=[{"role": "user", "content": TEXTS[2]}], stream=True, max_tokens=12,
        stream_options={"include_usage": True})
    for ch in stream:
        chunks.append((time.perf_counter() - t0, ch))
    first, content = chunks[0][1], [c for _, c in chunks if c.choices and c.choices[0].delta.content]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert len(content) == 1 and chunks[0][0] <= chunks[-1][0]  # the role came first, on its own
    assert chunks[-1][1].usage.completion_tokens > 0
    whole = client.chat.completions.create(model="sweeps/first/best", max_tokens=12,
                                           messages=[{"role": "user", "content": TEXTS[2]}])
    assert content[0].choices[0].delta.content == whole.choices[0].message.content
    assert whole.choices[0].message.content == _offline(server[3], server[1] / "sweeps/first/best", [TEXTS[2]])[0]

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="hi", logprobs=2)
    assert e.value.body["param"] == "logprobs" and "not supported" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt=["ok", " "])
    assert e.value.body["param"] == "prompt" and "prompt[1]: empty" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens" and "128" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no/such/prompt", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    bad_key = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert "API key" in e.value.body["message"]


def test_raw_stream_ends_with_done_and_openapi_lists_the_routes(http):
    with http.stream("POST", "/v1/completions", json={"model": "a", "prompt": TEXTS[:2], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert events[-1] == "data: [DONE]" and len(events) == 3, events
    assert sorted(json.loads(e[6:])["choices"][0]["index"] for e in events[:-1]) == [0, 1]
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/paraphrase"} <= set(paths)
    assert paths["/v1/completions"]["post"]["security"] == [{"APIKey": []}]


def test_greedy_completions_equal_paraphrase(client, http, server):
    for model in ("a", "sweeps/first/best"):
        para = http.post("/paraphrase", json={"texts": TEXTS, "prompt": model})
        assert para.status_code == 200, para.text
        want = [r["paraphrase"] for r in para.json()["results"]]
        got = client.completions.create(model=model, prompt=TEXTS)
        assert [c.text for c in got.choices] == want, model
        greedy = client.completions.create(model=model, prompt=TEXTS, temperature=0)
        assert [c.text for c in greedy.choices] == want
    assert want != [r["paraphrase"] for r in http.post("/paraphrase", json={"texts": TEXTS}).json()["results"]]


def test_store_serves_new_and_updated_prompts_without_restart_and_refuses_other_bases(client, http, server,
                                                                                     tiny_model_dir):
    import openai

    _, store, tmp, loaded = server
    pid = http.get("/stats").json()["pid"]
    src = make_prompt(tmp / "later" / "new", tiny_model_dir, loaded, seed=5)
    shutil.copytree(src, store / "sweeps" / "second" / "best")  # written after the server started
    assert "sweeps/second/best" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="sweeps/second/best", prompt=TEXTS[:2])
    assert [c.text for c in got.choices] == _offline(loaded, src, TEXTS[:2])
    # new weights over the same path: served fresh on the next request, never the old prompt (nor its prefix cache)
    before = [c.text for c in got.choices]
    newer = SoftPrompt(torch.randn(4, loaded.embed_dim) * 3.0)
    newer.save(tmp / "later" / "newer", str(tiny_model_dir), loaded.model,
               {"generation": {"max_new_tokens": 12}, "train_config": {"precision": "fp32"}})
    for f in (tmp / "later" / "newer").iterdir():
        shutil.copy(f, store / "sweeps" / "second" / "best" / f.name)
    fresh = [c.text for c in client.completions.create(model="sweeps/second/best", prompt=TEXTS[:2]).choices]
    assert fresh == _offline(loaded, tmp / "later" / "newer", TEXTS[:2]) and fresh != before
    # rows of two store prompts (and a fixed one) share forward passes
    mixed0 = http.get("/stats").json()["mixed_prompt_batches"]
    for _ in range(20):
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda m: client.completions.create(model=m, prompt=TEXTS),
                          ["sweeps/first/best", "sweeps/second/best", "a"] * 2))
        if http.get("/stats").json()["mixed_prompt_batches"] > mixed0:
            break
    st = http.get("/stats").json()
    assert st["mixed_prompt_batches"] > mixed0
    assert st["pid"] == pid and st["prompt_store"]["loads"] >= 2 and st["prompt_store"]["reloads"] >= 1
    # a prompt for another base model: refused by name, never loaded, not listed as a model
    SoftPrompt(torch.randn(3, loaded.embed_dim)).save(store / "other-base", "smollm2-135m")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="other-base", prompt="hi")
    assert "'smollm2-135m'" in e.value.message and repr(str(tiny_model_dir)) in e.value.message, e.value.message
    assert "other-base" not in {m.id for m in client.models.list().data}
    listed = {p["name"]: p for p in http.get("/prompts").json()["store"]["prompts"]}
    assert listed["other-base"]["servable"] is False and listed["sweeps/second/best"]["servable"]
    assert http.get("/stats").json()["pid"] == pid
