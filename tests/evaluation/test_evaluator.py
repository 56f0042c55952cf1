"""The Evaluator actor on the run's shared local Ray (conftest ``ray_session``: a logical GPU too). One actor is
shared by the whole module, as in a sweep."""

from __future__ import annotations

import uuid

import pytest

ray = pytest.importorskip("ray")

from paraphrase_ray.evaluation.embedder import load_embedder  # noqa: E402
from paraphrase_ray.evaluation.evaluator import (  # noqa: E402
    EvaluatorClient,
    get_evaluator,
    shutdown_evaluator,
)
from paraphrase_ray.evaluation.metrics import SUMMARY_KEYS, RowScore, score_rows  # noqa: E402

pytestmark = pytest.mark.slow

NAMESPACE = "paraphrase-ray-test"
SOURCES = [
    "She could not attend the meeting because her flight was delayed.",
    "The company expects profits to rise sharply next quarter.",
    "Firefighters contained the warehouse blaze after nearly six hours.",
]
REFERENCES = [
    "Her delayed flight kept her from going to the meeting.",
    "Next quarter, the firm predicts a steep increase in earnings.",
    "Crews brought the warehouse fire under control after almost six hours.",
]
PREDICTIONS = [REFERENCES[0], SOURCES[1], "Penguins huddle together to stay warm."]


@pytest.fixture(scope="module")
def name(ray_session):
    actor_name = f"evaluator-test-{uuid.uuid4().hex[:8]}"
    yield actor_name
    shutdown_evaluator(actor_name, NAMESPACE)


@pytest.fixture(scope="module")
def client(name):
    c = EvaluatorClient(name=name, namespace=NAMESPACE, num_cpus=1)
    c.info()  # waits for the model to load once for the module
    return c


def test_scores_match_in_process_metrics(client):
    remote = client.score_rows(SOURCES, REFERENCES, PREDICTIONS)
    local = score_rows(SOURCES, REFERENCES, PREDICTIONS, load_embedder(device="cpu"))
    assert all(isinstance(r, RowScore) for r in remote)
    for a, b in zip(remote, local, strict=True):
        assert a.objective == pytest.approx(b.objective, abs=1e-5)
        assert (a.self_bleu, a.ref_bleu, a.copy, a.empty) == (b.self_bleu, b.ref_bleu, b.copy, b.empty)
    summary = client.score(SOURCES, REFERENCES, PREDICTIONS)
    assert (
        tuple(summary) == SUMMARY_KEYS and summary["n"] == 3 and summary["copy_rate"] == pytest.approx(1 / 3)
    )
    assert client.info()["device"] == "cpu"  # no GPU was given to the actor


def test_get_if_exists_returns_the_same_actor(client, name):
    first = ray.get(get_evaluator(name, NAMESPACE).info.remote())
    second = ray.get(get_evaluator(name, NAMESPACE).info.remote())
    assert first["actor_id"] == second["actor_id"] == client.info()["actor_id"]
    assert ray.get_actor(name, namespace=NAMESPACE) is not None


def test_concurrent_tasks_share_the_actor_and_get_batched(client, name):
    @ray.remote(num_cpus=0)  # callers only wait on the actor; do not let them queue for the 2 CPUs
    def trial(i: int) -> tuple[str, float]:
        c = EvaluatorClient(name=name, namespace=NAMESPACE)
        preds = [REFERENCES[i % 3], SOURCES[(i + 1) % 3]]
        return c.info()["actor_id"], c.score(SOURCES[:2], REFERENCES[:2], preds)["objective"]

    before = client.info()
    results = ray.get([trial.remote(i) for i in range(4)], timeout=120)
    assert {actor_id for actor_id, _ in results} == {before["actor_id"]}
    embedder = load_embedder(device="cpu")
    expected = [score_rows(SOURCES[:2], REFERENCES[:2], [REFERENCES[i % 3], SOURCES[(i + 1) % 3]], embedder)
                for i in range(4)]  # each caller got its own rows' mean, whatever it was batched with
    assert [obj for _, obj in results] == pytest.approx([sum(r.objective for r in e) / 2 for e in expected], abs=1e-5)
    assert results[0][1] != pytest.approx(results[1][1])  # and the callers' numbers differ

    # Requests in flight together are merged into fewer encode calls.
    handle = get_evaluator(name, NAMESPACE)
    refs = [handle.score_rows.remote(SOURCES, None, [p] * 3) for p in [*PREDICTIONS, *REFERENCES, "", "x y"]]
    out = ray.get(refs, timeout=120)
    preds = [*PREDICTIONS, *REFERENCES, "", "x y"]
    assert [len(rows) for rows in out] == [3] * 8
    for p, rows in zip(preds, out, strict=True):  # merged into batches, each request's own rows come back
        alone = score_rows(SOURCES, None, [p] * 3, embedder)
        assert [r.objective for r in rows] == pytest.approx([r.objective for r in alone], abs=1e-5), p
        assert [(r.copy, r.empty, r.self_bleu, r.faithful) for r in rows] == [
            (r.copy, r.empty, r.self_bleu, r.faithful) for r in alone]
    assert out[-2][0].empty and out[0][0].ref_bleu is None
    after = client.info()
    assert after["cache_hits"] > before["cache_hits"]  # the shared sources were embedded once
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12 and after["max_batch_requests"] > 1


