"""`node-health logs tail`: the agent's events in CloudWatch Logs, like `aws logs tail`.

FilterLogEvents over the group, narrowed to the agent's streams (detection or deep-check) and,
client side as well, to one node: moto, and prefixes that also match other streams, must not
widen it. While following, each poll looks back a little (events are indexed late, not in
order), and event ids already printed are skipped: no duplicates, no gaps.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.events import parse_time
from checks.api import has_unit, parse_duration

DETECTION = "SagemakerHealthMonitoringAgent/"
DEEP = "DeepHealthCheckResults/"
LOOKBACK_MS = 120_000
COLORS = {"error": "\x1b[31m", "warn": "\x1b[33m", "info": "\x1b[32m", "debug": "\x1b[2m"}
_EPOCH = re.compile(r"^\d+(?:\.\d+)?$")


def region(*given: str | None) -> str | None:
    """The first region given (option, settings), else AWS_REGION or AWS_DEFAULT_REGION as the
    AWS SDKs read them; None leaves it to boto's own configuration (~/.aws/config)."""
    env = (os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION"))
    return next((r for r in (*given, *env) if r), None)


def since_ms(value: str, now: float | None = None) -> int:
    """What `aws logs tail --since` takes, in ms since the epoch: a duration ago (5m, 2d, 1w, and
    1.5h: the agent's one duration grammar, of which aws's `<n><s|m|h|d|w>` is part), epoch
    seconds (a bare number, as botocore reads it), or an ISO 8601 time (an offset, or UTC)."""
    now = time.time() if now is None else now
    v = value.strip()
    if has_unit(v):
        return int((now - parse_duration(v)) * 1000)
    if _EPOCH.match(v):
        return int(float(v) * 1000)
    try:
        return int(parse_time(v) * 1000)
    except ValueError:
        raise ValueError(
            f"--since: {value!r} is neither a duration (5m, 1.5h, 2d, 1w), epoch seconds "
            "nor an ISO 8601 time (2026-11-23T10:00:00Z, 2026-11-23T12:00:00+02:00)"
        ) from None


@dataclass
class Query:
    group: str
    deep: bool = False
    instance_id: str | None = None
    node: str | None = None
    pattern: str | None = None
    streams: tuple[str, ...] = ()  # --log-stream-names: these streams instead of the agent's
    stream_prefix: str | None = None  # --log-stream-name-prefix: instead of the agent's

    def prefix(self) -> str:
        if self.stream_prefix is not None:
            return self.stream_prefix
        return DEEP if self.deep else DETECTION

    def wanted(self, event: dict[str, Any]) -> bool:
        stream = event.get("logStreamName", "")
        if self.streams:
            if stream not in self.streams:
                return False
        elif not stream.startswith(self.prefix()):
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
        "interleaved": True,
    }
    if q.streams:
        kw["logStreamNames"] = list(q.streams)
    else:
        kw["logStreamNamePrefix"] = q.prefix()
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
    waiting = False
    while True:
        try:
            batch = sorted(fetch(client, q, start), key=lambda e: (e["timestamp"], e["eventId"]))
        except Exception as exc:  # botocore's ClientError; only a missing group is waited on
            if not (follow and _missing_group(exc)):
                raise
            if not waiting:  # as `aws logs tail --follow`: the agent may not have shipped yet
                print(f"node-health: waiting for log group {q.group}", file=sys.stderr, flush=True)
                waiting = True
            sleep(interval)
            continue
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


def _missing_group(exc: Exception) -> bool:
    error = getattr(exc, "response", None) or {}
    return error.get("Error", {}).get("Code") == "ResourceNotFoundException"


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
