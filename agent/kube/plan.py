"""From the Node as it is and the state the agent wants, the patches that make it so, and
nothing else: a pure function, so every rule here is tested without a server.

- Labels and annotations by merge patch: only the keys that differ; keys the agent wrote
  before (its `owned` record, an annotation) but no longer wants are removed, no others.
- `spec.taints` is replaced whole by any patch: the new list is the node's own with only our
  key changed, sent with the resourceVersion it was read at (409: read again, plan again).
- Conditions through `nodes/status` by strategic merge on `type`: only those that differ; those
  the agent owned but no longer reports are deleted (`$patch: delete`).
- Operators stay in charge: a Pending* health label the agent did not write (a human's, or
  HyperPod's) is never changed, nor its taint; with the remediation annotation `off` the agent
  writes no health label or taint at all, only what it found. A node labelled Pending* by hand
  on which the agent finds its own fault gets the NoSchedule taint when it has none: the label
  alone keeps no pod off it.
- Three patches, written in this order and each on its own (one refused must not hold the
  others): `meta` (labels, taint and the owned record: the node decision), `annotations` (the
  fault details, the deep-check request cleared) and `status` (conditions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.models import NodeKeys
from agent.nodestate import NodeState
from agent.policy import Verdict

# Values an operator may set by hand; the launch blog spells the last one this way.
PENDING = {
    str(Verdict.PENDING_REBOOT),
    str(Verdict.PENDING_REPLACEMENT),
    "UnschedulablePendingReplace",
}


@dataclass(frozen=True)
class Owned:
    """What the agent wrote last: the keys it may remove, and the health label's value."""

    labels: tuple[str, ...] = ()
    annotations: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()
    health: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Owned:
        try:
            raw = json.loads(text or "{}")
            return cls(
                tuple(raw.get("labels", ())),
                tuple(raw.get("annotations", ())),
                tuple(raw.get("conditions", ())),
                raw.get("health"),
            )
        except (ValueError, TypeError, AttributeError):
            return cls()

    def dump(self) -> str:
        raw = {
            "labels": sorted(self.labels),
            "annotations": sorted(self.annotations),
            "conditions": sorted(self.conditions),
            "health": self.health,
        }
        return json.dumps(raw, separators=(",", ":"))


@dataclass
class Plan:
    meta: dict[str, Any] | None = None  # merge patch of the Node: labels, taint, owned record
    annotations: dict[str, Any] | None = None  # merge patch of the Node: the other annotations
    status: dict[str, Any] | None = None  # strategic merge patch of nodes/status
    hands_off: str | None = None  # why the health label and taint were left alone
    takes_out: bool = False  # the health label goes from Schedulable (or none) to not


def plan(
    node: dict[str, Any],
    want: NodeState,
    keys: NodeKeys,
    now: str,
    breaker: str | None = None,
    clear_request: bool = False,
) -> Plan:
    """`breaker`: why taking the node out is refused now (None: allowed)."""
    meta = node.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    owned = Owned.parse(annotations.get(keys.owned_annotation))
    current = labels.get(keys.health_status_label)
    wanted = want.labels.get(keys.health_status_label)
    out = Plan()
    by_hand = False
    if annotations.get(keys.remediation_annotation, "").lower() == "off":
        out.hands_off = "remediation is off for this node"
    elif current in PENDING and current != owned.health and wanted != current:
        out.hands_off, by_hand = f"{current} was set by hand", True
    out.takes_out = (
        out.hands_off is None
        and wanted not in (None, str(Verdict.SCHEDULABLE))
        and current in (None, str(Verdict.SCHEDULABLE))
    )
    if out.takes_out and breaker is not None:
        out.hands_off = breaker
    manage_health = out.hands_off is None

    want_labels = dict(want.labels)
    if not manage_health:
        want_labels.pop(keys.health_status_label, None)
    keep = set() if manage_health else {keys.health_status_label}
    label_patch = _diff(labels, want_labels, set(owned.labels) - keep)

    want_ann = dict(want.annotations)
    have = {c.get("type"): c for c in (node.get("status") or {}).get("conditions") or []}
    # What the agent wrote and has not removed yet stays in its record: the annotations and
    # conditions are written after the record, and one of them may fail.
    new_owned = Owned(
        labels=tuple(want_labels),
        annotations=tuple(sorted(set(want_ann) | (set(owned.annotations) & set(annotations)))),
        conditions=tuple(
            sorted({c["type"] for c in want.conditions} | (set(owned.conditions) & set(have)))
        ),
        health=want_labels.get(keys.health_status_label, owned.health),
    )
    ann_patch = _diff(annotations, want_ann, set(owned.annotations))
    if clear_request and keys.deep_check_request_annotation in annotations:
        ann_patch[keys.deep_check_request_annotation] = None
    out.annotations = {"metadata": {"annotations": ann_patch}} if ann_patch else None

    patch: dict[str, Any] = {}
    if label_patch:
        patch.setdefault("metadata", {})["labels"] = label_patch
    record = new_owned.dump()
    if annotations.get(keys.owned_annotation) != record:
        patch.setdefault("metadata", {})["annotations"] = {keys.owned_annotation: record}
    taints = (node.get("spec") or {}).get("taints") or []
    new = taints
    if manage_health:
        ours = [t for t in want.taints if t.get("key") == keys.taint_key]
        new = [t for t in taints if t.get("key") != keys.taint_key] + ours
    elif (
        by_hand
        and wanted not in (None, str(Verdict.SCHEDULABLE))
        and not any(t.get("key") == keys.taint_key for t in taints)
    ):
        new = [*taints, {"key": keys.taint_key, "value": current, "effect": "NoSchedule"}]
    if _taint_set(new) != _taint_set(taints):
        patch.setdefault("spec", {})["taints"] = new
        patch.setdefault("metadata", {})["resourceVersion"] = meta.get("resourceVersion")
    out.meta = patch or None

    changes: list[dict[str, Any]] = []
    for c in want.conditions:
        old = have.get(c["type"])
        if old and all(old.get(k) == c[k] for k in ("status", "reason", "message")):
            continue
        moved = old is None or old.get("status") != c["status"]
        stamp = c["lastTransitionTime"] if moved else old.get("lastTransitionTime")
        changes.append({**c, "lastTransitionTime": stamp, "lastHeartbeatTime": now})
    gone = set(owned.conditions) - {c["type"] for c in want.conditions}
    changes += [{"type": t, "$patch": "delete"} for t in sorted(gone) if t in have]
    out.status = {"status": {"conditions": changes}} if changes else None
    return out


def _diff(have: dict[str, str], want: dict[str, str], owned: set[str]) -> dict[str, Any]:
    patch: dict[str, Any] = {k: v for k, v in want.items() if have.get(k) != v}
    patch.update({k: None for k in owned - set(want) if k in have})
    return patch


def _taint_set(taints: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((t.get("key"), t.get("value"), t.get("effect")) for t in taints)
