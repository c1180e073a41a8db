"""PutLogEvents batches within CloudWatch Logs' limits, from the spool's lines.

Limits (../shared/HYPERPOD.md, with AWS's docs as the source): a batch is at most 1,048,576
bytes, counting each message's UTF-8 bytes plus 26; at most 10,000 events; its events span at
most 24 hours and are in chronological order; one event is at most 262,118 bytes of message
here (256 KB less the overhead: the older, smaller of the documented sizes). An oversized
event is truncated with a marker, never dropped.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass, field

MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_BATCH_EVENTS = 10_000
MAX_SPAN_MS = 24 * 3600 * 1000
MAX_EVENT_BYTES = 262_118
TRUNCATED = "...[truncated by node-health-agent]"


@dataclass
class LogEvent:
    timestamp: int  # ms since the epoch
    message: str
    stream: str
    end: tuple[int, int]  # the spool position just after this event's line

    @property
    def size(self) -> int:
        return len(self.message.encode()) + EVENT_OVERHEAD


@dataclass
class Batch:
    stream: str
    events: list[LogEvent] = field(default_factory=list)
    size: int = 0
    first: int = 0  # earliest and latest timestamps, for the 24-hour span
    last: int = 0

    @property
    def end(self) -> tuple[int, int]:
        return self.events[-1].end

    def fits(self, ev: LogEvent) -> bool:
        if not self.events:
            return True
        return (
            ev.stream == self.stream
            and len(self.events) < MAX_BATCH_EVENTS
            and self.size + ev.size <= MAX_BATCH_BYTES
            and max(self.last, ev.timestamp) - min(self.first, ev.timestamp) <= MAX_SPAN_MS
        )

    def add(self, ev: LogEvent) -> None:
        if not self.events:
            self.first = self.last = ev.timestamp
        self.first, self.last = min(self.first, ev.timestamp), max(self.last, ev.timestamp)
        self.events.append(ev)
        self.size += ev.size

    def request(self, group: str) -> dict:
        """PutLogEvents' arguments: events sorted by time (stable: spool order for ties)."""
        ordered = sorted(self.events, key=lambda e: e.timestamp)
        return {
            "logGroupName": group,
            "logStreamName": self.stream,
            "logEvents": [{"timestamp": e.timestamp, "message": e.message} for e in ordered],
        }


def cap(message: str) -> str:
    """The message, cut to the event size limit with a marker when it is longer."""
    data = message.encode()
    if len(data) <= MAX_EVENT_BYTES:
        return message
    keep = MAX_EVENT_BYTES - len(TRUNCATED.encode())
    return data[:keep].decode(errors="ignore") + TRUNCATED


def timestamp_ms(event: dict, fallback: float | None = None) -> int:
    """The event's `ts` (RFC 3339, UTC) in ms; the fallback (now) when it has none."""
    ts = event.get("ts")
    if isinstance(ts, str):
        try:
            return calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) * 1000
        except ValueError:
            pass
    return int((fallback if fallback is not None else time.time()) * 1000)


def parse_line(line: bytes) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
