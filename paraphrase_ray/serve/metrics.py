"""What a replica counts, recorded twice: in ``ray.serve.metrics`` and in a local summary for ``GET /stats``.

Ray exports the first on every node's metrics port (``ray start --metrics-export-port``) with the deployment,
replica and application as tags, so Prometheus sums them across replicas; ``/stats`` shows this replica only.

    r = ResponseMetrics()         # in the HTTP ingress replica (Ray metrics must be created in the worker process)
    r.response("/paraphrase", 200)
    m = ReplicaMetrics()          # in the model replica
    m.admitted(rows=4); m.batch(size=12, mixed=True); m.generated(0.8)

Names as Prometheus shows them (Ray adds the ``ray_`` prefix; counters end in ``_total``) are ``EXPORTED``.
"""

import os
from collections import Counter
from typing import Any

from ray.serve import metrics

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
REQUESTS, ROWS, BATCH_SIZE = "paraphrase_requests", "paraphrase_rows", "paraphrase_batch_size"
MIXED, GEN_SECONDS, QUEUED = "paraphrase_mixed_prompt_batches", "paraphrase_generate_seconds", "paraphrase_queued_rows"
EXPORTED = (
    f"ray_{REQUESTS}_total", f"ray_{ROWS}_total", f"ray_{BATCH_SIZE}_bucket", f"ray_{MIXED}_total",
    f"ray_{GEN_SECONDS}_bucket", f"ray_{QUEUED}",
)


class ResponseMetrics:
    """HTTP responses of one ingress replica by route and status."""

    def __init__(self) -> None:
        self.statuses: Counter = Counter()  # HTTP status -> responses
        self._requests = metrics.Counter(REQUESTS, "HTTP responses by route and status", tag_keys=("route", "status"))

    def response(self, route: str, status: int) -> None:
        self.statuses[str(status)] += 1
        self._requests.inc(tags={"route": route, "status": str(status)})

    def summary(self) -> dict[str, Any]:
        return {
            "responses": dict(sorted(self.statuses.items())),
            "rejected": {k: v for k, v in self.statuses.items() if int(k) >= 400},
            "ingress_pid": os.getpid(),
        }


class ReplicaMetrics:
    """Counters of one model replica; every method updates the Ray metric and the local summary."""

    def __init__(self) -> None:
        self.local: Counter = Counter()  # requests, rows, batches, batch_rows, mixed_prompt_batches, gen_s
        self.batch_sizes: Counter = Counter()  # rows per forward pass -> count
        self.queued_rows = 0
        self._rows = metrics.Counter(ROWS, "texts admitted to the batch queue")
        self._batch = metrics.Histogram(BATCH_SIZE, "rows per forward pass", boundaries=BATCH_BOUNDARIES)
        self._mixed = metrics.Counter(MIXED, "forward passes whose rows use more than one prompt")
        self._gen = metrics.Histogram(GEN_SECONDS, "seconds per generation batch", boundaries=SECONDS_BOUNDARIES)
        self._queued = metrics.Gauge(QUEUED, "texts admitted and not yet answered")
        self._queued.set(0)

    def admitted(self, rows: int) -> None:
        self.local["requests"] += 1
        self.local["rows"] += rows
        self._rows.inc(rows)
        self.queue(rows)

    def queue(self, delta: int = 0) -> None:
        """Change the queue depth by ``delta``; with no delta, report it again.

        Ray drops a gauge that was not set within two report intervals, so ``check_health`` re-reports it.
        """
        self.queued_rows += delta
        self._queued.set(self.queued_rows)

    def batch(self, size: int, mixed: bool) -> None:
        self.batch_sizes[size] += 1
        self.local["batches"] += 1
        self.local["batch_rows"] += size
        self._batch.observe(size)
        if mixed:
            self.local["mixed_prompt_batches"] += 1
            self._mixed.inc()

    def generated(self, seconds: float) -> None:
        self.local["gen_s"] += seconds
        self._gen.observe(seconds)

    def summary(self) -> dict[str, Any]:
        """``GET /stats`` (with the ingress's ``ResponseMetrics``): this replica's counters, readable."""
        import torch

        st, batches = self.local, self.local["batches"]
        return {
            "requests": st["requests"],
            "rows": st["rows"],
            "batches": batches,
            "mean_batch_size": round(st["batch_rows"] / batches, 3) if batches else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "mixed_prompt_batches": st["mixed_prompt_batches"],
            "generate_seconds": round(st["gen_s"], 3),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued_rows": self.queued_rows,
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
