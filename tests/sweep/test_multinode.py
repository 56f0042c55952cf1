"""Distributed for real, on one machine (issue 16).

A three-node Ray cluster (``ray.cluster_utils.Cluster``: a head with no CPUs, like cluster.yaml's, and two
1-CPU workers; Ray's default node address) and a Cloud Storage bucket emulated on 127.0.0.1
(``tests/gcs_emulator.py``). Sweeps run as ``paraphrase-ray tune --address`` in a subprocess, a real driver
started in an empty directory; everything they write goes to the bucket.

- node loss: the worker running a trial is removed after the trial's first checkpoint; the trial is retried on
  another node from that checkpoint (its reports say so: ``resumed_from_step``, a new ``node_id``);
- driver loss: the driver is SIGKILLed mid-sweep; ``--resume`` from another directory re-runs no finished
  trial and continues the unfinished ones from their checkpoints;
- serving: ``paraphrase-ray serve --prompt gs://...`` and ``serve run`` of a config file load ``best/`` from the
  bucket, each replica fetching it itself;
- the sweep's evaluator survives the loss of its node (Ray restarts it elsewhere, same name);
- a bucket that cannot be reached, or does not exist, is an error naming it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from gcs_emulator import GcsEmulator, free_port

from paraphrase_ray.errors import ConfigError

# Its own three-node cluster, not the run's shared Ray (conftest): a node layout of its own (a CPU-less head, nodes
# removed and added), and this process connects to it (one process, one Ray). The shared Ray is stopped first.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shared_ray")]
CLI = [sys.executable, "-m", "paraphrase_ray.cli.main"]
EVERY, STEPS = 100, 600  # a trial reports (and checkpoints) every EVERY steps; ~30 ms a step here


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with GcsEmulator(bucket="sweeps", log=tmp_path_factory.mktemp("gcs") / "emulator.log") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def cluster():
    """Head without CPUs (it only hosts the driver, as on GCP) and two 1-CPU workers: one trial each."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def tiny_space(model_dir: Path, points: list[dict], num_samples: int, steps: int = STEPS) -> dict:
    return {
        "run": {
            "model": str(model_dir),
            "data": {"sources": ["sample"], "val_size": 16},
            "train": {
                "steps": steps,
                "batch_size": 4,
                "eval_every": EVERY,
                "eval_batches": 1,
                "warmup_steps": 0,
                "early_stop_patience": None,
                "precision": "fp32",
                "device": "cpu",
            },
            "generation": {"max_new_tokens": 8},
        },
        "search": {"prompt.n_tokens": [4, 6, 8], "train.lr": [0.1, 0.03], "train.steps": [EVERY, STEPS]},
        "searcher": {"name": "random", "seed": 0, "points_to_evaluate": points},
        "scheduler": {"name": "none", "grace_period": EVERY},
        "num_samples": num_samples,
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
        "max_failures": 2,
        "evaluator": {"cpu": 0, "n_examples": 4, "batch_size": 4},
    }


def driver_env(tmp: Path) -> dict[str, str]:
    """A driver's environment: its own cache (what it downloads is not where replicas look)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PARAPHRASE_RAY_CACHE": str(tmp / "driver-cache")}


def start(argv: list[str], cwd: Path, log: Path, env: dict) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


# --------------------------------------------------------------------------------------- bucket reading
def reports(gcs: GcsEmulator, exp: str) -> dict[str, list[dict]]:
    """Every trial's reports, from its result.json in the bucket: trial id -> reports in order."""
    out = {}
    for rel in gcs.listing(exp):
        if rel.endswith("/result.json") and rel.count("/") == 1:
            lines = gcs.read(f"{exp}/{rel}").decode().splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            if rows:
                out[rows[0]["trial_id"]] = rows
    return out


