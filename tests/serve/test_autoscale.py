"""serve/config.yaml's own deployment options (autoscaling_config, resources, queues) and args, on the run's shared
Ray, with two model replicas on one machine: 8 concurrent clients are answered by both, each replica loads the
store prompt into its own LRU, and a streamed chat sends its first chunk while the generation is still running.

The only changes to the file's values: ``min_replicas`` / ``initial_replicas`` 2 (so both replicas are up without
waiting for upscale_delay_s), the tiny model's prompts and store, cpu, and ``debug_stall_s`` for the stream test.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from serve_helpers import TEXTS, make_prompt

from paraphrase_ray.config import from_dict
from paraphrase_ray.serve.deployments import DEPLOYMENT_NAME, build_app
from paraphrase_ray.serve.protocol import DEBUG_STALL_MARK, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
APP, ROUTE, STALL_S = "paraphrase-scale", "/scale", 3.0
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scaled(ray_session, tiny_model_dir, tmp_path_factory):
    """Base URL of the app built from serve/config.yaml with two replicas; deleted whatever happens."""
    from ray import serve

    from paraphrase_ray.models import load_model

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = raw["applications"]
    model = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAME)
    options = {k: v for k, v in model.items() if k != "name"}
    options["autoscaling_config"] = {**options["autoscaling_config"], "min_replicas": 2, "initial_replicas": 2}
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    tmp = tmp_path_factory.mktemp("scale")
    make_prompt(tmp / "store" / "sweeps" / "q" / "best", tiny_model_dir, loaded, seed=3)
    args = {**app["args"], "prompts": [f"a={make_prompt(tmp / 'a', tiny_model_dir, loaded, seed=1)}"],
            "prompt_store": str(tmp / "store"), "device": "cpu", "debug_stall_s": STALL_S}
    # the file's args as app_builder reads them, and the model deployment's options as `serve run` applies them
    built = build_app(from_dict(ServeSettings, args, where="args."), **options)
    base = ray_session.serve()
    try:
        serve.run(built, name=APP, route_prefix=ROUTE)
        yield base + ROUTE
    finally:
        serve.delete(APP)


def test_two_replicas_from_the_shipped_config_answer_8_concurrent_clients_with_the_store(scaled):
    import httpx
    from ray import serve

    def client(i: int) -> list[str]:
        seen = []
        with httpx.Client(base_url=scaled, timeout=120) as c:
            for j in range(3):
                model = "sweeps/q/best" if (i + j) % 2 else "a"
                r = c.post("/v1/completions", json={"model": model, "prompt": TEXTS[(i + j) % 4 :][:2]})
                assert r.status_code == 200, r.text
                seen.append((model, r.json()["system_fingerprint"]))
        return seen

    with ThreadPoolExecutor(8) as pool:
        answers = [x for seen in pool.map(client, range(8)) for x in seen]
    replicas = {fp for _, fp in answers}
    assert len(replicas) == 2, answers  # both replicas answered
    assert {fp for m, fp in answers if m == "sweeps/q/best"} == replicas  # the store prompt on both
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP)
    stats: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(stats) < 2 and time.monotonic() < deadline:  # ask until both replicas have answered
        st = handle.stats.remote().result()
        stats[st["replica"]] = st
    assert set(stats) == replicas
    for st in stats.values():  # each replica loaded the store prompt into its own LRU, and hit it after
        assert st["prompt_store"]["loads"] == 1 and st["prompt_store"]["loaded"] == 1, st["prompt_store"]
        assert st["torch_threads"] == 2  # the file's num_cpus
    assert len({st["pid"] for st in stats.values()}) == 2


def test_stream_sends_its_first_chunk_before_generation_ends(scaled):
    import httpx

    body = {"model": "sweeps/q/best", "stream": True,
            "messages": [{"role": "user", "content": f"{DEBUG_STALL_MARK} {TEXTS[0]}"}]}
    t0 = time.perf_counter()
    stamps = []
    with httpx.Client(base_url=scaled, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                stamps.append((time.perf_counter() - t0, line))
    assert stamps[-1][1] == "data: [DONE]"
    role, content = json.loads(stamps[0][1][6:]), json.loads(stamps[1][1][6:])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["finish_reason"] in ("stop", "length")
    # the batch holding this row sleeps STALL_S before generating: the role chunk came before that, the text after
    assert stamps[1][0] - stamps[0][0] > STALL_S * 0.8, stamps
