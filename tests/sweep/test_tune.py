"""Sweeps: storage through pyarrow.fs (file:// standing in for gs://), leaderboard/plot, one trial in-process,
fractional-GPU packing on a CPU machine, and a real tiny sweep on a local Ray that is interrupted and resumed."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.sweep.leaderboard import (
    TrialRecord,
    format_table,
    leaderboard,
    overhead,
    write_leaderboard,
    write_plot,
)
from paraphrase_ray.sweep.spec import SweepStorage, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def tiny_space(model_dir: Path) -> dict:
    """Six trials on the tiny OPT: different lengths and inits, one deliberately failing (no such device)."""
    points = [
        (4, "vocab", 0.3, "cpu"),
        (12, "random", 0.01, "cpu"),
        (8, "text", 0.05, "cuda:99"),  # raises in load_model on any machine: the failing trial
        (2, "random", 0.002, "cpu"),
        (16, "vocab", 0.1, "cpu"),
        (6, "text", 0.02, "cpu"),
    ]
    keys = ("prompt.n_tokens", "prompt.init", "train.lr", "train.device")
    return {
        "run": {
            "model": str(model_dir),
            "data": {"sources": ["sample"], "val_size": 16},
            "train": {
                "steps": 30,
                "batch_size": 4,
                "eval_every": 10,
                "eval_batches": 1,
                "warmup_steps": 0,
                "early_stop_patience": None,
                "precision": "fp32",
            },
            "generation": {"max_new_tokens": 8},
        },
        "search": {
            "prompt.n_tokens": {"type": "int", "low": 2, "high": 16},
            "prompt.init": ["vocab", "random", "text"],
            "train.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
            "train.device": ["cpu", "cuda:99"],
        },
        "searcher": {"seed": 0, "points_to_evaluate": [dict(zip(keys, p, strict=True)) for p in points]},
        "scheduler": {"name": "asha", "grace_period": 10, "reduction_factor": 2},
        "num_samples": len(points),
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
        "max_failures": 1,
        "evaluator": {"cpu": 0, "n_examples": 4, "batch_size": 4},
    }


# ------------------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("uri", [False, True], ids=["local-path", "file-uri"])
def test_storage_reads_and_writes_through_pyarrow(tmp_path, uri):
    root = f"file://{tmp_path}/runs" if uri else str(tmp_path / "runs")
    store = SweepStorage.parse(root, "s1")
    assert store.uri == f"{root}/s1" and not store.exists()
    store.write_bytes("a/b.txt", b"hello")
    assert store.exists("a", "b.txt") and store.read_bytes("a/b.txt") == b"hello"
    assert (tmp_path / "runs" / "s1" / "a" / "b.txt").read_text() == "hello"
    assert store.read_bytes("missing.json") is None
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("1")
    (src / "y").write_text("2")
    store.write_bytes("best/stale", b"old")
    store.upload_dir(src, "best", ("x", "y"))
    assert sorted(p.name for p in (tmp_path / "runs" / "s1" / "best").iterdir()) == ["x", "y"]


def test_storage_rejects_bad_names_and_uris():
    with pytest.raises(ConfigError, match="--name"):
        SweepStorage.parse("runs", "a/b")
    with pytest.raises(ConfigError, match="nosuchfs://"):
        SweepStorage.parse("nosuchfs://bucket/x", "s")


def test_gs_uri_maps_to_pyarrow_gcs(monkeypatch):
    pafs = pytest.importorskip("pyarrow.fs")
    if not hasattr(pafs, "GcsFileSystem"):
        pytest.skip("pyarrow built without GCS")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    store = SweepStorage.parse("gs://bucket/prefix/", "sweep")  # no network: from_uri only builds the client
    assert type(store.fs).__name__ == "GcsFileSystem"
    assert store.path("best") == "bucket/prefix/sweep/best" and store.uri == "gs://bucket/prefix/sweep"


# -------------------------------------------------------------------------------------- leaderboard + plot
def _record(tid, status, n, init, lr, objectives, train_status=None, error=""):
    reports = [
        {
            "step": 10 * (i + 1),
            "objective": o,
            "adequacy": 0.5,
            "self_bleu": 10.0,
            "copy_rate": 0.0,
            "val_loss": 3.0 - i,
            "time_total_s": 5.0 * (i + 1),
            "setup_s": 0.1,
            "worker_pid": 1,
            "worker_trial": 1,
            "model_fresh_load": True,
            "trial_start": 100.0,
            "report_time": 105.0 + i,
            "eval_s": 1.0,
        }
        for i, o in enumerate(objectives)
    ]
    if train_status:
        reports.append({**reports[-1], "train_status": train_status})
    config = {"prompt.n_tokens": n, "prompt.init": init, "train.lr": lr, "train.device": "cpu"}
    return TrialRecord(tid, status, config, reports, error)


def test_a_failed_trial_restored_without_a_config_keeps_its_saved_params(tmp_path):
    """A trial that failed before Ctrl-C and never reported comes back from --resume with ``Result.config`` None
    (Tune knows only its id); its row still names its searched values, from the params.json Tune saved."""
    import types

    import pyarrow.fs as pafs

    from paraphrase_ray.sweep.driver import trial_records

    trial_dir = tmp_path / "run_trial_x"
    trial_dir.mkdir()
    (trial_dir / "params.json").write_text(json.dumps({"train.device": "cuda:99", "prompt.n_tokens": 8}))
    restored = types.SimpleNamespace(
        metrics={"trial_id": "x"}, config=None, error=RuntimeError("no CUDA device cuda:99"),
        metrics_dataframe=None, path=str(trial_dir), filesystem=pafs.LocalFileSystem(),
    )
    (rec,) = trial_records([restored])
    assert (rec.trial_id, rec.tune_status, rec.error) == ("x", "ERROR", "no CUDA device cuda:99")
    assert rec.config == {"train.device": "cuda:99", "prompt.n_tokens": 8}
    restored.path = str(tmp_path / "gone")  # nothing saved either: an empty config, not a crash
    assert trial_records([restored])[0].config == {}


def test_leaderboard_table_csv_and_plot(tmp_path, tiny_model_dir):
    import matplotlib.image

    spec = spec_from_dict(tiny_space(tiny_model_dir))
    records = [
        _record("a", "TERMINATED", 4, "vocab", 0.3, [0.2, 0.4, 0.3], "completed"),
        _record("b", "TERMINATED", 12, "random", 0.01, [0.1]),  # ASHA stopped it at step 10
        _record("c", "ERROR", 8, "text", 0.05, [], error="ModelLoadError: no CUDA"),
        _record("d", "TERMINATED", 2, "random", 0.002, [0.0], "nan"),
        _record("e", "RUNNING", 6, "text", 0.02, [0.15]),
    ]
    zero = [{"system": "zero-shot", "model": "m", "objective": 0.12, "adequacy": 0.3, "wall_s": 2.0}]
    rows = leaderboard(records, spec, zero)
    assert [r["trial_id"] for r in rows] == ["a", "e", "b", "d", "c", "zero-shot"]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["a"]["objective"] == 0.4 and by_id["a"]["best_step"] == 20 and by_id["a"]["steps"] == 30
    assert [by_id[t]["status"] for t in "abcde"] == ["completed", "pruned", "error", "nan", "running"]
    assert by_id["c"]["error"].startswith("ModelLoadError")

    store = SweepStorage.parse(f"file://{tmp_path}", "lb")  # written through pyarrow.fs, as for gs://
    write_leaderboard(store, rows, spec)
    write_plot(store, rows, spec)
    with open(tmp_path / "lb" / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[0]["prompt.n_tokens"] == "4"
    baselines = [r for r in table if r["status"] == "baseline"]
    assert [r["trial_id"] for r in baselines] == ["zero-shot"]  # the zero-shot row, by name and status
    assert float(baselines[0]["objective"]) == 0.12 and by_id["zero-shot"]["status"] == "baseline"
    img = matplotlib.image.imread(tmp_path / "lb" / "sweep.png")
    assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # not blank
    text = format_table(rows, spec)
    assert (
        "zero-shot" in text
        and "pruned" in text
        and text.splitlines()[0].split()[:3] == ["trial_id", "status", "n_tokens"]
    )
    o = overhead(records, fit_s=20.0, spec=spec)
    assert o["trials"] == 5 and o["fresh_setup_s"] == 0.1 and o["worker_processes"] == 1


# ---------------------------------------------------------------------------------- one trial in-process
class Scorer:
    """The real scoring (``metrics.score`` on the offline embedder) in-process, with what it was asked; ``client``
    wraps the real Evaluator actor's client instead (same calls, over Ray)."""

    def __init__(self, client=None):
        self.client, self.calls = client, []

    def score(self, sources, references, predictions):
        from paraphrase_ray.evaluation.embedder import load_embedder
        from paraphrase_ray.evaluation.metrics import score

        self.calls.append((list(sources), list(references), list(predictions)))
        if self.client is not None:
            return self.client.score(sources, references, predictions)
        return score(sources, references, predictions, load_embedder())


