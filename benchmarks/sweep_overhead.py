"""Per-trial overhead of a sweep, with Tune's actor reuse on (the default) and off, one JSON line per run.

Trials are nearly empty on purpose (2 training steps, 2 scored rows, 4 new tokens) so what is left is the
overhead: a new worker process, imports, the base model load, Tune's scheduling and reset. Both runs share one
local Ray (started once, so its start-up is not counted) and the same spec; each run creates its own Evaluator.

Per run: ``fit_s`` (Tuner.fit wall time), ``worker_processes``, ``fresh_setup_s`` / ``reused_setup_s`` (trial
function entry to first step, in a new / a reused process: model load included), ``reuse_gap_s`` (a reused
process: last report of one trial to the first line of the next) and ``overhead_s_per_trial`` (slot-seconds
held minus seconds spent training and scoring, per trial).

    python benchmarks/sweep_overhead.py --trials 6 --concurrent 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray

from paraphrase_ray.sweep.driver import run_sweep
from paraphrase_ray.sweep.spec import spec_from_dict


def space(model: str, trials: int, concurrent: int) -> dict:
    return {
        "run": {
            "model": model,
            "data": {"sources": ["sample"], "val_size": 8},
            "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "warmup_steps": 0},
            "generation": {"max_new_tokens": 4},
        },
        "search": {"prompt.n_tokens": {"type": "int", "low": 2, "high": 8}, "train.lr": [0.01, 0.1]},
        "searcher": {"name": "random", "seed": 0},
        "scheduler": {"name": "none", "grace_period": 2},
        "num_samples": trials,
        "max_concurrent_trials": concurrent,
        "resources": {"cpu": 1},
        "evaluator": {"cpu": 0, "n_examples": 2, "batch_size": 2},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    args = ap.parse_args()
    spec = spec_from_dict(space(args.model, args.trials, args.concurrent))
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as storage:
            for reuse in (True, False):
                t0 = time.perf_counter()
                out = run_sweep(spec, f"overhead-reuse-{reuse}", storage, verbose=0, reuse_actors=reuse)
                trials = [r for r in out.rows if r["status"] != "baseline"]
                print(
                    json.dumps(
                        {
                            "reuse_actors": reuse,
                            "model": args.model,
                            "trials": len(trials),
                            "concurrent": args.concurrent,
                            **out.overhead,
                            "trial_wall_s_mean": round(
                                sum(r["wall_s"] or 0 for r in trials) / len(trials), 2
                            ),
                            "run_sweep_s": round(time.perf_counter() - t0, 1),
                        }
                    ),
                    flush=True,
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
