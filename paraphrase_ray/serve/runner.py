"""Running the Serve app from a shell or a script: ``paraphrase-ray serve``, a local start/stop, and the demo.

    paraphrase-ray serve --prompt best=runs/best --prompt other=runs/other   # foreground, Ctrl-C stops
    python -m paraphrase_ray.serve.runner --demo PROMPT_DIR                   # deploy, ask, print, shut down

``serve run serve/config.yaml`` needs none of this: it imports ``serving:app_builder`` directly.
"""

import os
import signal
import time

from ray import serve

from paraphrase_ray.serve.deployments import APP_NAME, build_app
from paraphrase_ray.serve.protocol import ENV_API_KEY, ZERO_SHOT, ServeSettings, parse_prompt_specs

_STARTED = {"ray": False}  # whether start_local started the Ray this process is connected to


def start_local(
    address: str | None = None,
    num_cpus: int | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    log_level: str | None = None,
) -> None:
    """Connect to ``address`` or start a fresh local Ray (never someone else's), then Serve on host:port.

    ``log_level`` (e.g. "WARNING") quiets Serve's own actors, whose INFO lines reach a driver that
    forwards worker logs (the demo's Ray does, for Tune's trials)."""
    import ray

    if not ray.is_initialized():
        _STARTED["ray"] = True  # ours to shut down later; a Ray that was already running is left alone
        kwargs = (
            {"address": address}
            if address
            else {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
        )
        ray.init(**kwargs, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": host, "port": port}, **_logging(log_level))


def _logging(log_level: str | None) -> dict:
    return {"logging_config": {"log_level": log_level}} if log_level else {}


def run_local(
    settings: ServeSettings,
    host: str,
    port: int,
    address: str | None = None,
    device: str = "auto",
    replica_cpus: int | None = None,
    log_level: str | None = None,
) -> str:
    """Deploy ``settings`` on a local (or given) Ray; returns the base URL once the app is ready.

    ``replica_cpus`` (default: all of a Ray we started, else one) is also the replica's torch threads."""
    import ray

    start_local(address, port=port, host=host, log_level=log_level)
    # a Ray we started is ours: the replica may use all of it; in someone else's, it asks for one CPU
    ours = address is None and _STARTED["ray"]
    cpus = replica_cpus or (int(ray.cluster_resources().get("CPU", 1)) if ours else 1)
    gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    serve.run(
        build_app(settings, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}),
        name=APP_NAME,
        route_prefix="/",
        **_logging(log_level),
    )
    return f"http://{host}:{port}"


def shutdown(local: bool = True) -> None:
    """A local Ray that ``start_local`` started: stop Serve and Ray. Otherwise (a cluster, or a Ray that was
    already running in this process): delete only this application and leave the rest running."""
    import ray

    if not ray.is_initialized():
        return
    ours = local and _STARTED["ray"]
    try:
        serve.shutdown() if ours else serve.delete(APP_NAME)
    finally:
        if ours or not local:
            ray.shutdown()  # disconnect from a cluster; stop a Ray we started
            _STARTED["ray"] = False


def cmd_serve(args) -> int:
    """``paraphrase-ray serve``: run in the foreground until Ctrl-C (also during start-up), then clean up."""
    key = args.api_key or os.environ.get(ENV_API_KEY) or None
    limits = {k: getattr(args, k) for k in ("max_queued_rows", "request_timeout_s") if hasattr(args, k)}
    settings = ServeSettings(prompts=tuple(args.prompt), device=args.device, api_key=key, **limits)
    names = [n for n, _ in parse_prompt_specs(settings.prompts)]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(
            f"warning: binding {args.host} without an API key; anyone who can reach it may use it "
            f"(set --api-key or {ENV_API_KEY})"
        )
    # Ctrl-C / SIGINT stops the server even when this process inherited SIGINT as ignored (POSIX shells start
    # background jobs `paraphrase-ray serve ... &` that way, and Python then installs no handler); SIGTERM (process
    # managers, `kill`) shuts down the same clean way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        url = run_local(settings, args.host, args.port, args.address, args.device)
        print(
            f"serving prompts {', '.join(names)} (default {names[0]}; also {ZERO_SHOT!r}) at {url}  "
            f"docs: {url}/docs  auth: {'on' if key else 'off'}  (Ctrl-C stops)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        shutdown(local=args.address is None)
    return 0


DEMO_TEXTS = (
    "The committee approved the new budget after a long debate.",
    "She could not attend the meeting because her flight was delayed.",
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask_all(url: str, texts: list[str] | tuple[str, ...] = DEMO_TEXTS) -> None:
    """Ask every deployed prompt (and zero-shot) for ``texts`` at once over HTTP; print answers and batching."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        info = client.get("/prompts").json()
        names = [p["name"] for p in info["prompts"]]
        print(f"serving {', '.join(names)} on {info['base_model']} at {url}")

        def ask(name: str) -> dict:  # concurrent requests: their rows share one forward pass
            r = client.post("/paraphrase", json={"texts": list(texts), "prompt": name})
            r.raise_for_status()
            return r.json()

        with ThreadPoolExecutor(len(names)) as pool:
            for answer in pool.map(ask, names):
                print(f"[{answer['prompt']}]")
                for res in answer["results"]:
                    print(f"  {res['text']}\n    -> {res['paraphrase']}")
        st = client.get("/stats").json()
        print(
            f"{st['rows']} rows in {st['batches']} forward passes ({st['mixed_prompt_batches']} mixed-prompt)"
        )


def demo(prompt_dirs: list[str], port: int = 0, texts: list[str] | None = None) -> int:
    """Deploy the prompts, ask every prompt (and zero-shot) at once over HTTP, print the answers, shut down."""
    url = run_local(ServeSettings(prompts=tuple(prompt_dirs)), "127.0.0.1", port or free_port())
    try:
        ask_all(url, texts or DEMO_TEXTS)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    from paraphrase_ray.serve import (
        runner as serve_runner,  # the importable module, so Ray pickles classes by reference
    )

    parser = argparse.ArgumentParser(
        description="Deploy prompts with Ray Serve, ask once over HTTP, shut down."
    )
    parser.add_argument("--demo", nargs="+", required=True, metavar="[NAME=]DIR", help="prompt directories")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    ns = parser.parse_args()
    sys.exit(serve_runner.demo(ns.demo, ns.port))
