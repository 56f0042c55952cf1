"""Load test of the Serve endpoint: N concurrent clients for T seconds vs one request at a time.

Both phases hit the same real HTTP endpoint in the same run (same replica, same machine), one text per
request, cycling through the bundled sample's sources; with several prompts each client uses one of them in
turn, so batches mix prompts. Mean batch size comes from the replica's ``/stats`` (rows per forward pass).
The phases alternate ``--rounds`` times so that, on a shared machine, both see the same drift in load.

    python benchmarks/serve_load.py --prompt a=runs/p1 --prompt b=runs/p2 --clients 16 --seconds 600
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 16   # an already running server
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import httpx


def sample_texts() -> list[str]:
    from paraphrase_ray.data import SAMPLE_PATH

    return [json.loads(line)["source"] for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]


async def phase(url: str, headers: dict, prompts: list[str], texts: list[str], clients: int, seconds: float):
    """``clients`` closed-loop clients for ``seconds`` (in-flight requests finish): raw latencies and counters."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=1800, limits=limits) as client:
        before = (await client.get("/stats")).json()
        latencies: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds

        async def worker(c: int) -> None:
            nonlocal errors
            i, n = c * 7, 0
            while time.perf_counter() < stop:
                # client c's n-th request: neighbouring clients ask different prompts at every step
                body = {"text": texts[i % len(texts)], "prompt": prompts[(c + n) % len(prompts)]}
                n += 1
                t0 = time.perf_counter()
                r = await client.post("/paraphrase", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        after = (await client.get("/stats")).json()
    delta = {k: after[k] - before[k] for k in ("rows", "batches", "mixed_prompt_batches")}
    return {"wall": wall, "latencies": latencies, "errors": errors, "load_avg": os.getloadavg()[0], **delta}


def summarize(clients: int, runs: list[dict]) -> dict:
    """One phase's windows merged: throughput = paraphrases / total wall time."""
    lat = sorted(x for r in runs for x in r["latencies"])
    wall = sum(r["wall"] for r in runs)
    batches, rows = sum(r["batches"] for r in runs), sum(r["rows"] for r in runs)
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "paraphrases": len(lat),
        "errors": sum(r["errors"] for r in runs),
        "paraphrases_per_s": round(len(lat) / wall, 3),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "mean_batch_size": round(rows / batches, 2) if batches else None,
        "mixed_prompt_batches": sum(r["mixed_prompt_batches"] for r in runs),
        "window_paraphrases_per_s": [round(len(r["latencies"]) / r["wall"], 3) for r in runs],
        "window_load_avg": [round(r["load_avg"], 1) for r in runs],
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", metavar="[NAME=]DIR", help="prompt dirs to serve (local run)")
    p.add_argument("--url", help="benchmark an already running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("PARAPHRASE_RAY_API_KEY"), help="bearer key for --url")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the load phase")
    p.add_argument("--seconds", type=float, default=120, help="total duration of each phase")
    p.add_argument(
        "--rounds", type=int, default=2, help="alternate the phases this many times (shared machines)"
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="server batch cap (local run)")
    p.add_argument("--batch-wait", type=float, default=0.01, help="server batch_wait_timeout_s (local run)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the local replica runs")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    if not args.url and not args.prompt:
        p.error("give --prompt DIR (one or more) to start a local server, or --url of a running one")

    from paraphrase_ray.serve import deployments as serving
    from paraphrase_ray.serve import runner as serve_runner

    url, server = args.url, serve_runner.LocalServe()
    if url is None:
        settings = serving.ServeSettings(
            prompts=tuple(args.prompt),
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait,
        )
        t0 = time.perf_counter()
        url = server.deploy(settings, "127.0.0.1", serve_runner.free_port(), device=args.device)
        print(f"server ready in {time.perf_counter() - t0:.0f} s at {url}", file=sys.stderr)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(f"{url}/prompts", headers=headers, timeout=60).json()
        prompts = [x["name"] for x in info["prompts"] if x["name"] != serving.ZERO_SHOT]
        texts = sample_texts()
        asyncio.run(phase(url, headers, prompts, texts, 2, 5))  # warm-up: first-call costs, thread pools
        window = args.seconds / args.rounds
        base_runs, load_runs = [], []
        for r in range(args.rounds):  # interleaved, so both phases see the machine's load drift alike
            base_runs.append(asyncio.run(phase(url, headers, prompts, texts, 1, window)))
            load_runs.append(asyncio.run(phase(url, headers, prompts, texts, args.clients, window)))
            b, ld = summarize(1, base_runs[-1:]), summarize(args.clients, load_runs[-1:])
            print(f"round {r + 1}: {b['paraphrases_per_s']} vs {ld['paraphrases_per_s']} /s", file=sys.stderr)
        base, load = summarize(1, base_runs), summarize(args.clients, load_runs)
        stats = httpx.get(f"{url}/stats", headers=headers, timeout=60).json()
    finally:
        if args.url is None:
            server.shutdown()
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "model": info["base_model"],
        "prompts": prompts,
        "torch_threads": stats["torch_threads"],
        "baseline": base,
        "load": load,
        "speedup": round(load["paraphrases_per_s"] / base["paraphrases_per_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
