"""The local spool: every event as a JSON line on disk before anything ships it.

Segments `<seq>.jsonl` rotate at `max_segment_bytes`; at most `max_segments` are kept, and when
the bound is hit the oldest segment goes, its events counted and logged. Each event is one
`write` to an O_APPEND descriptor, so a `kill -9` loses at most the line being written; `flush`
(and close, on SIGTERM) fsyncs.

Exactly once across a crash: the events of one batch (the daemon's decision on a batch of
findings) are held and written in one `write` after checkpoint lines: `{"checkpoint": {"check":
..., "state": ..., "events": N, "batch": B}}` (where a streaming check resumes), or `{"checkpoint":
{"events": N, "batch": B}}` for a batch without one, so the events, the source position they came
from and the batch's number land together or not at all. The shipper skips checkpoint lines;
`last_checkpoints` and `last_batch` read them back (agent.commit: whether a batch landed).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Self

import structlog

from agent.events import Event, dumps

log = structlog.get_logger("agent.spool")
SUFFIX = ".jsonl"
CHECKPOINT = "checkpoint"
MARK = b'{"checkpoint"'  # how a checkpoint line begins


def is_checkpoint(line: dict[str, Any]) -> bool:
    return CHECKPOINT in line and len(line) == 1


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
        self._held: list[bytes] | None = None  # a batch's events, until its checkpoint

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
        self._repair()
        self._open()

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def emit(self, event: Event) -> None:
        data = (dumps(event) + "\n").encode()
        if self._held is not None:
            self._held.append(data)
            return
        self._write(data)

    def hold(self) -> None:
        """Keep the events emitted from now until `take`."""
        self._held = []

    def take(self, checkpoints: dict[str, dict[str, Any]], batch: int) -> bytes:
        """The held events after checkpoint lines that say how many follow and the batch's
        number: what `write` puts down in one write (nothing, for neither). A `kill -9` can cut
        even one write short: `_repair` then drops the whole batch, so that it counts as not
        written."""
        held, self._held = self._held or [], None
        if not held and not checkpoints:
            return b""
        marks = [
            {CHECKPOINT: {"check": check, "state": state, "events": len(held), "batch": batch}}
            for check, state in checkpoints.items()
        ] or [{CHECKPOINT: {"events": len(held), "batch": batch}}]
        lines = [(json.dumps(m, separators=(",", ":")) + "\n").encode() for m in marks]
        return b"".join(lines[::-1] + held)  # the first line counts what follows it

    def write(self, data: bytes) -> None:
        """A batch that `take` made, in one write."""
        self._write(data)

    def _repair(self) -> None:
        """Cut off what a crash left half-written at the end of the newest segment: a torn
        line, or a batch with fewer events after its checkpoint than the checkpoint counts."""
        segments = self.segments()
        if not segments:
            return
        path = segments[-1]
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1  # a torn last line goes
        lines = data[:keep].split(b"\n")[:-1]
        last = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(MARK)), None)
        if last is not None:
            first = last
            while first > 0 and lines[first - 1].startswith(MARK):
                first -= 1
            try:
                counted = int(json.loads(lines[last])[CHECKPOINT]["events"])
            except (ValueError, KeyError, TypeError):
                counted = 0
            if len(lines) - last - 1 < counted:
                keep = sum(len(line) + 1 for line in lines[:first])
        if keep < len(data):
            log.warning("spool_torn_write_dropped", segment=path.name, bytes=len(data) - keep)
            with open(path, "r+b") as fh:
                fh.truncate(keep)

    def last_checkpoints(self) -> dict[str, dict[str, Any]]:
        """Each check's last checkpoint: from the newest segment that holds any."""
        for path in reversed(self.segments()):
            found: dict[str, dict[str, Any]] = {}
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for raw in data.splitlines():
                if not raw.startswith(MARK):
                    continue
                try:
                    mark = json.loads(raw)[CHECKPOINT]
                    found[str(mark["check"])] = dict(mark["state"])
                except (ValueError, KeyError, TypeError):
                    continue  # cut short by a crash: its events are not whole either
            if found:
                return found
        return {}

    def last_batch(self) -> int:
        """The number of the newest batch written whole, once a torn end is cut off; 0: none
        (or only checkpoints from before batches were numbered)."""
        with contextlib.suppress(OSError):  # read-only: what can be read
            self._repair()
        for path in reversed(self.segments()):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for raw in reversed(data.splitlines()):
                if raw.startswith(MARK):
                    try:
                        return int(json.loads(raw)[CHECKPOINT].get("batch", 0))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # not one of ours
        return 0

    def _write(self, data: bytes) -> None:
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
        self._fd = None  # a next segment that cannot be made: started again at the next write
        self._seq += 1
        self._open()
        for old in self.segments()[: -self.max_segments]:
            data = old.read_bytes()
            lost = data.count(b"\n") - data.count(MARK)
            old.unlink()
            self.dropped_events += lost
            log.warning(
                "spool_full_dropped_oldest",
                segment=old.name,
                events=lost,
                dropped_total=self.dropped_events,
            )
