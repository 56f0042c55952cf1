"""`make demo`: the whole product on the embedded offline defaults, end to end.

1. quickstart sweep (search_spaces/quickstart.yaml) on smollm2-135m: leaderboard, plot, best prompt export
2. paraphrase a few sentences with the best prompt (offline path)
3. deploy the best prompt with Ray Serve, send requests over HTTP, print the answers, shut down

One process and one local Ray for all three steps, each through the functions its CLI command calls
(``sweep.driver.report_sweep``, ``cli.jobs.paraphrase_job``, ``serve.runner.LocalServe``), printing what the
command prints. Serve's controller and proxy start beside the sweep; step 3's deployment starts in the
background once step 1 has exported the prompt, so the model replica's start-up overlaps step 2's model load
and decoding (on 2 cores each is mostly one thread). The end is ``ray.shutdown()``: it stops Serve with the
rest of the Ray this demo started (nothing is in flight by then; Serve's graceful drain would only wait).

Safe to re-run: a finished sweep of the same name is reloaded (``--resume``) instead of trained again.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

SENTENCES = [
    "The weather was so cold that the lake froze overnight.",
    "The company reported higher profits than analysts had expected.",
    "She finished the marathon despite a painful knee injury.",
]


def _background(fn, *args, **kwargs) -> Future:
    """``fn`` in a daemon thread: a Serve call still waiting when the demo ends never holds the process open."""
    fut: Future = Future()

    def target() -> None:
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(e)

    threading.Thread(target=target, name="serve", daemon=True).start()
    return fut


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(storage: str = "runs/sweeps", name: str = "quickstart") -> int:
    import ray
    from ray import tune

    from paraphrase_ray.cli.jobs import flags, job_summary, paraphrase_job
    from paraphrase_ray.files import write_records
    from paraphrase_ray.serve import runner as serve_runner
    from paraphrase_ray.serve.protocol import ServeSettings
    from paraphrase_ray.sweep.driver import init_ray, report_sweep
    from paraphrase_ray.sweep.spec import load_spec

    t0 = time.perf_counter()
    space = Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml"
    sweep_dir = Path(storage) / name
    # torch (~1.5 s to import) is needed by the sweep's first step; import it while Ray starts its processes
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    init_ray(None)  # a fresh local Ray, ours: the sweep and Serve both run on it
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would land inside Tune's table
    port = serve_runner.free_port()
    server = serve_runner.LocalServe()  # on the Ray above, not its own: the final ray.shutdown() stops both
    # Serve's controller and HTTP proxy start now, beside the sweep's start-up: they need no prompt, and once
    # up they idle; the deployment itself (model replica) waits for the sweep's best prompt.
    serve_started = _background(server.start, port=port, host="127.0.0.1", log_level="WARNING")
    try:
        _banner(f"1/3 quickstart sweep -> {sweep_dir}")
        resume = sweep_dir.is_dir() and tune.Tuner.can_restore(str(sweep_dir.resolve()))  # reload, not re-run
        print(
            f"$ paraphrase-ray tune --space {space} --name {name} --storage {storage}" + " --resume" * resume
        )
        rc = report_sweep(load_spec(str(space)), name, storage, resume, space=str(space))
        if rc != 0:
            return rc
        best = sweep_dir / "best"
        if not (best / "adapter_model.safetensors").is_file():
            print(f"error: the sweep exported no best prompt in {best}", file=sys.stderr)
            return 1

        # Step 3's deployment, started now: it runs while step 2 loads the model and decodes.
        settings = ServeSettings(prompts=(f"best={best}",))
        cpus = int(ray.cluster_resources().get("CPU", 1))  # the sweep is over: the replica may use all of it

        def deploy_best() -> str:
            serve_started.result()  # the controller first (a resumed sweep returns in seconds)
            return server.deploy(settings, "127.0.0.1", port, replica_cpus=cpus, log_level="WARNING")

        deploy = _background(deploy_best)

        _banner("2/3 paraphrases from the best prompt (offline)")
        inp = sweep_dir / "demo_input.jsonl"
        inp.write_text("".join(json.dumps({"source": s}) + "\n" for s in SENTENCES))
        out = sweep_dir / "demo_output.jsonl"
        print(f"$ paraphrase-ray paraphrase --prompt {best} --input {inp} --output {out}", flush=True)
        cands, stats, scores = paraphrase_job(str(best), SENTENCES)  # the command's defaults: K candidates, reranked
        write_records(out, [{"source": s, "prediction": c[0], **flags(sc[0])} for s, c, sc in zip(SENTENCES, cands, scores)])
        print(job_summary(stats, out), file=sys.stderr)
        for src, c in zip(SENTENCES, cands):
            print(f"  {src}\n    -> {c[0]}")

        _banner("3/3 Ray Serve over HTTP")
        print(f"(the same app from a shell: paraphrase-ray serve --prompt best={best})", flush=True)
        serve_runner.ask_all(deploy.result())
    finally:
        ray.shutdown()
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _logging_to_stderr() -> None:
    """The library's "paraphrase_ray" log lines on stderr as plain text, as the command line shows them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("paraphrase_ray")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


if __name__ == "__main__":
    from paraphrase_ray.errors import ParaphraseRayError

    _logging_to_stderr()
    try:
        rc = run()
    except ParaphraseRayError as e:  # a user-fixable problem (a bad search space, an unreachable store): one line
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:  # Ray is stopped by run()'s finally; the sweep resumes on the next `make demo`
        print("interrupted", file=sys.stderr)
        rc = 130
    # Everything is written and Ray is stopped: skip the interpreter's teardown of the torch, transformers and
    # Ray modules (~2 s on 2 cores) that would only delay the prompt.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
