"""The OpenAI routes beside /paraphrase, and the cost of a prompt's first use from the prompt store.

One local server (or ``--url``) serves ``--prompt`` and a prompt store in a temp directory. Two measurements:

1. latency: ``--clients`` closed-loop clients send one text per request, greedy, the same prompt and texts, to
   ``POST /paraphrase`` and to ``POST /v1/completions`` in alternating windows (``--rounds``), so both see the
   same machine; p50 / p99 per route. The difference is what the OpenAI translation and response cost.
2. first use: ``--store-prompts`` copies of the prompt are written into the store while the server runs; each gets
   one request (first use: listed, loaded, checked, moved to the device, its prefix cache filled) then a second
   (warm). Reported: first vs warm latency per copy, and the replica's own load time (``/stats`` prompt_store).

    python benchmarks/serve_openai.py --prompt best=runs/sweeps/quickstart/best --clients 8 --seconds 120
    python benchmarks/serve_openai.py --prompt best=DIR --clients 2 --seconds 4 --rounds 1 --store-prompts 2  # smoke
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file
from serve_load import cpu_name, sample_texts


async def window(url: str, headers: dict, route: str, model: str, texts: list[str], clients: int, seconds: float):
    """``clients`` closed-loop clients on ``route`` for ``seconds``: latencies (s) of the 200s, and the errors."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    latencies, errors = [], 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        stop = time.perf_counter() + seconds

        async def worker(c: int) -> None:
            nonlocal errors
            i = c * 7
            while time.perf_counter() < stop:
                text = texts[i % len(texts)]
                body = ({"text": text, "prompt": model} if route == "/paraphrase"
                        else {"prompt": text, "model": model, "temperature": 0})
                t0 = time.perf_counter()
                r = await client.post(route, json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += 1

        await asyncio.gather(*(worker(c) for c in range(clients)))
    return latencies, errors


def usable_texts(url: str, headers: dict, model: str, texts: list[str]) -> list[str]:
    """The texts the prompt accepts (within its source-token limit): each asked once, the 200s kept."""
    with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
        ok = [t for t in texts if c.post("/paraphrase", json={"text": t, "prompt": model}).status_code == 200]
    if not ok:
        raise SystemExit(f"the server answered none of the {len(texts)} texts for {model!r}")
    return ok


def percentiles(lat: list[float]) -> dict:
    lat = sorted(lat)
    if not lat:
        return {"requests": 0, "p50_ms": None, "p99_ms": None}
    return {"requests": len(lat), "p50_ms": round(statistics.median(lat) * 1e3, 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 1)}


def first_use(url: str, headers: dict, source: Path, store: Path, copies: int, text: str) -> dict:
    """Copy ``source`` into the store ``copies`` times while serving; time each copy's first and second request."""
    rows = []
    with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
        for k in range(copies):
            name = f"bench/copy-{k}-{time.time_ns()}"
            shutil.copytree(source, store / name)
            # new values per copy: the prefix cache is keyed by a prompt's values, so an identical copy would find
            # the original's [prompt][template head] prefill already cached and understate a real first use
            weights = store / name / "adapter_model.safetensors"
            tensors = {n: t + 1e-4 * (k + 1) for n, t in load_file(weights).items()}
            save_file(tensors, weights)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json={"model": name, "prompt": text, "temperature": 0})
                r.raise_for_status()
                times.append(time.perf_counter() - t0)
            rows.append(times)
        st = c.get("/stats").json()["prompt_store"]
    first, warm = [t[0] for t in rows], [t[1] for t in rows]
    return {
        "copies": copies,
        "first_request_ms_median": round(statistics.median(first) * 1e3, 1),
        "warm_request_ms_median": round(statistics.median(warm) * 1e3, 1),
        "first_use_overhead_ms_median": round(statistics.median(f - w for f, w in rows) * 1e3, 1),
        "replica_load_ms_median": st["load_ms_median"], "replica_loads": st["loads"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", metavar="[NAME=]DIR", help="the prompt to serve (the first is used)")
    p.add_argument("--url", help="an already running server (with --store DIR: its prompt store)")
    p.add_argument("--store", help="the running server's prompt store (a local directory), with --url")
    p.add_argument("--api-key", default=os.environ.get("PARAPHRASE_RAY_API_KEY"), help="bearer key for --url")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients per window")
    p.add_argument("--seconds", type=float, default=120, help="total seconds per route")
    p.add_argument("--rounds", type=int, default=2, help="alternate the routes this many times")
    p.add_argument("--texts", type=int, default=40, help="sample sources to cycle through (those the prompt accepts)")
    p.add_argument("--store-prompts", type=int, default=5, help="prompts copied into the store for the first-use cost")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the local replica runs")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    if not args.prompt:
        p.error("give --prompt [NAME=]DIR (the prompt to measure; with --url, the one the server serves)")

    from paraphrase_ray.serve import runner
    from paraphrase_ray.serve.protocol import ServeSettings, split_prompt_spec

    name, source = split_prompt_spec(args.prompt[0])
    tmp = Path(tempfile.mkdtemp(prefix="serve-openai-"))
    store = Path(args.store) if args.store else tmp / "store"
    store.mkdir(parents=True, exist_ok=True)
    url, server = args.url, runner.LocalServe()
    try:
        if url is None:
            settings = ServeSettings(prompts=tuple(args.prompt), prompt_store=str(store), device=args.device)
            url = server.deploy(settings, "127.0.0.1", runner.free_port(), device=args.device)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        texts = usable_texts(url, headers, name, sample_texts()[: args.texts])
        for route in ("/paraphrase", "/v1/completions"):  # warm-up: thread pools, the prefix cache
            asyncio.run(window(url, headers, route, name, texts, 2, 2))
        lat: dict[str, list[float]] = {"/paraphrase": [], "/v1/completions": []}
        errors = dict.fromkeys(lat, 0)
        for _ in range(args.rounds):  # --rounds 0: only the first-use cost
            for route in lat:
                got, err = asyncio.run(window(url, headers, route, name, texts, args.clients, args.seconds / args.rounds))
                lat[route] += got
                errors[route] += err
        cost = first_use(url, headers, Path(source), store, args.store_prompts, texts[0]) if args.store_prompts else None
        info = httpx.get(f"{url}/prompts", headers=headers, timeout=60).json()
    finally:
        if args.url is None:
            server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "model": info["base_model"], "prompt": name, "clients": args.clients, "seconds_per_route": args.seconds,
        "texts": len(texts),
        "routes": {route: {**percentiles(v), "errors": errors[route]} for route, v in lat.items()},
        "first_use": cost,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
