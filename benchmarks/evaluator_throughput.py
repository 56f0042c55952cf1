"""Throughput of the shared Evaluator actor vs in-process scoring, one JSON line per measurement.

A request is ``--rows`` (source, reference, prediction) triples, as one trial's evaluation step sends. By
default the callers score the same held-out sources with their own predictions, as trials of a sweep do
(``--distinct-sources`` gives every caller its own sources). Measurements, all in one run on one machine:

- ``inprocess``: ``metrics.score`` in this process, one request at a time, torch threads = ``--actor-cpus``
  (the same CPU budget as the actor). This is what each trial would do without the actor.
- ``actor``: N concurrent callers (asyncio, each keeps one request in flight) against the batching actor.
- ``actor_unbatched``: the same actor code with batching off (one request per encode call).

    python benchmarks/evaluator_throughput.py --callers 1 4 16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

import ray
import torch

from paraphrase_ray.evaluator import get_evaluator, shutdown_evaluator
from paraphrase_ray.metrics import load_embedder, score

SAMPLE = Path(__file__).resolve().parents[1] / "paraphrase_ray" / "resources" / "sample.jsonl"
FALLBACK = [
    ("She could not attend the meeting because her flight was delayed.", "Her delayed flight kept her away."),
    (
        "The company expects profits to rise sharply next quarter.",
        "The firm predicts a steep rise in earnings.",
    ),
    (
        "Firefighters contained the blaze after nearly six hours.",
        "Crews controlled the fire after six hours.",
    ),
]


def load_pairs() -> list[tuple[str, str]]:
    if SAMPLE.is_file():
        rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
        pairs = [(r["source"], r["target"]) for r in rows if r.get("source") and r.get("target")]
        if pairs:
            return pairs
    return FALLBACK


def make_request(pairs: list[tuple[str, str]], caller: int, k: int, rows: int, distinct: bool):
    """Triples for request k of a caller: a rolling window over the pairs; predictions vary per caller."""
    start = ((caller * 7919 if distinct else 0) + k * rows) % len(pairs)
    window = [pairs[(start + j) % len(pairs)] for j in range(rows)]
    sources = [s for s, _ in window]
    refs = [t for _, t in window]
    preds = []
    for j, (s, t) in enumerate(window):
        kind = (caller + j) % 4  # a mix of what trials produce: paraphrases, copies, drift, truncations
        words = s.split()
        preds.append(
            [t, s, pairs[(start + j + 1) % len(pairs)][1], " ".join(words[: max(1, len(words) // 2)])][kind]
        )
    return sources, refs, preds


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def bench_inprocess(pairs, args) -> None:
    torch.set_num_threads(max(1, int(args.actor_cpus)))
    embedder = load_embedder(device="cpu")
    for k in range(2):  # warm-up
        score(*make_request(pairs, 0, k, args.rows, args.distinct_sources), embedder)
    lat = []
    t0 = time.perf_counter()
    for k in range(args.requests):
        t = time.perf_counter()
        score(*make_request(pairs, k % 16, k, args.rows, args.distinct_sources), embedder)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    emit(
        mode="inprocess",
        callers=1,
        rows_per_request=args.rows,
        requests=args.requests,
        seconds=round(wall, 3),
        requests_per_s=round(args.requests / wall, 2),
        rows_per_s=round(args.requests * args.rows / wall, 1),
        p50_latency_ms=round(1000 * statistics.median(lat), 1),
        torch_threads=torch.get_num_threads(),
    )


async def drive(handle, pairs, callers: int, total: int, args) -> tuple[float, list[float]]:
    """``callers`` coroutines, each with one request in flight, until ``total`` requests are done."""
    counter = iter(range(total))
    lat: list[float] = []

    async def caller(c: int) -> None:
        for k in counter:
            t = time.perf_counter()
            await handle.score.remote(*make_request(pairs, c, k, args.rows, args.distinct_sources))
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return time.perf_counter() - t0, lat


def bench_actor(pairs, args, batched: bool) -> None:
    name = f"bench-evaluator-{uuid.uuid4().hex[:6]}"
    handle = get_evaluator(
        name,
        "paraphrase-ray-bench",
        num_cpus=args.actor_cpus,
        batch_wait_s=args.batch_wait_ms / 1000 if batched else 0.0,
        max_batch_rows=args.max_batch_rows if batched else args.rows,  # one request per batch when off
    )
    ray.get(handle.info.remote())  # model loaded
    try:
        for callers in args.callers:
            asyncio.run(drive(handle, pairs, callers, max(4, callers), args))  # warm-up
            before = ray.get(handle.info.remote())
            wall, lat = asyncio.run(drive(handle, pairs, callers, args.requests, args))
            after = ray.get(handle.info.remote())
            batches = after["batches"] - before["batches"]
            emit(
                mode="actor" if batched else "actor_unbatched",
                callers=callers,
                rows_per_request=args.rows,
                requests=args.requests,
                seconds=round(wall, 3),
                requests_per_s=round(args.requests / wall, 2),
                rows_per_s=round(args.requests * args.rows / wall, 1),
                p50_latency_ms=round(1000 * statistics.median(lat), 1),
                p95_latency_ms=round(1000 * sorted(lat)[int(0.95 * (len(lat) - 1))], 1),
                mean_requests_per_batch=round((after["requests"] - before["requests"]) / max(1, batches), 2),
                torch_threads=after["torch_threads"],
            )
    finally:
        shutdown_evaluator(name, "paraphrase-ray-bench")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--callers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per measurement")
    p.add_argument("--rows", type=int, default=16, help="triples per request")
    p.add_argument("--actor-cpus", type=float, default=2.0, help="actor num_cpus (= its torch threads)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-rows", type=int, default=512)
    p.add_argument("--distinct-sources", action="store_true", help="callers score different sources")
    p.add_argument("--skip-unbatched", action="store_true")
    args = p.parse_args()

    pairs = load_pairs()
    ray.init(num_cpus=max(2, int(args.actor_cpus)), include_dashboard=False, log_to_driver=False)
    try:
        bench_inprocess(pairs, args)
        bench_actor(pairs, args, batched=True)
        if not args.skip_unbatched:
            bench_actor(pairs, args, batched=False)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