@pytest.fixture()
def one_thread():
    """In-process trials get one torch thread, as Ray gives a trial with resources.cpu == 1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _context(tiny_model_dir):
    from paraphrase_ray.sweep.driver import build_context

    spec = spec_from_dict(tiny_space(tiny_model_dir))
    return build_context(spec, "unit", "evaluator-unit")


def test_trial_reports_each_eval_with_a_servable_checkpoint(tiny_model_dir, one_thread, ray_session):
    """One trial in-process, scored by the real Evaluator actor: a report per eval with the actor's scores of
    that eval's paraphrases and a checkpoint that loads, then the final report carrying the last eval's scores."""
    from paraphrase_ray.evaluation.embedder import load_embedder
    from paraphrase_ray.evaluation.evaluator import EvaluatorClient, shutdown_evaluator
    from paraphrase_ray.evaluation.metrics import SUMMARY_KEYS, score
    from paraphrase_ray.prompt.bundle import load_bundle
    from paraphrase_ray.sweep.driver import run_trial

    ctx = _context(tiny_model_dir)
    assert len(ctx.eval_sources) == 4 and len(ctx.val_pairs) == 16
    reports = []

    def report(metrics, checkpoint=None):
        bundle = load_bundle(checkpoint.path, expected_dim=16) if checkpoint else None
        reports.append((metrics, bundle))

    client = Scorer(EvaluatorClient(**ctx.evaluator))
    try:
        run_trial(
            {"prompt.n_tokens": 3, "prompt.init": "vocab", "train.lr": 0.1, "train.device": "cpu"},
            ctx,
            report=report,
            get_checkpoint=lambda: None,
            client=client,
        )
        assert client.client.info()["requests"] == 3  # the actor scored each eval once
    finally:
        shutdown_evaluator(ctx.evaluator["name"], ctx.evaluator["namespace"])
    assert [m["step"] for m, _ in reports] == [10, 20, 30, 30] and len(client.calls) == 3
    embedder = load_embedder()
    for (metrics, bundle), (sources, refs, preds) in zip(reports[:3], client.calls, strict=True):
        assert sources == ctx.eval_sources and refs == ctx.eval_refs and len(preds) == 4
        expected = score(sources, refs, preds, embedder)  # the same numbers, computed here
        assert {k: metrics[k] for k in SUMMARY_KEYS} == pytest.approx(expected, abs=1e-5, nan_ok=True)
        assert {"train_loss", "val_loss", "eval_s"} <= set(metrics)
        assert bundle.prompt.n_tokens == 3 and bundle.meta["sweep"] == "unit"
        assert bundle.meta["metrics"]["objective"] == metrics["objective"] and "template" in bundle.meta
    final, ckpt = reports[-1]
    assert ckpt is None and final["train_status"] == "completed"
    assert {k: final[k] for k in SUMMARY_KEYS} == {k: reports[2][0][k] for k in SUMMARY_KEYS}


def test_trial_reports_and_records_its_training_precision(tiny_model_dir, one_thread, monkeypatch):
    """precision auto in a trial: the probe's decision (forced to bf16 here) is in every report, the leaderboard
    row and the checkpoint's paraphrase_ray.json; the trial's evaluations generate from the fp32 weights."""
    import dataclasses

    import torch

    from paraphrase_ray.models import load_model
    from paraphrase_ray.prompt.bundle import load_bundle
    from paraphrase_ray.sweep.driver import run_trial
    from paraphrase_ray.training.precision import MIN_SPEEDUP_ENV

    monkeypatch.setenv(MIN_SPEEDUP_ENV, "0")  # any measured speedup clears it: the real probe, bf16 decided
    ctx = _context(tiny_model_dir)
    train_cfg = dataclasses.replace(ctx.run.train, precision="auto")
    ctx = dataclasses.replace(ctx, run=dataclasses.replace(ctx.run, train=train_cfg))
    reports = []
    run_trial({"prompt.n_tokens": 3, "train.device": "cpu"}, ctx,
              report=lambda m, checkpoint=None: reports.append((m, checkpoint and load_bundle(checkpoint.path))),
              get_checkpoint=lambda: None, client=Scorer())
    labels = {m["precision"] for m, _ in reports}
    assert len(labels) == 1 and labels.pop().startswith("bf16 (probe: ")
    assert reports[0][1].meta["train_precision"] == reports[0][0]["precision"]
    assert load_model(str(tiny_model_dir), "auto", "cpu").dtype == torch.float32  # what the trial generated from
    spec = spec_from_dict(tiny_space(tiny_model_dir))
    row = leaderboard([TrialRecord("t1", "TERMINATED", {}, [m for m, _ in reports])], spec, [])[0]
    assert row["precision"] == reports[-1][0]["precision"]


def test_trial_resumes_from_its_tune_checkpoint(tiny_model_dir, one_thread, tmp_path):
    """Tune restarts an interrupted trial (``--resume``, or a retry) with ``get_checkpoint()`` set: training
    continues from the checkpoint's step, with the prompt an uninterrupted trial would have had there."""
    import shutil

    import torch
    from ray import tune

    from paraphrase_ray.prompt.soft_prompt import SoftPrompt
    from paraphrase_ray.sweep.driver import run_trial

    ctx = _context(tiny_model_dir)
    params = {"prompt.n_tokens": 3, "prompt.init": "vocab", "train.lr": 0.1, "train.device": "cpu"}
    kept = tmp_path / "checkpoint-step-10"

    def recorder(into: list, keep_step: int | None = None):
        def report(metrics, checkpoint=None):
            weight = SoftPrompt.load(checkpoint.path).weight.detach().clone() if checkpoint else None
            if checkpoint is not None and metrics["step"] == keep_step:
                shutil.copytree(checkpoint.path, kept)  # the trial deletes its own directory when it ends
            into.append((metrics["step"], weight, metrics))

        return report

    full: list = []
    run_trial(params, ctx, report=recorder(full, keep_step=10), get_checkpoint=lambda: None, client=Scorer())
    assert [s for s, _, _ in full] == [10, 20, 30, 30] and (kept / "trainer_state.json").is_file()
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 10

    resumed: list = []
    run_trial(
        params,
        ctx,
        report=recorder(resumed),
        get_checkpoint=lambda: tune.Checkpoint.from_directory(str(kept)),
        client=Scorer(),
    )
    assert [s for s, _, _ in resumed] == [20, 30, 30]  # continued after step 10, not from 0
    assert {m["resumed_from_step"] for _, _, m in resumed} == {10}
    assert {m["resumed_from_step"] for _, _, m in full} == {0}
    assert resumed[-1][2]["train_status"] == "completed"
    for (step, theirs, _), (step_full, ours, _) in zip(resumed[:2], full[1:3], strict=True):
        assert step == step_full
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)  # same weights as never interrupted


