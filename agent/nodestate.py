"""The node state the verdict asks for, and the writer used when there is no cluster.

`desired()` is a pure function of the policy: labels, the NoSchedule taint while the node is
unschedulable, the fault-details annotation and one condition per condition type. A writer
applies it; the local writer keeps it in a JSON file, the Kubernetes writer patches the Node.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.events import rfc3339
from agent.models import NodeKeys
from agent.policy import Policy, Tracker, Verdict, write_atomic
from checks.api import Status


@dataclass(frozen=True)
class NodeState:
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    conditions: list[dict[str, str]] = field(default_factory=list)


class NodeWriter(Protocol):
    async def apply(self, state: NodeState) -> bool:
        """Make the node look like `state`; True when something was written."""
        ...


def relabel(
    state: NodeState, keys: NodeKeys, health: str | None = None, deep: str | None = None
) -> NodeState:
    """`state` with node-health-status `health` (and its NoSchedule taint while it is not
    Schedulable) and deep-health-check-status `deep`; None leaves a label as it is."""
    labels, taints = dict(state.labels), list(state.taints)
    if deep is not None:
        labels[keys.deep_health_check_label] = deep
    if health is not None:
        labels[keys.health_status_label] = health
        taints = [t for t in taints if t.get("key") != keys.taint_key]
        if health != str(Verdict.SCHEDULABLE):
            taints.append({"key": keys.taint_key, "value": health, "effect": "NoSchedule"})
    return NodeState(labels, taints, dict(state.annotations), list(state.conditions))


def desired(policy: Policy, keys: NodeKeys) -> NodeState:
    active = [t for t in policy.trackers.values() if t.active]
    annotations, labels = {}, {}
    if active:
        labels[keys.fault_types_label] = label_value(t.condition for t in active)
        labels[keys.fault_reasons_label] = label_value(t.reason for t in active)
        details = [
            {
                "timestamp": rfc3339(t.last_fault or t.changed),
                "type": t.condition,
                "reason": t.reason,
                "message": t.message,
            }
            for t in active
        ]
        annotations[keys.fault_details_annotation] = json.dumps(details, separators=(",", ":"))
    conditions = _conditions(policy.trackers.values())
    base = NodeState(labels=labels, annotations=annotations, conditions=conditions)
    return relabel(base, keys, health=str(policy.verdict))


def label_value(words: Any) -> str:
    """Distinct words joined by `_` as one label value: at most 63 characters of
    [A-Za-z0-9-_.], cut between words, starting and ending alphanumeric."""
    out = ""
    for word in sorted(set(words)):
        word = re.sub(r"[^A-Za-z0-9_.-]", "", word).strip("_.-")
        if not word:
            continue
        joined = f"{out}_{word}" if out else word
        if len(joined) > 63:
            break
        out = joined
    return out


def _conditions(trackers: Any) -> list[dict[str, str]]:
    """One node condition per condition type, True while any of its components is faulty."""
    by_type: dict[str, list[Tracker]] = {}
    for t in trackers:
        if not t.temporary or t.active:
            by_type.setdefault(t.condition, []).append(t)
    out = []
    for ctype in sorted(by_type):
        group = by_type[ctype]
        active = [t for t in group if t.active]
        if active:
            lead = max(active, key=lambda t: t.action.rank)
            status = "True"
        elif all(t.status is Status.UNKNOWN for t in group):
            lead, status = group[0], "Unknown"
        else:
            lead, status = max(group, key=lambda t: t.changed), "False"
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": lead.reason,
                "message": lead.message,
                "lastTransitionTime": rfc3339(max(t.changed for t in group)),
            }
        )
    return out


class LocalStateFile:
    """The embedded default's node writer: the state it would set, as a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: NodeState | None = None

    async def apply(self, state: NodeState) -> bool:
        if state == self._last:
            return False
        if self._last is None and self._read() == asdict(state):
            self._last = state
            return False
        write_atomic(self.path, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
        self._last = state
        return True

    def read(self) -> NodeState | None:
        """The state the file holds now (another process may have written it)."""
        raw = self._read()
        try:
            return NodeState(**raw) if raw else None
        except TypeError:  # not a state this agent wrote
            return None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
