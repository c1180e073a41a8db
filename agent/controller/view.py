"""What the controller reads from a Node and its pods: pure functions over API dicts.

The remediation record lives on the node (an annotation, JSON) with its step as a label, so a
controller that restarts, or a new leader, carries on where the last one stopped.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.controller.backends import Action
from agent.controller.replaced import faulty_identities
from agent.kube.plan import PENDING, Owned
from agent.models import NodeKeys
from agent.policy import Verdict

_INSTANCE = re.compile(r"(?:^|[/-])(i-[0-9a-f]{8,17})$")


class Step(enum.StrEnum):
    DRAINING = "Draining"  # cordoned; pods being evicted
    REBOOTING = "Rebooting"  # the backend took the reboot; waiting for a new boot id
    REPLACING = "Replacing"  # the backend took the replacement; waiting for the node to go
    RECOVERING = "Recovering"  # rebooted; the node's agent decides (its deep check)
    REPORTED = "Reported"  # backend `none`: drained and reported; an operator acts
    FAILED = "Failed"  # the backend refused, or nothing happened in time; retried later


def wanted_action(health: str | None) -> Action | None:
    """What the health label asks for; None: nothing."""
    if health == str(Verdict.PENDING_REBOOT):
        return Action.REBOOT
    if health in PENDING:
        return Action.REPLACE
    return None


@dataclass
class Record:
    """The node's remediation so far (times are wall-clock seconds)."""

    step: Step
    action: Action
    started: float  # when this remediation began (cordon)
    since: float  # when the current step began
    cordoned: bool  # this controller cordoned the node (so it uncordons it)
    attempts: int = 1  # reboots or replacements asked for, this one included
    boot_id: str | None = None  # the node's boot when the backend was asked
    retry_at: float | None = None  # FAILED: when to ask again
    reported: list[str] = field(default_factory=list)  # once-only reports already made
    seen_clear: bool = False  # RECOVERING: the agent has taken its Pending label back

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str | None) -> Record | None:
        """None when absent or unreadable (then the node is looked at afresh)."""
        if not text:
            return None
        try:
            raw = json.loads(text)
            raw["step"], raw["action"] = Step(raw["step"]), Action(raw["action"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class NodeView:
    name: str
    uid: str | None
    resource_version: str | None
    health: str | None
    health_by_agent: bool  # the label is the agent's own (else an operator's or HyperPod's)
    remediation_off: bool
    unschedulable: bool
    boot_id: str | None
    instance_id: str | None
    record: Record | None
    faulty_hardware: list[str] = field(default_factory=list)  # identities its agent saw faulty

    @classmethod
    def of(cls, node: dict[str, Any], keys: NodeKeys) -> NodeView:
        meta = node.get("metadata") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        health = labels.get(keys.health_status_label)
        owned = Owned.parse(annotations.get(keys.owned_annotation))
        spec = node.get("spec") or {}
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
            health=health,
            health_by_agent=health is not None and owned.health == health,
            remediation_off=annotations.get(keys.remediation_annotation, "").lower() == "off",
            unschedulable=bool(spec.get("unschedulable")),
            boot_id=((node.get("status") or {}).get("nodeInfo") or {}).get("bootID") or None,
            instance_id=instance_id(node),
            record=Record.parse(annotations.get(keys.remediation_state_annotation)),
            faulty_hardware=faulty_identities(node, keys),
        )


def instance_id(node: dict[str, Any]) -> str | None:
    """The EC2 instance id: from spec.providerID (`aws:///us-west-2a/i-0abc...`), else from
    the node's name (HyperPod's `hyperpod-i-0abc...`)."""
    provider = str((node.get("spec") or {}).get("providerID") or "")
    name = str((node.get("metadata") or {}).get("name") or "")
    for text in (provider, name):
        if m := _INSTANCE.search(text):
            return m.group(1)
    return None


def _finished(p: dict[str, Any]) -> bool:
    return (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def to_evict(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods a drain must see gone, as `kubectl drain` picks them: not DaemonSet pods (the
    DaemonSet would put them back, and they tolerate the taint), not mirror pods (kubelet's
    static pods cannot be evicted), not pods that have finished."""
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
            continue
        if any(
            o.get("kind") == "DaemonSet" and o.get("controller")
            for o in meta.get("ownerReferences") or []
        ):
            continue
        if _finished(p):
            continue
        out.append(p)
    return out


ACCELERATORS = (
    "nvidia.com/gpu",
    "aws.amazon.com/neuron",
    "aws.amazon.com/neurondevice",
    "aws.amazon.com/neuroncore",
)


def uses_accelerators(pods: list[dict[str, Any]]) -> bool:
    """A pod that has not finished asks for a GPU or a Neuron device (requests or limits, in
    any container, init containers included: the scheduler counts them too)."""
    for p in pods:
        if _finished(p):
            continue
        spec = p.get("spec") or {}
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            res = c.get("resources") or {}
            asked = {**(res.get("requests") or {}), **(res.get("limits") or {})}
            if any(str(asked.get(name, "0")) not in ("0", "") for name in ACCELERATORS):
                return True
    return False


def connectivity_verdict(annotations: dict[str, str], keys: NodeKeys) -> str | None:
    """The last connectivity check's verdict on a node (`Passed`, `Failed`, `Unknown`)."""
    try:
        verdict = json.loads(annotations.get(keys.connectivity_result_annotation) or "{}")
        return str(verdict["verdict"])
    except (ValueError, TypeError, KeyError):
        return None


def pod_name(p: dict[str, Any]) -> str:
    meta = p.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"