def test_nan_trial_reports_the_worst_objective(tiny_model_dir):
    """A prompt initialised at 1e39 overflows at the first step: a real NaN. The trial reports the worst objective
    once, with nothing scored and no checkpoint (nothing to retry from)."""
    from paraphrase_ray.sweep.driver import run_trial

    reports, client = [], Scorer()
    run_trial(
        {"prompt.n_tokens": 3, "prompt.init": "random", "prompt.random_range": 1e39, "train.device": "cpu"},
        _context(tiny_model_dir),
        report=lambda m, checkpoint=None: reports.append((m, checkpoint)),
        get_checkpoint=lambda: None,
        client=client,
    )
    assert [(m["train_status"], m["objective"], c) for m, c in reports] == [("nan", 0.0, None)]
    assert math.isnan(reports[0][0]["train_loss"]) and client.calls == []


def test_optuna_gets_the_spec_ranges():
    from ray.tune.search.optuna import OptunaSearch

    from paraphrase_ray.sweep.driver import tune_domain

    spec = load_spec(ROOT / "search_spaces" / "default.yaml")
    space = OptunaSearch.convert_search_space({k: tune_domain(p) for k, p in spec.search.items()})
    n = space["prompt.n_tokens"]
    assert (n.low, n.high, n.log) == (5, 150, True)  # inclusive upper bound survives Tune's exclusive one
    assert space["train.lr"].log and space["prompt.init"].choices == ("vocab", "random", "text")


