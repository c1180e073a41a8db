"""The cluster's record of hardware replaced for a fault, and the nodes it turns up on again.

A node replaced for a GPU fault leaves its GPU to the provider, which may repair it, or not,
and put it in another instance. So when the controller has a node replaced, it records the
identities (GPU UUID and serial, NIC GUID, Neuron device serial) of the devices the node's
agent had seen faulty (the agent's hardware annotation), and every scan it looks for those
identities on the nodes: a node carrying one gets an Event (Kubernetes and CloudWatch), the
controller's own label `replaced_hardware_label`, and a deep check asked of its agent, whose
findings decide. The agent's health labels stay the agent's: a serial match is a reason to
look, not a verdict.

The record is one ConfigMap rather than a CRD: nothing to install beyond the RBAC, readable
with kubectl, one named object the Role can be scoped to, written with its resourceVersion as
a precondition. It is bounded (`MAX_RECORDED`, the oldest dropped) to stay far below a
ConfigMap's 1 MiB.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.models import NodeKeys

log = structlog.get_logger("agent.controller")

MAX_RECORDED = 2000  # ~150 bytes each: well under the ConfigMap's 1 MiB
DATA_KEY = "replaced.json"


def faulty_identities(node: dict[str, Any], keys: NodeKeys) -> list[str]:
    """The identities of the devices the node's agent saw faulty (its hardware annotation)."""
    doc = _hardware(node, keys)
    out = []
    for dev in doc.get("devices") or []:
        if isinstance(dev, dict) and dev.get("faults"):
            out += [str(dev[k]) for k in ("uuid", "serial", "guid") if dev.get(k)]
    return out


def _hardware(node: dict[str, Any], keys: NodeKeys) -> dict[str, Any]:
    text = ((node.get("metadata") or {}).get("annotations") or {}).get(keys.hardware_annotation)
    try:
        doc = json.loads(text or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class ReplacedHardware:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        keys: NodeKeys,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.namespace, self.name, self.keys = client, namespace, name, keys
        self.wall = wall

    def record(
        self, ids: list[str], node: str, uid: str | None, instance_id: str | None, why: str
    ) -> None:
        """Put `ids`, the faulty devices of `node` (Node `uid`) being replaced, on the record.
        Raises KubeError when the ConfigMap cannot be read or written."""
        if not ids:
            return
        cm, record = self._read()
        entry = {
            "node": node,
            "uid": uid,
            "instance_id": instance_id,
            "at": rfc3339(self.wall()),
            "why": why[:200],
        }
        for i in ids:
            record.pop(i, None)
            record[i] = entry  # the newest last
        while len(record) > MAX_RECORDED:
            del record[next(iter(record))]
        self._write(cm, record)

    def scan(self, nodes: list[dict[str, Any]]) -> list[Event]:
        """Flag each node carrying recorded hardware that is not flagged yet; the events."""
        _, record = self._read()
        events: list[Event] = []
        if not record:
            return events
        for node in nodes:
            meta = node.get("metadata") or {}
            if (meta.get("labels") or {}).get(self.keys.replaced_hardware_label):
                continue  # flagged already; an operator removes the label once satisfied
            serials = [str(s) for s in _hardware(node, self.keys).get("serials") or []]
            # not on the node it was replaced from, while that node is still there
            found = [s for s in serials if s in record and record[s].get("uid") != meta.get("uid")]
            if not found:
                continue
            name = meta.get("name", "")
            try:
                self.client.patch_node(name, self._flag(meta), MERGE)
            except KubeError as exc:  # the next scan tries again
                log.warning("replaced_hardware_flag_failed", node=name, error=str(exc))
                continue
            events.append(self._event(node, found, record))
        return events

    def _flag(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The controller's own label, and a deep check asked of the node's agent."""
        return {
            "metadata": {
                "resourceVersion": meta.get("resourceVersion"),
                "labels": {self.keys.replaced_hardware_label: "true"},
                "annotations": {self.keys.deep_check_request_annotation: "run"},
            }
        }

    def _event(self, node: dict[str, Any], found: list[str], record: dict) -> Event:
        meta = node.get("metadata") or {}
        was = "; ".join(
            f"{s} was on {record[s].get('node')} ({record[s].get('instance_id')}), replaced "
            f"{record[s].get('at')}: {record[s].get('why')}"
            for s in found
        )
        event: Event = {
            "level": "error",
            "ts": rfc3339(self.wall()),
            "msg": f"hardware replaced for a fault is back: {was[:800]}; deep check asked for",
            "node": meta.get("name"),
            "reason": "ReplacedHardwareReturned",
            "hardware": found,
        }
        if meta.get("uid"):
            event["node_uid"] = meta["uid"]
        return event

    # -- the ConfigMap --------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        try:
            cm = self.client.get_config_map(self.namespace, self.name)
        except KubeError as exc:
            if exc.status == 404:
                return None, {}
            raise
        try:
            record = json.loads((cm.get("data") or {}).get(DATA_KEY) or "{}")
        except ValueError:
            log.warning("replaced_hardware_record_unreadable", configmap=self.name)
            record = {}  # written afresh with the next replacement
        return cm, record if isinstance(record, dict) else {}

    def _write(self, cm: dict[str, Any] | None, record: dict[str, Any]) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "data": {DATA_KEY: json.dumps(record, separators=(",", ":"))},
        }
        if cm is None:
            self.client.create_config_map(self.namespace, body)
            return
        body["metadata"]["resourceVersion"] = (cm.get("metadata") or {}).get("resourceVersion")
        self.client.replace_config_map(self.namespace, self.name, body)
