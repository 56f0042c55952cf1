"""Ray Serve application: config file keys, settings, and HTTP integration on a real local Ray.

The HTTP tests use the run's shared Serve app (conftest ``serve_app``: tiny random OPT; prompts a and b from
here, known and other for the playground; an API key from the replicas' environment); batching needs a real
Ray (``@serve.batch`` does not run in Serve's local testing mode).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from serve_helpers import KEY, TEXTS

from paraphrase_ray.config import GenerationConfig, TemplateConfig
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.serve.deployments import APP_NAME, DEPLOYMENT_NAME, INGRESS_NAME, app_builder
from paraphrase_ray.serve.protocol import ZERO_SHOT, ServeSettings, parse_prompt_specs

ROOT = Path(__file__).resolve().parents[2]
SERVED = ["a", "b", "known", "other"]  # the shared app's prompts, in order ("a" is the default)


@pytest.fixture(scope="module")
def prompt_dirs(serve_prompt_dirs):
    """This module's two prompts (serve_helpers.make_prompt, seeds 1 and 2), as the shared app serves them."""
    return {name: serve_prompt_dirs[name] for name in ("a", "b")}


# -- config file and settings (no Ray) -------------------------------------------------------------------------
def _check_keys(data: dict, model, where: str) -> None:
    """Serve's config schemas silently drop unknown keys: every key in the file must be a schema field."""
    known = set(model.model_fields)
    unknown = set(data) - known
    assert not unknown, f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})"


def test_config_file_keys_are_all_known():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(raw)  # types and values
    _check_keys(raw, ServeDeploySchema, "top level")
    _check_keys(raw["http_options"], HTTPOptionsSchema, "http_options")
    assert raw["http_options"]["host"] == "127.0.0.1"  # loopback unless told otherwise
    (app,) = raw["applications"]
    _check_keys(app, ServeApplicationSchema, "applications[0]")
    assert app["import_path"] == "paraphrase_ray.serve.deployments:app_builder"
    assert app["name"] == APP_NAME
    ingress, dep = app["deployments"]
    for i, d in enumerate(app["deployments"]):
        _check_keys(d, DeploymentSchema, f"deployments[{i}]")
    assert (ingress["name"], dep["name"]) == (INGRESS_NAME, DEPLOYMENT_NAME)
    assert dep["max_queued_requests"] > 0 and dep["health_check_period_s"] > 0
    _check_keys(dep["autoscaling_config"], AutoscalingConfig, "autoscaling_config")
    AutoscalingConfig(**dep["autoscaling_config"])
    _check_keys(dep["ray_actor_options"], RayActorOptionsSchema, "ray_actor_options")
    assert {"num_cpus", "num_gpus"} <= set(dep["ray_actor_options"])
    # args are our ServeSettings: from_dict rejects unknown keys by name
    args = dict(app["args"])
    args["prompts"] = [f"{k}={v}" for k, v in args["prompts"].items()]
    fields = set(ServeSettings.__dataclass_fields__)
    assert set(args) <= fields, set(args) - fields
    assert "api_key" not in args  # keys come from the environment, never from a committed file


def test_app_builder_resolves_prompts_and_rejects_bad_args(prompt_dirs, tmp_path):
    from ray.serve import Application

    app = app_builder({"prompts": {"x": str(prompt_dirs["a"]), "y": str(prompt_dirs["b"])}, "default": "y"})
    assert isinstance(app, Application)
    with pytest.raises(ConfigError, match="max_textz"):
        app_builder({"prompts": [str(prompt_dirs["a"])], "max_textz": 3})
    with pytest.raises(ConfigError, match="reserved"):
        app_builder({"prompts": [f"{ZERO_SHOT}={prompt_dirs['a']}"]})
    with pytest.raises(ConfigError, match="not a prompt directory"):
        app_builder({"prompts": [str(tmp_path)]})
    with pytest.raises(ConfigError, match="at least one prompt"):
        app_builder({})


def test_parse_prompt_specs(prompt_dirs):
    a, b = str(prompt_dirs["a"]), str(prompt_dirs["b"])
    assert [n for n, _ in parse_prompt_specs((a, f"two={b}"))] == ["a", "two"]
    assert [n for n, _ in parse_prompt_specs((a, f"two={b}"), default="two")] == ["two", "a"]
    with pytest.raises(ConfigError, match="twice"):
        parse_prompt_specs((a, a))
    with pytest.raises(ConfigError, match="default prompt"):
        parse_prompt_specs((a,), default="nope")
    with pytest.raises(ConfigError, match="name"):
        parse_prompt_specs((f"bad name={a}",))


# -- HTTP integration on a real local Ray ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_app):
    return serve_app


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def offline(prompt_dirs, tmp_path_factory):
    """Greedy candidates from the offline `paraphrase-ray paraphrase` command, per prompt."""
    from paraphrase_ray.cli.main import main

    tmp = tmp_path_factory.mktemp("offline")
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"source": t}) + "\n" for t in TEXTS))
    out = {}
    for name, d in prompt_dirs.items():
        dst = tmp / f"{name}.jsonl"
        argv = [
            "paraphrase",
            "--prompt",
            str(d),
            "--input",
            str(src),
            "--output",
            str(dst),
            "--device",
            "cpu",
            "--num-candidates",  # greedy: the default samples 8 and reranks
            "1",
        ]
        assert main(argv) == 0
        out[name] = {r["source"]: r["prediction"] for r in map(json.loads, dst.read_text().splitlines())}
    return out


