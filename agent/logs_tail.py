"""`node-health logs tail`: the agent's events in CloudWatch Logs, like `aws logs tail`.

FilterLogEvents over the group, narrowed to the agent's streams (detection or deep-check) and,
client side as well, to one node: moto, and prefixes that also match other streams, must not
widen it. While following, each poll looks back a little (events are indexed late, not in
order), and event ids already printed are skipped: no duplicates, no gaps.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

DETECTION = "SagemakerHealthMonitoringAgent/"
DEEP = "DeepHealthCheckResults/"
LOOKBACK_MS = 120_000
COLORS = {"error": "\x1b[31m", "warn": "\x1b[33m", "info": "\x1b[32m", "debug": "\x1b[2m"}
_AGO = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def region(*given: str | None) -> str | None:
    """The first region given (option, settings), else AWS_REGION or AWS_DEFAULT_REGION as the
    AWS SDKs read them; None leaves it to boto's own configuration (~/.aws/config)."""
    env = (os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION"))
    return next((r for r in (*given, *env) if r), None)


def since_ms(value: str, now: float | None = None) -> int:
    """`10m`, `1h`, `2d` ago, or an RFC 3339 / ISO 8601 UTC time, in ms since the epoch."""
    now = time.time() if now is None else now
    v = value.strip()
    if m := _AGO.match(v):
        return int((now - int(m.group(1)) * _UNIT[m.group(2)]) * 1000)
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(v, fmt)) * 1000
        except ValueError:
            continue
    raise ValueError(f"--since: {value!r} is neither a duration (10m, 1h, 2d) nor a UTC time")


@dataclass
class Query:
    group: str
    deep: bool = False
    instance_id: str | None = None
    node: str | None = None
    pattern: str | None = None

    def prefix(self) -> str:
        return DEEP if self.deep else DETECTION

    def wanted(self, event: dict[str, Any]) -> bool:
        stream = event.get("logStreamName", "")
        if not stream.startswith(self.prefix()):
            return False
        if self.instance_id and not stream.endswith(f"/{self.instance_id}") and not self.deep:
            return False
        if self.node:
            try:
                return json.loads(event["message"]).get("node") == self.node
            except (ValueError, AttributeError):
                return False
        return True


def fetch(client: Any, q: Query, start: int) -> Iterator[dict[str, Any]]:
    kw: dict[str, Any] = {
        "logGroupName": q.group,
        "startTime": start,
        "logStreamNamePrefix": q.prefix(),
        "interleaved": True,
    }
    if q.pattern:
        kw["filterPattern"] = q.pattern
    while True:
        page = client.filter_log_events(**kw)
        for event in page.get("events", []):
            if q.wanted(event):
                yield event
        token = page.get("nextToken")
        if not token or token == kw.get("nextToken"):
            return
        kw["nextToken"] = token


def tail(
    client: Any,
    q: Query,
    start: int,
    follow: bool,
    interval: float,
    out: Callable[[dict[str, Any]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    # (stream, event id) -> timestamp, pruned behind the look-back. The stream too: an id is
    # unique within its stream (moto numbers them per query).
    seen: dict[tuple[str, str], int] = {}
    newest = start
    while True:
        batch = sorted(fetch(client, q, start), key=lambda e: (e["timestamp"], e["eventId"]))
        for event in batch:
            key = (event.get("logStreamName", ""), event["eventId"])
            if key in seen:
                continue
            seen[key] = event["timestamp"]
            newest = max(newest, event["timestamp"])
            out(event)
        if not follow:
            return
        start = max(start, newest - LOOKBACK_MS)
        seen = {k: ts for k, ts in seen.items() if ts >= start}
        sleep(interval)


def render(event: dict[str, Any], fmt: str, color: bool) -> str:
    message = event.get("message", "")
    if fmt == "json":
        return message
    try:
        doc = json.loads(message)
    except ValueError:
        doc = {"msg": message}
    level = str(doc.get("level", ""))
    ts = doc.get("ts") or time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.get("timestamp", 0) / 1000)
    )
    shown = f"{COLORS[level]}{level:<5}\x1b[0m" if color and level in COLORS else f"{level:<5}"
    line = f"{ts} {shown} {doc.get('msg', '')}"
    if fmt == "detailed":
        rest = {k: v for k, v in doc.items() if k not in ("level", "ts", "msg")}
        line = f"{ts} {event.get('logStreamName', '')} {shown} {doc.get('msg', '')}"
        if rest:
            line += " " + json.dumps(rest, separators=(",", ":"), ensure_ascii=False)
    return line


def printer(fmt: str, color: bool | None = None) -> Callable[[dict[str, Any]], None]:
    color = sys.stdout.isatty() if color is None else color

    def out(event: dict[str, Any]) -> None:
        print(render(event, fmt, color), flush=True)

    return out
