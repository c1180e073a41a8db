"""Can the state directory be written? Asked at start and again now and then, so that a
read-only or full disk is one clear error (log and `/healthz`) instead of a failure at every
write, and so that freeing the disk clears it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("agent.statedir")
PROBE = ".write-probe"


class StateDir:
    def __init__(
        self, path: Path, every: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path, self.every, self.clock = path, every, clock
        self.problem: str | None = None
        self._checked: float | None = None

    def check(self) -> str | None:
        """Why the directory cannot be written (None: it can); said in the log when it
        changes, not at every write."""
        now = self.clock()
        if self._checked is not None and now - self._checked < self.every:
            return self.problem
        self._checked = now
        problem = _probe(self.path)
        if problem != self.problem:
            if problem:
                log.error("state_dir_unwritable", path=str(self.path), error=problem)
            else:
                log.info("state_dir_writable", path=str(self.path))
        self.problem = problem
        return problem

    def warnings(self) -> list[str]:
        problem = self.check()
        if not problem:
            return []
        return [f"state_dir {self.path}: {problem}: state and events are not kept on disk"]


def _probe(path: Path) -> str | None:
    probe = path / PROBE
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