@pytest.mark.slow
def test_mixed_prompt_concurrent_requests_match_offline_and_share_batches(client, offline):
    before = client.get("/stats").json()
    jobs = [(["a", "b"][i % 2], TEXTS[i % 4 :] + TEXTS[: i % 4]) for i in range(8)]

    def ask(job):
        name, texts = job
        r = client.post("/paraphrase", json={"texts": texts, "prompt": name})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, texts), ans in zip(jobs, answers, strict=True):
        assert ans["prompt"] == name
        assert [r["text"] for r in ans["results"]] == texts  # input order
        assert [r["paraphrase"] for r in ans["results"]] == [offline[name][t] for t in texts]
        assert all(r["candidates"] == [r["paraphrase"]] for r in ans["results"])
    assert offline["a"] != offline["b"]  # the prompts really differ, so a mix-up would show
    after = client.get("/stats").json()
    assert after["rows"] - before["rows"] == 32
    assert after["mixed_prompt_batches"] > before["mixed_prompt_batches"]
    # rows from several requests shared a forward pass: 32 rows in fewer than 8 passes, so some pass held more than
    # one request's 4 rows (counted over this test: the replica's running max_batch_size carries other tests' batches)
    assert after["batches"] - before["batches"] < 8, (before, after)


@pytest.mark.slow
def test_single_text_default_prompt_and_zero_shot(client, offline, tiny_model_dir, prompt_dirs):
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.models import load_model

    r = client.post("/paraphrase", json={"text": TEXTS[0]})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "a"
    assert r.json()["results"][0]["paraphrase"] == offline["a"][TEXTS[0]]
    r = client.post("/paraphrase", json={"text": TEXTS[0], "prompt": ZERO_SHOT})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == ZERO_SHOT
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    gen = GenerationConfig(max_new_tokens=12)  # what make_prompt records
    zero = paraphrase(loaded, [TEXTS[0]], None, TemplateConfig(), gen)[0][0]
    assert r.json()["results"][0]["paraphrase"] == zero  # no soft prompt on this row
    # copy control per request: n = 1 bans every source token that starts a word. The tiny model's output is
    # mostly ';' and "'" (word starts, to the exemption), so sources with them show the ban.
    texts = ["It's late; the shop's closed; we'll go home.", "Prices rose; sales fell."]
    prompt = SoftPrompt.load(prompt_dirs["a"])
    default = [c[0] for c in paraphrase(loaded, texts, prompt, TemplateConfig(), gen)]
    n1 = [c[0] for c in paraphrase(loaded, texts, prompt, TemplateConfig(), dataclasses.replace(gen, source_no_repeat_ngram_size=1))]
    assert all(a != b for a, b in zip(default, n1, strict=True))  # the ban changes both outputs
    for n, want in ((None, default), (1, n1)):
        body = {"texts": texts} if n is None else {"texts": texts, "source_no_repeat_ngram_size": n}
        r = client.post("/paraphrase", json=body)
        assert r.status_code == 200, r.text
        assert [res["paraphrase"] for res in r.json()["results"]] == want, n


@pytest.mark.slow
def test_candidates_sampling_and_rerank(client):
    from paraphrase_ray.text import is_empty

    r = client.post("/paraphrase", json={"texts": TEXTS[:2], "num_candidates": 3, "seed": 1})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert len(res["candidates"]) == 3 and res["scores"] is None
    plain = [sorted(res["candidates"]) for res in r.json()["results"]]
    r = client.post("/paraphrase", json={"texts": TEXTS[:2], "num_candidates": 3, "rerank": True, "seed": 1})
    assert r.status_code == 200, r.text
    distinct_objectives = usable_first = 0
    for res in r.json()["results"]:
        scores = res["scores"]
        assert len(scores) == 3 and res["paraphrase"] == res["candidates"][0]
        assert set(scores[0]) == {"adequacy", "self_bleu", "objective", "copy", "faithful", "invented", "dropped"}
        # metrics.rank_candidates: usable (not a copy, not empty) first, then faithful, then by objective
        keys = [(s["copy"] or is_empty(c), not s["faithful"], -s["objective"])
                for c, s in zip(res["candidates"], scores, strict=True)]
        assert keys == sorted(keys), keys
        usable_first += not keys[0][0]
        distinct_objectives += len({k[2] for k in keys}) > 1
    assert usable_first and distinct_objectives  # there was an order to get right
    # reranking reorders the same sampled candidates (same seed), it does not change them
    assert [sorted(res["candidates"]) for res in r.json()["results"]] == plain
    r = client.post("/paraphrase", json={"text": TEXTS[0], "num_candidates": 2, "num_beams": 2})
    assert r.status_code == 200 and len(r.json()["results"][0]["candidates"]) == 2