def _saved_trials(gcs: GcsEmulator, exp: str) -> list[tuple[dict, str]]:
    """(trial, run metadata JSON) per trial in the newest experiment state Tune saved to the bucket."""
    states = sorted(rel for rel in gcs.listing(exp) if rel.startswith("experiment_state-"))
    if not states:
        return []
    data = json.loads(gcs.read(f"{exp}/{states[-1]}"))
    return [(json.loads(trial_json), meta) for trial_json, meta in data["trial_data"]]


def statuses(gcs: GcsEmulator, exp: str) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved to the bucket (what --resume sees)."""
    return {t["trial_id"]: t["status"] for t, _ in _saved_trials(gcs, exp)}


def checkpointed(gcs: GcsEmulator, exp: str) -> set[str]:
    """Trial ids whose checkpoint the newest saved experiment state records (what --resume continues from).
    A report reaches the bucket (result.json) before the driver's next state save records its checkpoint."""
    return {t["trial_id"] for t, meta in _saved_trials(gcs, exp) if re.search(r"checkpoint_\d{6}", meta)}


def leaderboard_rows(gcs: GcsEmulator, exp: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(gcs.read(f"{exp}/leaderboard.csv").decode())))


def finished(rows: list[dict]) -> bool:
    return bool(rows) and "train_status" in rows[-1]


def midway(rows: list[dict]) -> bool:
    """Checkpointed and with at least one more eval to go, by the trial's own step count. A short trial
    (``train.steps == EVERY``) is never midway: between its only eval and its final report it looks unfinished, and
    Tune's state snapshot, forced by that eval's checkpoint, can record it so in the bucket for seconds."""
    steps = rows[0].get("config", {}).get("train.steps", STEPS) if rows else STEPS
    return bool(rows) and not finished(rows) and EVERY <= rows[-1]["step"] < steps - EVERY


# ------------------------------------------------------------------------------------ sweep + node loss
@pytest.fixture(scope="module")
def node_loss_sweep(cluster, gcs, tiny_model_dir, tmp_path_factory):
    """Two trials, one per worker. Once a trial has checkpointed, its node is removed (a preempted VM) and a
    fresh worker joins (what the autoscaler does). The sweep must still finish."""
    tmp = tmp_path_factory.mktemp("node-loss")
    points = [
        {"prompt.n_tokens": 4, "train.lr": 0.1, "train.steps": STEPS},
        {"prompt.n_tokens": 8, "train.lr": 0.03, "train.steps": STEPS},
    ]
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(tiny_model_dir, points, num_samples=2)))
    storage, exp = gcs.uri("multinode"), "multinode/node-loss"
    cwd, log = tmp / "driver-cwd", tmp / "driver.log"
    args = ["tune", "--space", str(space), "--name", "node-loss", "--storage", storage]
    t0 = time.time()
    proc = start([*CLI, *args, "--address", cluster.address], cwd, log, driver_env(tmp))
    lost = None
    try:
        deadline = time.time() + 420
        while lost is None and time.time() < deadline and proc.poll() is None:
            for rows in reports(gcs, exp).values():  # a trial with a checkpoint, still training
                if midway(rows):
                    victim = next(n for n in cluster.worker_nodes if n.node_id == rows[-1]["node_id"])
                    cluster.remove_node(victim, allow_graceful=False)
                    lost = {"trial_id": rows[0]["trial_id"], "node_id": victim.node_id, "at_step": rows[-1]["step"]}
                    cluster.add_node(num_cpus=1)  # the replacement VM
                    break
            time.sleep(0.5)
        assert lost is not None, f"no trial was caught mid-training\n{tail(log)}"
        rc = proc.wait(timeout=600)
    finally:
        stop(proc)
    return {"rc": rc, "log": log, "cwd": cwd, "exp": exp, "lost": lost, "storage": storage, "s": time.time() - t0}