def test_bad_input_is_a_clear_error_and_the_actor_survives(client, name):
    handle = get_evaluator(name, NAMESPACE)
    actor_id = client.info()["actor_id"]
    with pytest.raises(ValueError, match="3 sources but 2 predictions"):
        ray.get(handle.score.remote(SOURCES, None, PREDICTIONS[:2]))
    with pytest.raises(ValueError, match=r"predictions\[1\] must be a string"):
        ray.get(handle.score_rows.remote(SOURCES[:2], None, ["ok", 7]))
    with pytest.raises(ValueError, match="empty lists"):
        client.score([], [], [])
    assert client.info()["actor_id"] == actor_id
    assert client.score(SOURCES, None, PREDICTIONS)["n"] == 3


def test_client_validates_before_touching_ray(ray_session):
    never = f"never-created-{uuid.uuid4().hex[:8]}"
    c = EvaluatorClient(name=never, namespace=NAMESPACE)
    with pytest.raises(ValueError, match="sources must be a list of strings"):
        c.score("one string", None, ["x"])
    with pytest.raises(ValueError):
        ray.get_actor(never, namespace=NAMESPACE)  # no actor was created for bad input


def test_model_mismatch_on_an_existing_name_is_an_error(client, name):
    other = EvaluatorClient(name=name, namespace=NAMESPACE, model="/some/other/embedder")
    with pytest.raises(ValueError, match="runs model"):
        other.score(SOURCES, None, PREDICTIONS)


def test_unloadable_model_is_a_clear_error(ray_session):
    c = EvaluatorClient(
        name=f"bad-model-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, model="/no/such/embedder"
    )
    with pytest.raises(ValueError, match="could not load embedder '/no/such/embedder'.*Fix:"):
        c.score(SOURCES, None, PREDICTIONS)


def test_fractional_gpu_actor_falls_back_to_cpu_without_cuda(ray_session):
    import torch

    gpu_name = f"gpu-{uuid.uuid4().hex[:8]}"
    c = EvaluatorClient(name=gpu_name, namespace=NAMESPACE, num_gpus=0.25, num_cpus=0)
    try:
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert c.info()["device"] == expected
        assert c.score(SOURCES, None, PREDICTIONS)["n"] == 3
    finally:
        shutdown_evaluator(gpu_name, NAMESPACE)


def test_shutdown_evaluator_kills_a_detached_actor(ray_session):
    detached = f"detached-{uuid.uuid4().hex[:8]}"
    get_evaluator(detached, NAMESPACE, lifetime="detached")
    assert shutdown_evaluator(detached, NAMESPACE)
    assert not shutdown_evaluator(f"absent-{uuid.uuid4().hex[:8]}", NAMESPACE)
    with pytest.raises(ValueError, match="lifetime"):
        get_evaluator(detached, NAMESPACE, lifetime="forever")


def test_killed_actor_is_recreated_by_the_client(ray_session):
    # Its own actor: killing the module's shared one would make every later test pay another model load.
    own = f"killed-{uuid.uuid4().hex[:8]}"
    client = EvaluatorClient(name=own, namespace=NAMESPACE, num_cpus=1)
    try:
        old = client.info()["actor_id"]
        ray.kill(get_evaluator(own, NAMESPACE))
        summary = client.score(SOURCES, REFERENCES, PREDICTIONS)
        assert summary["n"] == 3
        assert client.info()["actor_id"] != old
    finally:
        shutdown_evaluator(own, NAMESPACE)