@pytest.mark.slow
def test_prompts_health_docs_and_auth(server, client, prompt_dirs):
    import httpx

    info = client.get("/prompts").json()
    assert [p["name"] for p in info["prompts"]] == [*SERVED, ZERO_SHOT]
    a = info["prompts"][0]
    assert (
        a["default"] and a["n_tokens"] == 4 and a["init"] == "random" and a["metrics"] == {"objective": 0.1}
    )
    assert info["limits"]["max_texts"] == 8 and info["limits"]["max_new_tokens"] == 48
    assert client.get("/docs").status_code == 200
    assert "/paraphrase" in client.get("/openapi.json").json()["paths"]
    bare = httpx.Client(base_url=server, timeout=60)
    assert bare.get("/healthz").json() == {"status": "ok"}
    assert bare.get("/docs").status_code == 200  # the docs page stays open: Swagger's Authorize button takes the key
    for method, path in (("GET", "/prompts"), ("GET", "/stats"), ("POST", "/paraphrase")):
        r = bare.request(method, path, json={"text": "hi"})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"], (path, r.text)
    r = bare.post("/paraphrase", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


BAD = [
    ({"texts": "not a list"}, 422, "texts"),
    ({"text": 5}, 422, "text"),
    ({"text": "hi", "num_candidates": 9}, 422, "num_candidates"),
    ({"text": "hi", "temperature": -1}, 422, "temperature"),
    ({"text": "hi", "source_no_repeat_ngram_size": -1}, 422, "source_no_repeat_ngram_size"),
    ({"text": "hi", "colour": "red"}, 422, "colour"),
    ({}, 422, "text"),
    ({"text": "hi", "texts": ["hi"]}, 422, "text"),
    ({"text": "   "}, 422, "empty"),
    ({"texts": ["ok", ""]}, 422, "texts[1]"),
    ({"texts": []}, 422, "texts"),
    ({"texts": ["hi"] * 9}, 413, "limit of 8"),
    ({"text": "x" * 301}, 413, "limit of 300"),
    ({"text": "word " * 50}, 413, "source tokens"),
    ({"text": "hi", "max_new_tokens": 49}, 422, "less than or equal to 48"),
    ({"text": "hi", "num_candidates": 2, "do_sample": False}, 422, "num_candidates"),
    ({"text": "hi", "prompt": "nope"}, 404, "available: a, b, known, other, zero-shot"),
]


@pytest.mark.slow
def test_bad_input_burst_never_hurts_good_requests(server, client, offline):
    """Bad requests mixed into a burst of good ones: each bad one gets its 4xx, each good one its answer."""
    jobs = [("good", i) for i in range(8)] + [("bad", i) for i in range(len(BAD))] + [("raw", 0), ("raw", 1)]
    jobs = [jobs[(i * 7) % len(jobs)] for i in range(len(jobs))]  # interleave
    assert len({j for j in jobs}) == len(jobs)
    failures, lock = [], threading.Lock()

    def run(job):
        kind, i = job
        try:
            if kind == "good":
                name, text = ["a", "b"][i % 2], TEXTS[i % 4]
                r = client.post("/paraphrase", json={"text": text, "prompt": name})
                assert r.status_code == 200, r.text
                assert r.json()["results"][0]["paraphrase"] == offline[name][text]
            elif kind == "bad":
                body, status, needle = BAD[i]
                r = client.post("/paraphrase", json=body)
                assert r.status_code == status, (body, r.status_code, r.text)
                assert needle in r.json()["detail"], (body, r.json())
            else:
                content = b"{not json" if i == 0 else b"x" * (1 << 21)
                r = client.post("/paraphrase", content=content, headers={"content-type": "application/json"})
                assert r.status_code == (422 if i == 0 else 413), r.text
        except AssertionError as e:
            with lock:
                failures.append(f"{job}: {e}")

    before = client.get("/stats").json()["rejected"]
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(run, jobs))
    assert not failures, "\n".join(failures)
    assert client.get("/healthz").status_code == 200
    import httpx

    with httpx.Client(base_url=server, timeout=60) as bare:  # without the key: counted as 401s
        assert all(bare.post("/paraphrase", json={"text": "hi"}).status_code == 401 for _ in range(3))
    after = client.get("/stats").json()["rejected"]
    expected = Counter(str(status) for _, status, _ in BAD) + Counter({"413": 1, "422": 1, "401": 3})
    # + the raw bodies; every rejection of this test, and only those, counted by status
    assert {k: after.get(k, 0) - before.get(k, 0) for k in expected} == dict(expected), (before, after)


@pytest.mark.slow
def test_api_key_comes_from_the_environment(server, client):
    """The app was built without a key; the replica read PARAPHRASE_RAY_API_KEY from its environment."""
    import httpx

    assert client.get("/prompts").status_code == 200  # the client sends KEY
    with httpx.Client(base_url=server, timeout=60) as bare:
        r = bare.get("/prompts")
        assert r.status_code == 401 and r.json()["detail"] == (
            "missing or wrong API key: send 'Authorization: Bearer KEY'"
        )
        assert bare.get("/prompts", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert bare.get("/healthz").json() == {"status": "ok"}  # never needs the key
