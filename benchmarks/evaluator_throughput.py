"""Throughput of the shared Evaluator actor vs in-process scoring, one JSON line per measurement.

A request is ``--rows`` (source, reference, prediction) triples, as one trial's evaluation step sends. By
default every request scores the same held-out rows with its own predictions, as the trials of a sweep do
(``--distinct-sources``: each request scores other rows). Measurements, all in one run on one machine:

- ``inprocess``: ``metrics.score`` in this process, one request at a time: what a trial would do alone.
- ``inprocess_cached``: the same with an ``EmbeddingCache`` (a trial could cache its fixed rows too).
- ``actor``: N concurrent callers (asyncio, each keeps one request in flight) against the default actor:
  batching and the embedding cache on.
- ``actor_nocache``: batching on, cache off (at the largest N): what batching alone buys.
- ``actor_unbatched``: batching and cache off (at the largest N): one encode call per request.

Besides requests/s (wall clock) each line has ``requests_per_cpu_s``: requests per CPU-second of the scoring
process (this driver for ``inprocess*``, the actor otherwise). On a shared, busy machine wall time measures
the neighbours; CPU time still measures the work. Torch uses ``--actor-cpus`` threads everywhere.

    python benchmarks/evaluator_throughput.py --callers 1 4 16 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from pathlib import Path

import ray
import torch

from paraphrase_ray.evaluation.embedder import EmbeddingCache, load_embedder
from paraphrase_ray.evaluation.evaluator import get_evaluator, shutdown_evaluator
from paraphrase_ray.evaluation.metrics import score

NAMESPACE = "paraphrase-ray-bench"
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
    """Triples for request k of a caller.

    Predictions differ per (caller, k): a quarter are copies of the source (what a bad prompt does), the rest
    are scrambled pool sentences or truncations: new strings, as generated text is, so the actor's embedding
    cache can only help with sources, references and copies.
    """
    start = (caller * 7919 + k * rows) % len(pairs) if distinct else 0
    window = [pairs[(start + j) % len(pairs)] for j in range(rows)]
    rng = random.Random(f"{caller}-{k}")
    preds = []
    for s, _ in window:
        kind = rng.randrange(4)
        if kind == 0:
            preds.append(s)
            continue
        words = (s if kind == 1 else pairs[rng.randrange(len(pairs))][kind - 2]).split()
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
        del words[rng.randrange(len(words))]
        preds.append(" ".join(words) + f" {rng.randrange(10**6)}")  # the number keeps each string new
    return [s for s, _ in window], [t for _, t in window], preds


def emit(mode: str, callers: int, args, wall: float, cpu: float, lat: list[float], **extra) -> None:
    record = {
        "mode": mode,
        "callers": callers,
        "rows_per_request": args.rows,
        "requests": args.requests,
        "seconds": round(wall, 3),
        "requests_per_s": round(args.requests / wall, 2),
        "rows_per_s": round(args.requests * args.rows / wall, 1),
        "requests_per_cpu_s": round(args.requests / cpu, 2),
        "p50_latency_ms": round(1000 * statistics.median(lat), 1),
        "p95_latency_ms": round(1000 * sorted(lat)[int(0.95 * (len(lat) - 1))], 1),
        **extra,
    }
    print(json.dumps(record), flush=True)


def bench_inprocess(pairs, args, cached: bool) -> None:
    embedder = load_embedder(device="cpu")
    cache = EmbeddingCache() if cached else None
    for k in range(2):  # warm-up
        score(*make_request(pairs, 0, k, args.rows, args.distinct_sources), embedder)
    lat = []
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(args.requests):
        t = time.perf_counter()
        req = make_request(pairs, k % 16, k, args.rows, args.distinct_sources)
        score(*req, embedder, cache=cache)
        lat.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    emit(
        "inprocess_cached" if cached else "inprocess",
        1,
        args,
        wall,
        cpu,
        lat,
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


def bench_actor(pairs, args, mode: str, callers_list: list[int]) -> None:
    batched, cached = mode in ("actor", "actor_nocache"), mode == "actor"
    name = f"bench-evaluator-{uuid.uuid4().hex[:6]}"
    handle = get_evaluator(
        name,
        NAMESPACE,
        num_cpus=args.actor_cpus,
        batch_wait_s=args.batch_wait_ms / 1000 if batched else 0.0,
        max_batch_rows=args.max_batch_rows if batched else args.rows,  # one request per batch when off
        cache_items=20_000 if cached else 0,
    )
    ray.get(handle.info.remote())  # model loaded
    try:
        for callers in callers_list:
            asyncio.run(drive(handle, pairs, callers, max(4, callers), args))  # warm-up (fills the cache)
            before = ray.get(handle.info.remote())
            wall, lat = asyncio.run(drive(handle, pairs, callers, args.requests, args))
            after = ray.get(handle.info.remote())
            batches = after["batches"] - before["batches"]
            emit(
                mode,
                callers,
                args,
                wall,
                after["cpu_s"] - before["cpu_s"],
                lat,
                mean_requests_per_batch=round((after["requests"] - before["requests"]) / max(1, batches), 2),
                torch_threads=after["torch_threads"],
            )
    finally:
        shutdown_evaluator(name, NAMESPACE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--callers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--rows", type=int, default=16, help="triples per request")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="actor num_cpus (= its torch threads)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-rows", type=int, default=512)
    p.add_argument("--distinct-sources", action="store_true", help="each request scores other rows")
    p.add_argument("--no-ablations", action="store_true", help="skip actor_nocache and actor_unbatched")
    args = p.parse_args()

    pairs = load_pairs()
    torch.set_num_threads(max(1, int(args.actor_cpus)))  # same CPU budget in-process as the actor gets
    ray.init(num_cpus=max(2, int(args.actor_cpus)), include_dashboard=False, log_to_driver=False)
    try:
        bench_inprocess(pairs, args, cached=False)
        bench_inprocess(pairs, args, cached=True)
        bench_actor(pairs, args, "actor", args.callers)
        if not args.no_ablations:
            bench_actor(pairs, args, "actor_nocache", [max(args.callers)])
            bench_actor(pairs, args, "actor_unbatched", [max(args.callers)])
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
