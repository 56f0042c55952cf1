"""Soak test of the Serve endpoint (outside CI, bounded): C clients for M minutes, a share of bad requests.

Loopback only. Reports, per minute, p50/p99 latency of the good requests and the status counts; the RSS of the
model replica and of the HTTP ingress at start and end (their pids from ``/stats``; same machine); and flags
what must not happen: a good request that did not get 200, a bad one that got a 5xx, a replica that was
replaced, RSS growth over ``--rss-growth`` (share of the start), texts left queued at the end.

    python benchmarks/serve_soak.py --prompt best=runs/p                  # 10 minutes, 8 clients, 10% bad
    python benchmarks/serve_soak.py --prompt best=runs/p --minutes 1 --output soak.json
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import httpx
import psutil
from serve_load import cpu_name, free_port, sample_texts

BAD = [  # what a careless client sends; each must get a 4xx
    {"text": ""},
    {"text": "   "},
    {"texts": []},
    {"text": 5},
    {"text": "hi", "num_candidates": 99},
    {"text": "hi", "prompt": "no-such-prompt"},
    {"text": "hi", "colour": "red"},
    {"text": "x" * 5000},
]


def rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except psutil.Error:
        return None


def pcts(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p99_s": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3)}


async def soak(url: str, key: str | None, minutes: float, clients: int, bad_share: float, prompts: list[str]):
    texts, rng = sample_texts(), random.Random(0)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    minutes_log: list[dict] = [{"latencies": [], "status": Counter()} for _ in range(max(1, int(minutes + 0.999)))]
    flags: list[str] = []
    sent = [0]
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        start_stats = (await client.get("/stats")).json()
        t_start = time.perf_counter()
        stop = t_start + minutes * 60

        async def worker(c: int) -> None:
            i = c * 11
            while time.perf_counter() < stop:
                sent[0] += 1  # exactly bad_share of all requests are bad, spread evenly (not drawn at random)
                bad = int(sent[0] * bad_share) > int((sent[0] - 1) * bad_share)
                body = rng.choice(BAD) if bad else {"text": texts[i % len(texts)], "prompt": prompts[i % len(prompts)]}
                i += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/paraphrase", json=body)
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.perf_counter() - t0
                slot = minutes_log[min(len(minutes_log) - 1, int((t0 - t_start) / 60))]
                slot["status"][f"{'bad' if bad else 'good'} {status}"] += 1
                if not bad and status == 200:
                    slot["latencies"].append(took)
                elif not bad or not (isinstance(status, int) and 400 <= status < 500):
                    flags.append(f"{'bad' if bad else 'good'} request got {status}: {str(body)[:80]}")

        await asyncio.gather(*(worker(c) for c in range(clients)))
        end_stats = (await client.get("/stats")).json()
    return start_stats, end_stats, minutes_log, flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", action="append", default=[], metavar="[NAME=]DIR", help="prompts to serve")
    ap.add_argument("--url", help="an already running server on this machine (default: start one)")
    ap.add_argument("--api-key", default=os.environ.get("PARAPHRASE_RAY_API_KEY"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--bad-share", type=float, default=0.1)
    ap.add_argument("--rss-growth", type=float, default=0.10, help="flag RSS growth over this share of the start")
    ap.add_argument("--output", help="write the result JSON here too")
    args = ap.parse_args(argv)
    from paraphrase_ray.serve import deployments as serving
    from paraphrase_ray.serve import runner as serve_runner

    url, server = args.url, serve_runner.LocalServe()
    if url is None:
        if not args.prompt:
            ap.error("give --prompt (or --url)")
        url = server.deploy(serving.ServeSettings(prompts=tuple(args.prompt)), "127.0.0.1", free_port(), device="cpu")
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        ap.error("loopback only: the soak reads the replicas' RSS on this machine")
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        info = httpx.get(f"{url}/prompts", headers=headers, timeout=60).json()
        prompts = [p["name"] for p in info["prompts"]]
        httpx.post(f"{url}/paraphrase", json={"text": "Warm up, please."}, headers=headers, timeout=300)
        pids = httpx.get(f"{url}/stats", headers=headers, timeout=60).json()
        rss_start = {"model": rss_mb(pids["pid"]), "ingress": rss_mb(pids["ingress_pid"])}
        start, end, per_minute, flags = asyncio.run(
            soak(url, args.api_key, args.minutes, args.clients, args.bad_share, prompts)
        )
        rss_end = {"model": rss_mb(end["pid"]), "ingress": rss_mb(end["ingress_pid"])}
    finally:
        if args.url is None:
            server.shutdown()
    if (end["pid"], end["ingress_pid"]) != (start["pid"], start["ingress_pid"]):
        flags.append(f"a replica was replaced during the soak: {start['pid']} -> {end['pid']}")
    for k, before in rss_start.items():
        if before and rss_end[k] and rss_end[k] > before * (1 + args.rss_growth):
            flags.append(f"{k} RSS grew {before} -> {rss_end[k]} MB")
    if end["queued_rows"]:
        flags.append(f"{end['queued_rows']} texts still queued at the end")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "model": info["base_model"],
        "minutes": args.minutes, "clients": args.clients, "bad_share": args.bad_share,
        "per_minute": [{**pcts(m["latencies"]), "status": dict(m["status"])} for m in per_minute],
        "rss_mb_start": rss_start, "rss_mb_end": rss_end,
        "flags": flags[:20], "n_flags": len(flags),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main())
