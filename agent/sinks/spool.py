"""The local spool: every event as a JSON line on disk before anything ships it.

Segments `<seq>.jsonl` rotate at `max_segment_bytes`; at most `max_segments` are kept, and when
the bound is hit the oldest segment goes, its events counted and logged. Each event is one
`write` to an O_APPEND descriptor, so a `kill -9` loses at most the line being written; `flush`
(and close, on SIGTERM) fsyncs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Self

import structlog

from agent.events import Event, dumps

log = structlog.get_logger("agent.spool")
SUFFIX = ".jsonl"


class SpoolSink:
    name = "spool"

    def __init__(self, directory: Path, max_segment_bytes: int, max_segments: int) -> None:
        self.directory = directory
        self.max_segment_bytes = max_segment_bytes
        self.max_segments = max_segments
        self.dropped_events = 0
        self._fd: int | None = None
        self._seq = 0
        self._size = 0

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        found = [p for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit()]
        return sorted(found, key=lambda p: int(p.stem))

    def usage(self) -> tuple[int, int]:
        """Bytes in the segments now, and the bound past which the oldest segment goes."""
        used = 0
        for path in self.segments():
            with contextlib.suppress(OSError):  # rotated away between listing and stat
                used += path.stat().st_size
        return used, self.max_segment_bytes * self.max_segments

    async def __aenter__(self) -> Self:
        try:
            self._start()
        except OSError:  # a read-only or full disk: the agent runs on (agent.statedir says it)
            self._fd = None
        return self

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        self._seq = int(existing[-1].stem) if existing else 1
        self._open()

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def emit(self, event: Event) -> None:
        data = (dumps(event) + "\n").encode()
        if self._fd is None:
            self._start()  # what failed at start may work now (the disk was freed)
        if self._size and self._size + len(data) > self.max_segment_bytes:
            self._rotate()
        assert self._fd is not None, "spool used outside its context"
        os.write(self._fd, data)
        self._size += len(data)

    async def flush(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def _open(self) -> None:
        path = self.directory / f"{self._seq:010d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._seq += 1
        self._open()
        for old in self.segments()[: -self.max_segments]:
            lost = old.read_bytes().count(b"\n")
            old.unlink()
            self.dropped_events += lost
            log.warning(
                "spool_full_dropped_oldest",
                segment=old.name,
                events=lost,
                dropped_total=self.dropped_events,
            )
