"""Model health the HTTP ingress can read without queueing behind generation: a board each model replica posts to.

``GET /healthz`` used to ask a model replica, so under load it waited in the same queue as the paraphrases (and
got a 503 when that queue was full). Now every model replica posts its own health (``ParaphraseModel.
health_problem``: None, or a fixed sentence naming the problem, never an exception's text) to one small named
actor every ``PUBLISH_S``, from a thread of its own; the ingress reads the board:

    200  at least one replica of the application posted "healthy" within ``STALE_S``
    503  every fresh post names a problem, or none is fresh (no replica running: starting or being replaced)

The board is one detached actor per cluster (no CPU), shared by every application (posts are keyed by
application and replica); if it is lost, the next post or read creates it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

BOARD_NAME, BOARD_NAMESPACE = "paraphrase_ray_health", "paraphrase_ray"
PUBLISH_S = 1.0  # how often a model replica posts
STALE_S = 10.0  # a post older than this says nothing (its replica stopped, or its event loop is blocked)
READ_CACHE_S = 0.5  # how often the ingress reads the board
NO_REPLICA = "no model replica is running (starting, or being replaced)"
log = logging.getLogger("ray.serve")


@ray.remote(num_cpus=0, max_restarts=-1)
class HealthBoard:
    """``(app, replica) -> (problem or None, posted at)``."""

    def __init__(self) -> None:
        self.posts: dict[tuple[str, str], tuple[str | None, float]] = {}

    def post(self, app: str, replica: str, problem: str | None) -> None:
        self.posts[(app, replica)] = (problem, time.time())

    def forget(self, app: str, replica: str) -> None:
        self.posts.pop((app, replica), None)

    def read(self, app: str, max_age_s: float) -> dict[str, str | None]:
        now = time.time()
        for k in [k for k, (_, t) in self.posts.items() if now - t > 10 * max_age_s]:
            del self.posts[k]  # replicas long gone
        return {r: p for (a, r), (p, t) in self.posts.items() if a == app and now - t <= max_age_s}


def board() -> Any:
    """The cluster's board (created on first use)."""
    return HealthBoard.options(
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def verdict(posts: dict[str, str | None]) -> str | None:
    """None (healthy) when a replica says so; else the problem to report."""
    if any(p is None for p in posts.values()):
        return None
    return next(iter(posts.values()), None) or NO_REPLICA


class Publisher:
    """In a model replica: posts ``problem()`` every ``PUBLISH_S`` from a daemon thread until ``stop``."""

    def __init__(self, app: str, replica: str, problem: Callable[[], str | None]) -> None:
        self.app, self.replica, self.problem = app, replica, problem
        self._board = board()
        ray.get(self._board.post.remote(app, replica, problem()), timeout=120)  # the board is up before serving
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-post", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                self._board.post.remote(self.app, self.replica, self.problem())
            except Exception:  # the board was lost: get (or create) it again, post next time
                log.warning("health board unreachable; creating it again", exc_info=True)
                self._board = board()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._board.forget.remote(self.app, self.replica)
        except Exception:
            pass


class Reader:
    """In the ingress: the application's health from the board, refreshed every ``READ_CACHE_S`` by a task of
    its own, so ``problem()`` answers from memory (no remote call on the request's path)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self._board = board()  # looked up (or created) now, not on the first probe's path
        self._problem: str | None = NO_REPLICA
        self._task = None
        self._read_once = None

    async def problem(self) -> str | None:
        import asyncio

        if self._task is None:  # the first call starts the refresher (it needs the replica's event loop)
            self._read_once = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._refresh())
        if not self._read_once.done():
            await asyncio.wait_for(asyncio.shield(self._read_once), 10)
        return self._problem

    async def _refresh(self) -> None:
        import asyncio

        while True:
            try:
                if self._board is None:
                    self._board = board()
                posts = await asyncio.wait_for(self._board.read.remote(self.app, STALE_S), 5)
                self._problem = verdict(posts)
            except Exception:
                log.warning("health board unreachable", exc_info=True)
                self._board, self._problem = None, "the health board is unreachable; retry shortly"
            if not self._read_once.done():
                self._read_once.set_result(None)
            await asyncio.sleep(READ_CACHE_S)
