"""Render policy changes as events in SageMaker HyperPod's CloudWatch log-stream format.

One JSON object per line, `level`, `ts` (RFC 3339 UTC, seconds) and `msg` first. Detection
events keep HyperPod's `"details: "` object and `"HealthMonitoringAgentDetectionEvent":
"HealthEvent"` marker so existing Logs Insights queries keep working; our own structured
fields follow. An event is built once, as a dict; each sink renders and ships it.

`ts` is when the agent saw the problem, `details.timestamp` when the problem happened (as in
HyperPod's own sample, where the two differ): CloudWatch files an event by its time, and one
dated from a backlog's past would land behind what `logs tail --follow` already printed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from agent.identity import Identity
from agent.policy import (
    Change,
    Cleared,
    DeepCheckWanted,
    RebootSeen,
    Reported,
    Tracker,
    Verdict,
    VerdictChanged,
)
from checks.api import Action, Finding, Status

Event = dict[str, Any]

_CONDITION_STATUS = {Status.OK: "False", Status.FAULT: "True", Status.UNKNOWN: "Unknown"}
_VERDICT_WORDS = {
    Verdict.PENDING_REBOOT: "Reboot the Instance",
    Verdict.PENDING_REPLACEMENT: "Replace the Instance",
    Verdict.UNSCHEDULABLE: "Deep health check in progress",
}


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_time(text: object) -> float:
    """An ISO 8601 / RFC 3339 time (what `rfc3339` writes, Kubernetes' timestamps, a user's
    `--since`) in seconds since the epoch. An offset (`Z`, `+02:00`) is honoured; a time without
    one is UTC, as every time the agent writes. A ValueError for anything else."""
    from datetime import UTC, datetime

    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a time")
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def dumps(event: Event) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)


class EventBuilder:
    def __init__(self, identity: Identity, dry_run: bool = False) -> None:
        self.identity = identity
        self.dry_run = dry_run

    def render(self, change: Change, now: float | None = None) -> Event:
        now = time.time() if now is None else now
        match change:
            case Reported(finding=f, tracker=t, needed=needed):
                return self._reported(f, t, needed, now)
            case Cleared(tracker=t, why=why):
                return self._cleared(t, why, now)
            case VerdictChanged():
                return self._verdict(change, now)
            case DeepCheckWanted(tracker=t, why=why):
                event = self._base("warn", now, f"Deep health check wanted: {why}")
                event.update(
                    check=t.check,
                    component=t.component,
                    condition=t.condition,
                    reason="DeepCheckWanted",
                    cause=t.reason,
                )
                return event
            case RebootSeen(boot_id=boot_id, cleared=n):
                return self._base(
                    "info",
                    now,
                    f"Node rebooted (boot id {boot_id}); "
                    f"{n} conditions from the previous boot cleared",
                )
        raise TypeError(f"cannot render {change!r}")

    def notice(self, level: str, msg: str, **fields: object) -> Event:
        """An event of the agent's own (not a finding's), e.g. the breaker's refusal."""
        event = self._base(level, time.time(), msg)
        event.update(fields)
        return event

    def _base(self, level: str, ts: float, msg: str) -> Event:
        ident = self.identity
        event: Event = {"level": level, "ts": rfc3339(ts), "msg": msg, "node": ident.node_name}
        if ident.instance_id:
            event["instance_id"] = ident.instance_id
        if self.dry_run:
            event["dry_run"] = True
        return event

    def _detection(
        self, level: str, severity: str, now: float, when: float, reason: str, text: str
    ) -> Event:
        """`now`: when it was seen (`ts`); `when`: when it happened (`details.timestamp`)."""
        event = self._base(level, now, f"NPD caught event: {text}")
        event["details: "] = {
            "severity": severity,
            "timestamp": rfc3339(when),
            "reason": reason,
            "message": text,
        }
        event["HealthMonitoringAgentDetectionEvent"] = "HealthEvent"
        return event

    def _reported(self, f: Finding, t: Tracker, needed: int, now: float) -> Event:
        status = "True" if t.active else _CONDITION_STATUS[f.status]
        # HyperPod's form whenever a node condition is on (an XID that reboots: "Node condition
        # ... is now: True, reason: XidHardwareFailure"); an event that changes nothing says so.
        if f.temporary and not t.active:
            text = (
                f'Event {f.condition} on {f.component}, reason: {f.reason}, message: "{f.message}"'
            )
        else:
            text = (
                f"Node condition {f.condition} is now: {status}, reason: {f.reason}, "
                f'message: "{f.message}"'
            )
        level, severity = _levels(f.status, t.action if t.active else f.action)
        if f.severity is not None:  # the rule's word, where it gave one
            severity = f.severity
            level = "error" if level == "error" else f.severity
        event = self._detection(level, severity, now, f.ts, f.reason, text)
        event.update(
            check=f.check,
            component=f.component,
            condition=f.condition,
            status=str(f.status),
            condition_status=status,
            reason=f.reason,
            message=f.message,
            action=str(t.action if t.active else f.action),
            temporary=f.temporary,
            evidence=dict(f.evidence),
        )
        if f.status is Status.FAULT:
            event["occurrences"] = len(t.occurrences)
            event["occurrences_needed"] = needed
            event["rule"] = t.rule
        if t.escalated:
            event["escalated"] = "the same fault came back after the reboot it caused"
        return event

    def _cleared(self, t: Tracker, why: str, now: float) -> Event:
        text = (
            f"Node condition {t.condition} is now: False, reason: {t.reason}, "
            f'message: "cleared after {why}"'
        )
        event = self._detection("info", "info", now, now, t.reason, text)
        event.update(
            check=t.check,
            component=t.component,
            condition=t.condition,
            status=str(Status.OK),
            condition_status="False",
            reason=t.reason,
            message=f"cleared after {why}",
            action=str(Action.NONE),
            temporary=t.temporary,
        )
        return event

    def _verdict(self, c: VerdictChanged, now: float) -> Event:
        ident = self.identity
        where = (
            f"Region: {ident.region or 'unknown'}, InstanceType: {ident.instance_type or 'unknown'}"
        )
        if c.new is Verdict.SCHEDULABLE:
            event = self._base("info", now, f"Node is Schedulable. {where}. Was {c.old}: {c.why}")
        else:
            error = f"{c.cause.condition} on {c.cause.component}: {c.why}" if c.cause else c.why
            event = self._base(
                "error",
                now,
                f"Encountered FaultyInstance. {_VERDICT_WORDS[c.new]}. {where}. ERROR:{error}",
            )
        event.update(verdict=str(c.new), previous_verdict=str(c.old))
        if c.cause is not None:
            event["cause"] = {
                "check": c.cause.check,
                "condition": c.cause.condition,
                "component": c.cause.component,
                "reason": c.cause.reason,
                "rule": c.cause.rule,
            }
        return event


def _levels(status: Status, action: Action) -> tuple[str, str]:
    """(event level, details severity) of a finding."""
    if status is Status.OK:
        return "info", "info"
    if status is Status.FAULT and action.rank >= Action.REBOOT.rank:
        return "error", "warn"
    return "warn", "warn"