def test_resume_and_name_clashes_are_user_errors(tmp_path, tiny_model_dir):
    from paraphrase_ray.sweep.driver import SPACE_FILE, run_sweep

    spec = spec_from_dict(tiny_space(tiny_model_dir))
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(spec, "never", str(tmp_path), resume=True)
    taken = SweepStorage.parse(str(tmp_path), "taken")
    taken.write_bytes(SPACE_FILE, b"{}")
    taken.write_bytes("tuner.pkl", b"")  # what Tuner.can_restore looks for
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        run_sweep(spec, "taken", str(tmp_path))


# --------------------------------------------------------------------------------------- real local Ray
@pytest.mark.slow
def test_fractional_gpus_pack_four_trials_on_one_card(ray_session, tmp_path):
    """The default space's resources (cpu 2, gpu 0.25) put four trials on one GPU at once (the shared Ray has one
    logical GPU and CPUs to spare: as one L4 worker)."""
    import ray
    from ray import tune

    from paraphrase_ray.sweep.driver import trial_resources

    spec = load_spec(ROOT / "search_spaces" / "default.yaml")

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.n = 0

        def arrive(self) -> int:
            self.n += 1
            return self.n

        def count(self) -> int:
            return self.n

    def probe(config):
        barrier = ray.get_actor("barrier", namespace="packing-test")
        ray.get(barrier.arrive.remote())
        deadline = time.time() + 120  # process start-up is slow on a busy machine; packing is what counts
        while ray.get(barrier.count.remote()) < 4 and time.time() < deadline:
            time.sleep(0.2)
        together = ray.get(barrier.count.remote()) == 4  # all four trials alive at once
        tune.report({"together": together, "gpus": ",".join(map(str, ray.get_gpu_ids()))})

    assert ray.available_resources().get("GPU") == 1 and ray.available_resources()["CPU"] >= 8  # room for four
    barrier = Barrier.options(name="barrier", namespace="packing-test").remote()
    try:
        ray.get(barrier.count.remote())
        tuner = tune.Tuner(
            tune.with_resources(probe, trial_resources(spec)),
            param_space={"i": tune.grid_search([0, 1, 2, 3])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials),
            run_config=tune.RunConfig(verbose=0, storage_path=str(tmp_path)),
        )
        df = tuner.fit().get_dataframe()
    finally:
        ray.kill(barrier)
    assert len(df) == 4 and set(df["gpus"]) == {"0"}  # all four on the one card
    assert df["together"].all()  # and all four at the same time