def test_multinode_sweep_writes_everything_to_the_bucket(node_loss_sweep, gcs):
    out = node_loss_sweep
    assert out["rc"] == 0, tail(out["log"])
    files = gcs.listing(out["exp"])
    for name in ("space.yaml", "zero_shot.json", "leaderboard.csv", "sweep.png", "tuner.pkl"):
        assert name in files, sorted(files)
    assert {"best/adapter_model.safetensors", "best/adapter_config.json", "best/paraphrase_ray.json"} <= set(files)
    assert any(f.startswith("experiment_state-") for f in files)
    trial_dirs = {f.split("/")[0] for f in files if "/checkpoint_" in f}
    assert len(trial_dirs) == 2  # both trials checkpointed into the bucket, from worker nodes
    assert list(out["cwd"].iterdir()) == []  # nothing in the driver's working directory
    printed = out["log"].read_text()
    assert f"best prompt: gs://sweeps/{out['exp']}/best?endpoint_override={gcs.endpoint}" in printed
    meta = json.loads(gcs.read(f"{out['exp']}/best/paraphrase_ray.json"))
    assert meta["sweep"] == "node-loss" and meta["metrics"]["objective"] is not None


def test_multinode_node_loss_resumes_the_trial_from_its_checkpoint(node_loss_sweep, gcs):
    out, lost = node_loss_sweep, node_loss_sweep["lost"]
    assert out["rc"] == 0, tail(out["log"])
    rows = leaderboard_rows(gcs, out["exp"])
    trials = [r for r in rows if r["status"] != "baseline"]
    assert len(trials) == 2 and {r["status"] for r in trials} == {"completed"}, rows  # every trial accounted for
    assert any(r["status"] == "baseline" for r in rows)

    reps = reports(gcs, out["exp"])[lost["trial_id"]]
    before = [r for r in reps if r["node_id"] == lost["node_id"]]
    after = reps[len(before) :]
    assert before and after and reps[: len(before)] == before, [(r["step"], r["node_id"][:8]) for r in reps]
    assert {r["resumed_from_step"] for r in before} == {0}  # the first attempt started fresh
    resumed = after[0]["resumed_from_step"]
    # the retry continued from the last checkpoint it reported, on another node, and went on to the end
    assert resumed == before[-1]["step"] >= EVERY and resumed >= lost["at_step"]
    assert {r["node_id"] for r in after}.isdisjoint({lost["node_id"]})
    assert [r["step"] for r in after if "train_status" not in r] == list(range(resumed + EVERY, STEPS + 1, EVERY))
    assert after[-1]["train_status"] == "completed" and after[-1]["step"] == STEPS


