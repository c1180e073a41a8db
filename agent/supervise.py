"""One supervisor for every background loop: a loop that raises is restarted after a backoff,
and `/healthz` fails while one is crash-looping, has ended, or is stuck.

A loop must never die quietly: a watch thread killed by one malformed answer would leave the
node unwatched (labels removed by hand never restored) while the probes said all was well.
A loop is given its `Heart`: it calls `busy()` when it starts a piece of work and `done()` when
that piece finished, so waiting for work is never "stuck", and a loop that crashes again and
again without finishing anything is reported, not hidden by its restarts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from agent.backoff import Backoff

log = structlog.get_logger("agent.supervise")

BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
DEAD_AFTER = 3  # crashes in a row, nothing done between: the loop is reported failing
STUCK = 300.0  # seconds one piece of work may take by default


@dataclass
class Heart:
    """One loop's pulse, as the supervisor and the health endpoint see it."""

    name: str
    stuck: float | None
    clock: Callable[[], float] = time.monotonic
    busy_since: float | None = None
    crashes: int = 0
    error: str | None = None
    ended: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF_MIN, BACKOFF_MAX), repr=False)

    def busy(self) -> None:
        with self._lock:
            if self.busy_since is None:
                self.busy_since = self.clock()

    def done(self) -> None:
        with self._lock:
            self.busy_since, self.crashes, self.error = None, 0, None
            self._backoff.reset()

    def problem(self) -> str | None:
        """Why this loop is not healthy now; None when it is."""
        with self._lock:
            if self.ended:
                return f"{self.name}: ended ({self.error or 'returned'})"
            if self.crashes >= DEAD_AFTER:
                return f"{self.name}: crashed {self.crashes} times in a row ({self.error})"
            since = self.busy_since
            if self.stuck is not None and since is not None and self.clock() - since > self.stuck:
                return f"{self.name}: stuck for {self.clock() - since:.0f}s"
            return None

    def _crashed(self, exc: BaseException) -> float:
        with self._lock:
            self.crashes += 1
            self.error = repr(exc)
            self.busy_since = None
            return self._backoff.next()


class Supervisor:
    """The registry of the agent's loops; `problems()` is what `/healthz` reports."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.hearts: dict[str, Heart] = {}

    def heart(self, name: str, stuck: float | None = STUCK) -> Heart:
        heart = Heart(name, stuck, self.clock)
        self.hearts[name] = heart
        return heart

    def task(
        self, name: str, body: Callable[[Heart], Awaitable[None]], stuck: float | None = STUCK
    ) -> asyncio.Task[None]:
        """`body(heart)` as a task, started again after each exception."""
        heart = self.heart(name, stuck)

        async def guard() -> None:
            while True:
                try:
                    await body(heart)
                except Exception as exc:
                    delay = heart._crashed(exc)
                    log.error("loop_crashed", loop=name, error=repr(exc), restart_in=delay)
                    await asyncio.sleep(delay)
                    continue
                heart.ended = True  # a loop that returns was not meant to
                log.error("loop_ended", loop=name)
                return

        return asyncio.create_task(guard(), name=name)

    def thread(
        self,
        name: str,
        body: Callable[[Heart], None],
        stop: threading.Event,
        stuck: float | None = STUCK,
    ) -> threading.Thread:
        """`body(heart)` in a daemon thread, started again after each exception until `stop`."""
        heart = self.heart(name, stuck)

        def guard() -> None:
            while not stop.is_set():
                try:
                    body(heart)
                except Exception as exc:
                    delay = heart._crashed(exc)
                    log.error("loop_crashed", loop=name, error=repr(exc), restart_in=delay)
                    stop.wait(delay)
                    continue
                if not stop.is_set():
                    heart.ended = True
                    log.error("loop_ended", loop=name)
                return

        t = threading.Thread(target=guard, daemon=True, name=name)
        t.start()
        return t

    def problems(self) -> list[str]:
        return [p for h in list(self.hearts.values()) if (p := h.problem()) is not None]
