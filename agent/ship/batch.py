"""PutLogEvents batches within CloudWatch Logs' limits, from the spool's lines.

Limits (../shared/HYPERPOD.md, with AWS's docs as the source): a batch is at most 1,048,576
bytes, counting each message's UTF-8 bytes plus 26; at most 10,000 events; its events span at
most 24 hours and are in chronological order; one event is at most 262,118 bytes of message
here (256 KiB less the 26 bytes of overhead: the older, smaller of the documented sizes).

An oversized event is cut, never dropped, and stays the JSON object it was: Logs Insights and
JSON filter patterns find an event by its keys (`HealthMonitoringAgentDetectionEvent`, `node`,
`check`), so the longest values are cut, each ends with a marker, and `truncated` lists them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from agent.events import dumps, parse_time

MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_BATCH_EVENTS = 10_000
MAX_SPAN_MS = 24 * 3600 * 1000
MAX_EVENT_BYTES = 262_118
TRUNCATED = "...[truncated by node-health-agent]"
KEEP = 256  # characters a cut string keeps at least, while another value can give way


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


def fit(event: dict, message: str, limit: int = MAX_EVENT_BYTES) -> str:
    """The event's line, or, when it is over the limit, the event with its longest values cut
    until it fits: a long string keeps its start and ends with the marker; where no string is
    long, the biggest object or list below the top gives way to a marker."""
    if len(message.encode()) <= limit:
        return message
    event = json.loads(dumps(event))  # a copy, of plain JSON values, to cut in
    cut: list[str] = []
    text = message
    while (excess := len(text.encode()) - limit) > 0:
        found = _longest_string(event) or _biggest_box(event)
        if found is None:  # only top-level keys are left: keep those that say who and what
            event = {k: event[k] for k in ("level", "ts", "msg", "node") if k in event}
            event["msg"] = str(event.get("msg", ""))[:KEEP] + TRUNCATED
            event["truncated"] = [*cut, "*"]
            return dumps(event)
        else:
            path, value = found
            if isinstance(value, str):
                value = _shorten(value, excess)
            else:
                value = f"{TRUNCATED} ({_size(value)} bytes)"
            node: Any = event
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            if (where := ".".join(map(str, path))) not in cut:
                cut.append(where)
        event["truncated"] = cut
        text = dumps(event)
    return text


def _size(value: Any) -> int:
    return len(dumps(value).encode())


def _shorten(value: str, excess: int) -> str:
    """The string, at least `excess` JSON bytes shorter if it can be while keeping KEEP
    characters, ending with the marker."""
    ratio = len(value) / _size(value)  # characters a byte, escapes and UTF-8 included
    keep = len(value) - int((excess + len(TRUNCATED)) * ratio) - 1
    return value[: max(KEEP, min(keep, len(value) - len(TRUNCATED) - 1))] + TRUNCATED


def _walk(event: dict) -> list[tuple[list[Any], Any]]:
    """Every value below the top, with its path of keys and indexes."""
    out: list[tuple[list[Any], Any]] = []
    stack: list[tuple[list[Any], Any]] = [([], event)]
    while stack:
        path, value = stack.pop()
        if path:
            out.append((path, value))
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [([*path, k], v) for k, v in items]
    return out


def _longest_string(event: dict) -> tuple[list[Any], str] | None:
    """The biggest string that can still be cut (one cut already is KEEP and the marker)."""
    cuttable = KEEP + len(TRUNCATED)
    long = [(p, v) for p, v in _walk(event) if isinstance(v, str) and len(v) > cuttable]
    return max(long, key=lambda pv: _size(pv[1]), default=None)


def _biggest_box(event: dict) -> tuple[list[Any], Any] | None:
    boxes = [(p, v) for p, v in _walk(event) if isinstance(v, dict | list) and v]
    return max(boxes, key=lambda pv: _size(pv[1]), default=None)


def timestamp_ms(event: dict, fallback: float | None = None) -> int:
    """The event's `ts` (RFC 3339) in ms; the fallback (now) when it has none."""
    ts = event.get("ts")
    if isinstance(ts, str):
        try:
            return int(parse_time(ts) * 1000)
        except ValueError:
            pass
    return int((fallback if fallback is not None else time.time()) * 1000)


def parse_line(line: bytes) -> dict | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