# ---------------------------------------------------------------------------------- driver killed, resume
def test_multinode_driver_killed_then_resumed_from_another_directory(cluster, gcs, tiny_model_dir, tmp_path):
    """SIGKILL the driver once one trial has finished and another has a checkpoint; ``--resume`` from another
    directory (the bucket is all it has) re-runs no finished trial and continues the unfinished one."""
    points = [
        {"prompt.n_tokens": 4, "train.lr": 0.1, "train.steps": EVERY},  # short: finishes first
        {"prompt.n_tokens": 8, "train.lr": 0.03, "train.steps": STEPS},
        {"prompt.n_tokens": 6, "train.lr": 0.1, "train.steps": EVERY},
    ]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(tiny_model_dir, points, num_samples=3)))
    exp = "multinode/killed"
    args = ["tune", "--space", str(space), "--name", "killed", "--storage", gcs.uri("multinode")]
    args += ["--address", cluster.address]
    env = driver_env(tmp_path)
    first = start([*CLI, *args], tmp_path / "first-cwd", tmp_path / "first.log", env)
    try:
        deadline = time.time() + 420
        while time.time() < deadline and first.poll() is None:
            state, reps = statuses(gcs, exp), reports(gcs, exp)
            done = [t for t, s in state.items() if s == "TERMINATED"]
            # a short trial caught between its only eval and its final report was "mid" here: killed then, its
            # resume reported no further eval (step == resumed_from_step), the race this file showed
            mid = [t for t, rows in reps.items() if midway(rows)]
            if done and mid and set(mid) <= checkpointed(gcs, exp):
                break
            time.sleep(0.5)
        assert first.poll() is None, tail(tmp_path / "first.log")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        stop(first)
    assert done and mid, tail(tmp_path / "first.log")
    before = reports(gcs, exp)
    killed_at = time.time()

    second = start([*CLI, *args, "--resume"], tmp_path / "second-cwd", tmp_path / "second.log", env)
    try:
        rc = second.wait(timeout=600)
    finally:
        stop(second)
    assert rc == 0, tail(tmp_path / "second.log")
    after = reports(gcs, exp)
    assert statuses(gcs, exp) and set(statuses(gcs, exp).values()) == {"TERMINATED"}
    rerun = {t for t, rows in after.items() if any(r["report_time"] > killed_at for r in rows)}
    assert rerun.isdisjoint(done) and len(after) == 3  # finished trials were not run again...
    for t in done:
        assert after[t] == before[t]
    for t in mid:  # ...and an unfinished one went on from its checkpoint, not from step 0
        new = [r for r in after[t] if r["report_time"] > killed_at]
        assert EVERY <= new[0]["resumed_from_step"] <= before[t][-1]["step"], new[0]
        assert new[0]["step"] == new[0]["resumed_from_step"] + EVERY and new[-1]["train_status"] == "completed"
    trials = [r for r in leaderboard_rows(gcs, exp) if r["status"] != "baseline"]
    assert len(trials) == 3 and {r["status"] for r in trials} == {"completed"}
    assert "best/adapter_model.safetensors" in gcs.listing(exp)
    assert list((tmp_path / "first-cwd").iterdir()) == [] and list((tmp_path / "second-cwd").iterdir()) == []


