"""What the controller asks of nodes on its look at every node (`scan`):

- a new node (younger than `new_within`: a replacement, a scale-up) whose agent runs, of a
  type with accelerators, and that has no deep-check result yet: its deep check, asked of its
  agent with the annotation `node-health-agent.io/deep-check=run` (`deep_check_new_nodes`);
  with `deep_check.runner: job`, run as a Job on the node instead, as is a deep check an
  operator asks for with that annotation (agent/controller/deepjob.py);
- the connectivity check on the nodes an operator asked for (the annotation
  `node-health-agent.io/connectivity-request`, any value) and, when `connectivity.new_nodes`
  is set, on new nodes (no connectivity result, reported Schedulable by their agent, not in
  their own deep check).

One connectivity run at a time and one instance type a run, from the controller's thread; the
next scan takes the next type. A node alone of its type is tested against a node known good
(its last connectivity result passed) whose accelerators are free. A new node whose
accelerators are in use waits for a later scan (a test on it would only wait for them); a node
asked for is tested as asked. Nodes being remediated are left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.controller.connectivity import (
    TYPE_LABEL,
    Connectivity,
    ConnectivityError,
)
from agent.controller.deepjob import DeepJobs
from agent.controller.view import connectivity_verdict, uses_accelerators
from agent.events import Event, parse_time, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.kube.plan import PENDING
from agent.models import ControllerSettings, DeepCheckSettings, NodeKeys
from agent.policy import Verdict
from checks.instance_types import expected

log = structlog.get_logger("agent.controller")

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
        return parse_time(stamp)
    except ValueError:
        return None


def _young(node: dict[str, Any], within: float, now: float) -> bool:
    created = _created(node)
    return created is not None and now - created <= within


def is_new(node: dict[str, Any], keys: NodeKeys, within: float, now: float) -> bool:
    """New, and ready for its connectivity test."""
    meta = node.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    return (
        keys.connectivity_result_annotation not in notes
        and _young(node, within, now)
        and labels.get(keys.health_status_label) == str(Verdict.SCHEDULABLE)
        and labels.get(keys.deep_health_check_label) != "InProgress"
        and bool(expected(labels.get(TYPE_LABEL)).gpus)
    )


def wants_deep_check(node: dict[str, Any], keys: NodeKeys, within: float, now: float) -> bool:
    """New, its agent running (the health label), accelerators to check, never checked and
    not asked yet."""
    meta = node.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    want = expected(labels.get(TYPE_LABEL))
    return (
        _young(node, within, now)
        and keys.health_status_label in labels
        and not _remediating(labels, keys)
        and bool(want.gpus or want.neuron_devices)
        and keys.deep_health_check_label not in labels
        and keys.deep_check_request_annotation not in notes
    )


def _labels(node: dict[str, Any]) -> dict[str, str]:
    return (node.get("metadata") or {}).get("labels") or {}


def _remediating(labels: dict[str, str], keys: NodeKeys) -> bool:
    return keys.remediation_step_label in labels or labels.get(keys.health_status_label) in PENDING


def plan(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: ControllerSettings, now: float
) -> list[Group]:
    """The nodes to test, by instance type: types with a request first."""
    groups: dict[str, Group] = {}
    for node in nodes:
        meta = node.get("metadata") or {}
        labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
        if _remediating(labels, keys):
            continue
        asked = keys.connectivity_request_annotation in notes
        new = cfg.connectivity.new_nodes and is_new(node, keys, cfg.new_within, now)
        if not asked and not new:
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
        if connectivity_verdict(notes, keys) == "Passed":
            out.append(meta["name"])
    return sorted(out)


class Requests:
    def __init__(
        self,
        client: KubeClient,
        cfg: ControllerSettings,
        keys: NodeKeys,
        say: Callable[[Event], None],
        stopped: Callable[[], bool],
        sleep: Callable[[float], object] = time.sleep,
        deep: DeepCheckSettings | None = None,
    ) -> None:
        self.client, self.cfg, self.keys, self.say = client, cfg, keys, say
        self.stopped, self.sleep = stopped, sleep
        deep = deep or DeepCheckSettings()
        self.jobs = (
            DeepJobs(client, deep, keys, cfg.namespace, say, stopped)
            if deep.runner == "job"
            else None
        )
        self._told: set[str] = set()  # nodes already said to be waiting for a partner
        # nodes whose agent was asked for a deep check: once (a run that cannot judge leaves
        # no result label, and the next scan would ask again)
        self._asked: set[str] = set()

    def scan(self) -> None:
        """Ask new nodes for their deep check, then run the connectivity check on the first
        group that can run now; raises Interrupted when stopped, KubeError when the nodes
        cannot be listed."""
        nodes, now = self.client.list_nodes(""), time.time()
        new = set()
        if self.cfg.deep_check_new_nodes:
            new = {
                n["metadata"]["name"]
                for n in nodes
                if n["metadata"]["name"] not in self._asked
                and wants_deep_check(n, self.keys, self.cfg.new_within, now)
            }
        if self.jobs is not None:
            try:
                self._asked |= self.jobs.scan(
                    [n for n in nodes if not _remediating(_labels(n), self.keys)], new
                )
            except KubeError as exc:  # the Jobs cannot be listed: the next scan tries again
                log.warning("deep_check_jobs_unreadable", error=str(exc))
        else:
            for name in sorted(new):
                self._ask_deep_check(name)
        for group in plan(nodes, self.keys, self.cfg, now):
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
            self.client,
            self.cfg.connectivity,
            self.keys,
            self.say,
            sleep=self.sleep,
            stopped=self.stopped,
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

    def _ask_deep_check(self, name: str) -> None:
        if self.stopped():
            return
        ask = {self.keys.deep_check_request_annotation: "run"}
        try:
            self.client.patch_node(name, {"metadata": {"annotations": ask}}, MERGE)
        except KubeError as exc:  # the next scan asks again
            log.warning("deep_check_request_failed", node=name, error=str(exc))
            return
        self._asked.add(name)
        event: Event = {
            "level": "info",
            "ts": rfc3339(time.time()),
            "msg": f"{name}: new node: its deep check asked of its agent",
            "node": name,
            "reason": "DeepCheckRequested",
        }
        self.say(event)

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
