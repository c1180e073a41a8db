"""When the controller runs the connectivity check itself: on the nodes an operator asked for
(the annotation `node-health-agent.io/connectivity-request`, any value) and, when
`connectivity.new_nodes` is set, on nodes new to the cluster (younger than `new_within`, with
no connectivity result, reported Schedulable by their agent, not in their own deep check).

One run at a time and one instance type a run, from the controller's thread; the next scan
takes the next type. A node alone of its type is tested against a node known good (its last
connectivity result passed) whose accelerators are free. A new node whose accelerators are in
use waits for a later scan (a test on it would only wait for them); a node asked for is
tested as asked. Nodes being remediated are left alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.controller.connectivity import (
    RESULT_ANNOTATION,
    TYPE_LABEL,
    Connectivity,
    ConnectivityError,
)
from agent.controller.view import uses_accelerators
from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.kube.plan import PENDING
from agent.models import ConnectivitySettings, NodeKeys
from agent.policy import Verdict
from checks.instance_types import expected

PARTNER_TRIES = 5  # known-good nodes looked at for free accelerators, a scan


@dataclass
class Group:
    """The nodes of one instance type to test now."""

    itype: str
    requested: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


def _created(node: dict[str, Any]) -> float | None:
    stamp = (node.get("metadata") or {}).get("creationTimestamp")
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def is_new(node: dict[str, Any], keys: NodeKeys, within: float, now: float) -> bool:
    meta = node.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    created = _created(node)
    return (
        RESULT_ANNOTATION not in notes
        and created is not None
        and now - created <= within
        and labels.get(keys.health_status_label) == str(Verdict.SCHEDULABLE)
        and labels.get(keys.deep_health_check_label) != "InProgress"
        and bool(expected(labels.get(TYPE_LABEL)).gpus)
    )


def _remediating(labels: dict[str, str], keys: NodeKeys) -> bool:
    return keys.remediation_step_label in labels or labels.get(keys.health_status_label) in PENDING


def plan(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: ConnectivitySettings, now: float
) -> list[Group]:
    """The nodes to test, by instance type: types with a request first."""
    groups: dict[str, Group] = {}
    for node in nodes:
        meta = node.get("metadata") or {}
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        if _remediating(labels, keys):
            continue
        asked = keys.connectivity_request_annotation in notes
        if not asked and not (cfg.new_nodes and is_new(node, keys, cfg.new_within, now)):
            continue
        itype = str(labels.get(TYPE_LABEL) or "")
        group = groups.setdefault(itype, Group(itype))
        (group.requested if asked else group.new).append(meta["name"])
    return sorted(groups.values(), key=lambda g: (not g.requested, g.itype))


def known_good(
    nodes: list[dict[str, Any]], keys: NodeKeys, itype: str, exclude: set[str]
) -> list[str]:
    """Nodes of `itype` whose last connectivity result passed and that take work now."""
    out = []
    for node in nodes:
        meta = node.get("metadata") or {}
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        if meta.get("name") in exclude or labels.get(TYPE_LABEL) != itype:
            continue
        if _remediating(labels, keys) or (node.get("spec") or {}).get("unschedulable"):
            continue
        if labels.get(keys.health_status_label) != str(Verdict.SCHEDULABLE):
            continue
        try:
            passed = json.loads(notes.get(RESULT_ANNOTATION) or "{}").get("verdict") == "Passed"
        except (ValueError, AttributeError):
            passed = False
        if passed:
            out.append(meta["name"])
    return sorted(out)


class Requests:
    def __init__(
        self,
        client: KubeClient,
        cfg: ConnectivitySettings,
        keys: NodeKeys,
        say: Callable[[Event], None],
        stopped: Callable[[], bool],
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.client, self.cfg, self.keys, self.say = client, cfg, keys, say
        self.stopped, self.sleep = stopped, sleep
        self._told: set[str] = set()  # nodes already said to be waiting for a partner

    def scan(self) -> None:
        """Run the check on the first group that can run now; raises Interrupted when
        stopped, KubeError when the nodes cannot be listed."""
        nodes = self.client.list_nodes("")
        for group in plan(nodes, self.keys, self.cfg, time.time()):
            names = group.requested + [n for n in group.new if self._free(n)]
            partners: list[str] = []
            if len(names) == 1:
                exclude = set(group.requested) | set(group.new)
                good = known_good(nodes, self.keys, group.itype, exclude)[:PARTNER_TRIES]
                partner = next((p for p in good if self._free(p)), None)
                if partner is None:
                    self._waiting(names[0], group.itype)
                    continue
                partners = [partner]
            if not names:
                continue
            self._told -= set(names)
            self._run(group, names, partners)
            return

    def _run(self, group: Group, names: list[str], partners: list[str]) -> None:
        check = Connectivity(
            self.client, self.cfg, self.keys, self.say, sleep=self.sleep, stopped=self.stopped
        )
        try:
            check.check(names, partners=partners)
        except ConnectivityError as exc:  # said once, on each node asked for; not asked again
            for name in group.requested:
                if self.stopped():
                    return
                self._say(f"{name}: connectivity check refused: {exc}", name, "Refused", "error")
                request = {self.keys.connectivity_request_annotation: None}
                try:
                    self.client.patch_node(name, {"metadata": {"annotations": request}}, MERGE)
                except KubeError as err:
                    msg = f"{name}: the request could not be removed: {err}"
                    self._say(msg, name, "Refused", "error")

    def _free(self, name: str) -> bool:
        """No pod on the node uses its accelerators (an unreadable list counts as in use)."""
        try:
            return not uses_accelerators(self.client.list_pods_on(name))
        except KubeError:
            return False

    def _waiting(self, name: str, itype: str) -> None:
        if name in self._told:
            return
        self._told.add(name)
        self._say(
            f"{name}: connectivity check waits for a second {itype or 'untyped'} node: none "
            "known good has its accelerators free",
            name,
            "Waiting",
            "warn",
        )

    def _say(self, msg: str, node: str, reason: str, level: str) -> None:
        event: Event = {"level": level, "ts": rfc3339(time.time()), "msg": msg}
        event.update(check="InstanceConnectivity", node=node)
        event["reason"] = f"InstanceConnectivity{reason}"
        self.say(event)