# --------------------------------------------------------------------------------------- serve from GCS
def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, tail(log)
        try:
            r = httpx.get(f"{url}/prompts", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s\n{tail(log)}")


def _ask(url: str) -> dict:
    r = httpx.post(f"{url}/paraphrase", json={"text": "The cat sat on the mat."}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_multinode_serve_loads_best_from_the_bucket(node_loss_sweep, cluster, gcs, tmp_path):
    """Both ways of serving take ``gs://.../best`` as is; the replica (on a worker node) fetches it itself into
    its own node's cache, not the driver's."""
    import shutil

    from paraphrase_ray.models import cache_dir
    from paraphrase_ray.storage import prompt_cache_key

    assert node_loss_sweep["rc"] == 0
    best = f"{node_loss_sweep['storage'].split('?')[0]}/node-loss/best?{gcs.options()}"
    meta = json.loads(gcs.read(f"{node_loss_sweep['exp']}/best/paraphrase_ray.json"))
    replica_copy = cache_dir() / "prompts" / prompt_cache_key(best)  # the nodes' cache (the default one)
    driver_copy = tmp_path / "driver-cache" / "prompts" / prompt_cache_key(best)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    shutil.rmtree(replica_copy, ignore_errors=True)
    log = tmp_path / "serve-cli.log"
    args = ["serve", "--prompt", best, "--address", cluster.address, "--port", str(port)]
    proc = start([*CLI, *args], tmp_path / "cli-cwd", log, driver_env(tmp_path))
    try:
        listed = _wait_http(url, proc, log)
        assert listed["prompts"][0]["name"] == "best"
        assert listed["prompts"][0]["metrics"]["objective"] == meta["metrics"]["objective"]
        assert _ask(url)["prompt"] == "best"
        assert (replica_copy / "adapter_model.safetensors").is_file()  # fetched by the replica
        assert (driver_copy / "adapter_model.safetensors").is_file()  # the driver only checked it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, tail(log)
    finally:
        stop(proc)

    shutil.rmtree(replica_copy, ignore_errors=True)
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port  # Serve keeps the HTTP options of its first start on a cluster
    app = config["applications"][0]
    app["args"]["prompts"] = {"best": best}
    # the file's prompt store is relative to the checkout (runs/sweeps); this driver starts in an empty directory
    (tmp_path / "store").mkdir()
    app["args"]["prompt_store"] = str(tmp_path / "store")
    model = next(d for d in app["deployments"] if d["name"] == "ParaphraseModel")
    model["ray_actor_options"]["num_cpus"] = 1  # the workers have one CPU each
    model.pop("autoscaling_config", None)
    model["num_replicas"] = 1
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "serve-run.log"
    serve_run = [str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")]
    env = {**driver_env(tmp_path), "PARAPHRASE_RAY_CACHE": str(tmp_path / "serve-run-cache")}
    proc = start([*serve_run, "--address", cluster.address], tmp_path / "run-cwd", log, env)
    try:
        _wait_http(url, proc, log)
        assert _ask(url)["prompt"] == "best"
        assert (replica_copy / "adapter_model.safetensors").is_file()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------- evaluator's node
def test_multinode_evaluator_survives_the_loss_of_its_node(cluster):
    """The sweep's shared evaluator is restartable (what sweep/driver.py asks for): its node lost, Ray restarts it on
    another node under the same name, and a client's call made after the loss is answered by the new one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from paraphrase_ray.evaluation.evaluator import EvaluatorClient, get_evaluator

    name, namespace = "evaluator-node-loss-test", "paraphrase-ray-test"
    triple = (["The cat sat on the mat."], ["A cat was sitting on the mat."], ["The cat sat on a mat."])
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        cluster.wait_for_nodes()  # a node added by an earlier test may still be registering
        for _ in range(5):  # soft affinity (what sweep/driver.py uses) may still place it on the head: place it again
            target = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
            handle = get_evaluator(
                name, namespace, num_cpus=0, max_restarts=3,
                scheduling_strategy=NodeAffinitySchedulingStrategy(target.node_id, soft=True),
            )
            client = EvaluatorClient(name, namespace, num_cpus=0, timeout_s=300)
            before = client.info()
            node = ray._private.state.actors(before["actor_id"])["Address"]["NodeID"]  # where Ray put it
            victim = next((n for n in cluster.worker_nodes if n.node_id == node), None)
            if victim is not None:
                break
            ray.kill(handle, no_restart=True)
            deadline = time.time() + 30
            while time.time() < deadline:  # the name is free once the actor is dead
                try:
                    ray.get_actor(name, namespace=namespace)
                except ValueError:
                    break
                time.sleep(0.2)
        assert victim is not None, "Ray placed the evaluator on the head 5 times despite the affinity"
        scores = client.score(*triple)
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # the replacement VM (for the tests after this one)
        assert client.score(*triple) == scores  # answered after the loss...
        after = client.info()
        assert after["actor_id"] == before["actor_id"] and after["pid"] != before["pid"]  # ...by a restart
        ray.kill(handle)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------ bucket errors
def test_multinode_unreachable_or_missing_bucket_is_an_error_naming_it(gcs, tiny_model_dir, tmp_path):
    from paraphrase_ray.sweep.driver import run_sweep
    from paraphrase_ray.sweep.spec import spec_from_dict

    spec = spec_from_dict(tiny_space(tiny_model_dir, [], num_samples=1))
    closed = f"gs://nosuch-bucket/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http&anonymous=true"
    t0 = time.time()
    with pytest.raises(ConfigError, match="cannot reach bucket 'nosuch-bucket'"):
        run_sweep(spec, "s", closed + "&retry_limit_seconds=1")
    assert time.time() - t0 < 30
    with pytest.raises(ConfigError, match="bucket 'other-bucket' .* does not exist"):
        run_sweep(spec, "s", gcs.uri("x", bucket="other-bucket"))
    with pytest.raises(ConfigError, match="unknown option"):
        run_sweep(spec, "s", gcs.uri("x") + "&colour=blue")
