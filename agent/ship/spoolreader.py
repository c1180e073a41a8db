"""Reading the spool from a cursor that moves only when CloudWatch has taken the events.

A position is (segment number, byte offset). The cursor is a small file written atomically after
each accepted batch, so a `kill -9` at any moment resends at most the batch in flight
(at-least-once). A line still being written (no newline yet) is left for the next read; a
segment the spool dropped while full is skipped (the spool counted and logged its events).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from agent.policy import write_atomic

SUFFIX = ".jsonl"
Position = tuple[int, int]


class SpoolReader:
    def __init__(self, directory: Path, cursor: Path) -> None:
        self.directory, self.cursor = directory, cursor
        self.position: Position = self._load()

    def _load(self) -> Position:
        try:
            raw = json.loads(self.cursor.read_text())
            return int(raw["segment"]), int(raw["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, 0  # from the oldest segment there is

    def commit(self, position: Position) -> None:
        self.position = position
        write_atomic(self.cursor, json.dumps({"segment": position[0], "offset": position[1]}))

    def segments(self) -> list[int]:
        found = [p.stem for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit()]
        return sorted(int(s) for s in found)

    def lines(self, start: Position | None = None) -> Iterator[tuple[bytes, Position]]:
        """Whole lines after `start` (the cursor), each with the position just after it."""
        seq, offset = self._from(start or self.position)
        segments = [s for s in self.segments() if s >= seq]
        if segments and segments[0] != seq:
            seq, offset = segments[0], 0  # the cursor's segment is gone: dropped while full
        for n in segments:
            if n != seq:
                offset = 0
            path = self.directory / f"{n:010d}{SUFFIX}"
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    while line := f.readline():
                        if not line.endswith(b"\n"):
                            return  # being written: next time
                        offset += len(line)
                        yield line, (n, offset)
            except FileNotFoundError:
                continue  # dropped under us

    def _from(self, position: Position) -> Position:
        """`position`, or the spool's start where the spool was made anew under it (deleted
        while the cursor was kept): its segments numbered from 1 again, or shorter than the
        cursor's offset. What the new spool holds was never shipped."""
        seq, offset = position
        every = self.segments()
        if every and (seq > every[-1] or (seq in every and offset > self._size(seq))):
            return every[0], 0
        return seq, offset

    def _size(self, n: int) -> int:
        try:
            return (self.directory / f"{n:010d}{SUFFIX}").stat().st_size
        except FileNotFoundError:
            return 0

    def depth(self) -> int:
        """Bytes in the spool after the cursor: what is still to ship."""
        seq, offset = self._from(self.position)
        total = 0
        for n in self.segments():
            if n < seq:
                continue
            try:
                size = (self.directory / f"{n:010d}{SUFFIX}").stat().st_size
            except FileNotFoundError:
                continue
            total += size - offset if n == seq else size
        return max(0, total)