def _saved_statuses(exp: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved (what --resume restores)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(tj) for tj, _ in data["trial_data"])}


def _finished(exp: Path) -> dict[str, list[dict]]:
    """Trials whose final report is in result.json *and* that the saved state marks TERMINATED: a final report
    reaches result.json before Tune's next state save records the trial as done (until then --resume re-runs it
    from its last checkpoint, which reports once more)."""
    saved = _saved_statuses(exp)
    return {
        t: lines for t, lines in _result_lines(exp).items()
        if lines and "train_status" in lines[-1] and saved.get(t) == "TERMINATED"
    }


def _result_lines(exp: Path) -> dict[str, list[dict]]:
    out = {}
    for f in exp.glob("run_trial_*/result.json"):
        out[f.parent.name.split("_")[2]] = [
            json.loads(line) for line in f.read_text().splitlines() if line.strip()
        ]
    return out


@pytest.mark.slow
def test_real_sweep_interrupted_then_resumed(ray_session, tmp_path, tiny_model_dir):
    """A real tiny sweep on file:// storage: ASHA stops some trials, a failing trial does not stop the others,
    Ctrl-C interrupts it, --resume finishes it without re-running finished trials, and the results are complete
    and loadable."""
    from paraphrase_ray.cli.main import main
    from paraphrase_ray.generation.generate import paraphrase
    from paraphrase_ray.models import load_model
    from paraphrase_ray.prompt.bundle import load_bundle
    from paraphrase_ray.prompt.directory import PromptMeta

    space = tmp_path / "tiny.yaml"
    data = tiny_space(tiny_model_dir)
    data["run"]["train"]["steps"] = 20  # evals at 10 and 20: ASHA's rungs (10, 20) are the same as at 30 steps
    space.write_text(yaml.safe_dump(data))
    exp = tmp_path / "runs" / "tiny"
    # A file:// URI stands in for gs://: Tune's state and checkpoints and our leaderboard, plot and best/ all
    # go through pyarrow's filesystem layer, as they do for a bucket.
    args = ["tune", "--space", str(space), "--storage", f"file://{tmp_path}/runs"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "paraphrase_ray.cli.main", *args],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:  # interrupt once a trial has finished (its final report carries train_status, the state says so)
        deadline = time.time() + 600  # generous: a busy 2-core machine starts Ray and 3 processes slowly
        while time.time() < deadline and proc.poll() is None:
            if _finished(exp):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert rc == 130, first_log[-3000:]
    assert "--resume" in first_log and not (exp / "best").exists()
    done_before = _finished(exp)
    assert done_before

    assert main([*args, "--resume"]) == 0  # in-process, on the run's shared Ray (tune attaches to it)
    after = _result_lines(exp)
    for tid, lines in done_before.items():  # finished trials were neither re-run nor lost
        assert after[tid] == lines

    with open(exp / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    trials = [r for r in rows if r["status"] != "baseline"]
    assert len(trials) == 6 and len(rows) == 7
    # the tiny OPT has no chat template: one baseline, the plain zero-shot, scored as zero_shot.json says
    (baseline,) = [r for r in rows if r["status"] == "baseline"]
    zero_shot = json.loads((exp / "zero_shot.json").read_text())
    assert baseline["trial_id"] == "zero-shot" and [z["system"] for z in zero_shot] == ["zero-shot"]
    assert float(baseline["objective"]) == pytest.approx(zero_shot[0]["objective"], abs=1e-4)
    statuses = [r["status"] for r in trials]
    assert statuses.count("error") == 1 and "pruned" in statuses and "completed" in statuses
    failed = next(r for r in trials if r["status"] == "error")
    assert failed["train.device"] == "cuda:99" and "cuda" in failed["error"].lower()
    assert {r["prompt.init"] for r in trials if r["status"] != "error"} == {"vocab", "random", "text"}
    assert len({r["prompt.n_tokens"] for r in trials}) == 6
    # the base model was loaded once per worker process: some trial ran in an already-used process
    assert any(int(r["worker_trial"] or 0) >= 2 for r in trials)

    import matplotlib.image

    assert matplotlib.image.imread(exp / "sweep.png").shape[1] > 600
    bundle = load_bundle(exp / "best", expected_dim=16)
    assert bundle.meta["sweep"] == "tiny" and bundle.meta["trial_id"] == trials[0]["trial_id"]
    assert bundle.meta["metrics"]["objective"] == pytest.approx(float(trials[0]["objective"]))
    assert bundle.prompt.n_tokens == int(trials[0]["prompt.n_tokens"]) and "template" in bundle.meta
    assert json.loads((exp / "zero_shot.json").read_text())[0]["n"] == 4
    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    info = PromptMeta.from_dict(bundle.meta)
    template, gen = info.template, info.generation
    assert len(paraphrase(loaded, ["The cat sat on the mat."], bundle.prompt, template, gen)) == 1


def test_trial_resumed_at_its_last_checkpoint_still_reports_its_scores(tiny_model_dir, one_thread, tmp_path):
    """A driver killed between a trial's last checkpoint and its final report: on --resume the trial restarts at
    the end of training, evaluates nothing, and its final report must still carry the objective (Tune's strict
    metric check fails the sweep otherwise; seen in the multinode driver-kill test)."""
    import shutil

    from ray import tune

    from paraphrase_ray.sweep.driver import run_trial

    ctx = _context(tiny_model_dir)
    params = {"prompt.n_tokens": 3, "prompt.init": "vocab", "train.lr": 0.1, "train.device": "cpu"}
    kept = tmp_path / "checkpoint-last"
    first: list = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None and metrics["step"] == 30:
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(checkpoint.path, kept)
        first.append(metrics)

    run_trial(params, ctx, report=report, get_checkpoint=lambda: None, client=Scorer())
    resumed: list = []
    run_trial(params, ctx, report=lambda m, checkpoint=None: resumed.append(m),
              get_checkpoint=lambda: tune.Checkpoint.from_directory(str(kept)), client=Scorer())
    assert len(resumed) == 1 and resumed[0]["resumed_from_step"] == 30 and resumed[0]["step"] == 30
    assert resumed[0]["objective"] == pytest.approx(first[-1]["objective"])
