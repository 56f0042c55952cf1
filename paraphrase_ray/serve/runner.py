"""Running the Serve app from this process: a local (or cluster) start, the deployment, the clean stop.

``paraphrase-ray serve`` (``cli.commands.cmd_serve``) runs it in the foreground until Ctrl-C; ``paraphrase-ray
serve --demo`` (``demo``) deploys, asks every prompt once over HTTP, prints and shuts down; ``make demo`` and the
Serve benchmarks use ``LocalServe`` the same way::

    server = LocalServe()                                   # or LocalServe("auto"): the cluster this runs on
    url = server.deploy(ServeSettings(prompts=("best=runs/best",)), "127.0.0.1", free_port())
    ...
    server.shutdown()                                       # stops only what this process started

``serve run serve/config.yaml`` needs none of this: it imports ``serving:app_builder`` directly.
"""

from ray import serve

from paraphrase_ray.serve.deployments import APP_NAME, build_app
from paraphrase_ray.serve.protocol import ServeSettings


class LocalServe:
    """Serve from this process on the Ray at ``address``, or on a fresh local Ray of its own (never someone
    else's). It remembers whether it started the Ray this process is connected to, so ``shutdown`` stops that
    Ray only when it is its own: a Ray that was already running (the demo's, a test's) is left alone."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.started_ray = False  # set by start(): the Ray this process is connected to is ours to stop

    def start(
        self, port: int = 8000, host: str = "127.0.0.1", num_cpus: int | None = None, log_level: str | None = None
    ) -> None:
        """Connect to ``address`` or start a fresh local Ray, then Serve on host:port.

        ``log_level`` (e.g. "WARNING") quiets Serve's own actors, whose INFO lines reach a driver that
        forwards worker logs (the demo's Ray does, for Tune's trials)."""
        import ray

        if not ray.is_initialized():
            self.started_ray = True  # ours to shut down later; a Ray that was already running is left alone
            kwargs = (
                {"address": self.address}
                if self.address
                else {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
            )
            ray.init(**kwargs, logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": host, "port": port}, **_logging(log_level))

    def deploy(
        self,
        settings: ServeSettings,
        host: str,
        port: int,
        device: str = "auto",
        replica_cpus: int | None = None,
        log_level: str | None = None,
    ) -> str:
        """Start (if not yet) and deploy ``settings``; returns the base URL once the app is ready.

        ``replica_cpus`` (default: all of a Ray we started, else one) is also the replica's torch threads."""
        import ray

        self.start(port=port, host=host, log_level=log_level)
        # a Ray we started is ours: the replica may use all of it; in someone else's, it asks for one CPU
        ours = self.address is None and self.started_ray
        cpus = replica_cpus or (int(ray.cluster_resources().get("CPU", 1)) if ours else 1)
        gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        serve.run(
            build_app(settings, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}),
            name=APP_NAME,
            route_prefix="/",
            **_logging(log_level),
        )
        return f"http://{host}:{port}"

    def shutdown(self) -> None:
        """A local Ray that ``start`` started: stop Serve and Ray. Otherwise (a cluster, or a Ray that was
        already running in this process): delete only this application and leave the rest running."""
        import ray

        if not ray.is_initialized():
            return
        local = self.address is None
        ours = local and self.started_ray
        try:
            serve.shutdown() if ours else serve.delete(APP_NAME)
        finally:
            if ours or not local:
                ray.shutdown()  # disconnect from a cluster; stop a Ray we started
                self.started_ray = False


def _logging(log_level: str | None) -> dict:
    return {"logging_config": {"log_level": log_level}} if log_level else {}


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
    server = LocalServe()
    url = server.deploy(ServeSettings(prompts=tuple(prompt_dirs)), "127.0.0.1", port or free_port())
    try:
        ask_all(url, texts or DEMO_TEXTS)
    finally:
        server.shutdown()
    return 0

