"""One pass over the nodes that need remediation, or are in one: each takes its next step.

The steps, each recorded on the node before the next begins (view.Step):
cordon and drain (Eviction API: PodDisruptionBudgets are the API server's to enforce; past the
deadline the drain is reported, and forced only when configured) -> ask the backend to reboot
or replace -> wait for the new boot (or the node to go) -> the node's agent decides: back to
Schedulable (uncordon, done), or it needs remediation again (a replacement after
`reboots_before_replace` reboots). Nothing is done for a node whose remediation annotation is
`off`, nor beyond the budget, nor by a controller that is not the leader.

Synchronous (API and AWS calls): the controller runs a pass in a thread. Events are returned,
not sent, so the caller ships them through its sinks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.controller.backends import Action, Backend, Result
from agent.controller.budget import Budget
from agent.controller.replaced import ReplacedHardware
from agent.controller.topology import Suspect, suspects
from agent.controller.view import NodeView, Record, Step, pod_name, to_evict, wanted_action
from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.kube.plan import PENDING
from agent.models import ControllerSettings, NodeKeys
from agent.policy import Verdict

log = structlog.get_logger("agent.controller")

_NEXT = {Action.REBOOT: Step.REBOOTING, Action.REPLACE: Step.REPLACING}
_WORD = {Action.REBOOT: "reboot", Action.REPLACE: "replacement"}


class Remediator:
    def __init__(
        self,
        client: KubeClient,
        keys: NodeKeys,
        cfg: ControllerSettings,
        backend: Backend,
        fleet_percent: float | None,
        is_leader: Callable[[], bool],
        record_start: Callable[[float, float | None], bool],
        starts: Callable[[], list[float]],
        wall: Callable[[], float] = time.time,
        replaced: ReplacedHardware | None = None,
    ) -> None:
        self.client, self.keys, self.cfg, self.backend = client, keys, cfg, backend
        self.percent = fleet_percent
        self.is_leader, self.record_start, self.starts = is_leader, record_start, starts
        self.wall, self.replaced = wall, replaced
        self.events: list[Event] = []
        self._fleet: int | None = None  # the agents' nodes, counted once a pass when needed
        self._noted: dict[str, str] = {}  # node -> the last "not now" said about it
        # node -> a start recorded on the Lease for it whose node write failed (a conflict,
        # say): its retry takes that slot again rather than a second one
        self._unspent: dict[str, float] = {}
        self.suspects: list[Suspect] = []  # network nodes suspected, as of the last pass

    # -- the pass -------------------------------------------------------------------------

    def run_pass(self) -> list[Event]:
        """Look at every node concerned once; the events of what was done."""
        self.events, self._fleet = [], None
        keys = self.keys
        pending = ",".join(sorted(PENDING))
        needing = self.client.list_nodes(f"{keys.health_status_label} in ({pending})")
        ongoing = self.client.list_nodes(keys.remediation_step_label)
        nodes = {n["metadata"]["name"]: n for n in [*needing, *ongoing]}
        views = [NodeView.of(n, keys) for n in nodes.values()]
        self._suspect_network()
        held = {name: s for s in self.suspects for name in s.nodes}
        unspent = set(self._unspent.values())
        budget = Budget(
            self.cfg.concurrent,
            self.cfg.per_hour,
            in_progress={v.name for v in views if v.record is not None},
            started_at=[t for t in self.starts() if t not in unspent],
        )
        for view in sorted(views, key=lambda v: v.name):
            if not self.is_leader():
                break
            try:
                self._node(view, budget, held.get(view.name))
            except KubeError as exc:
                log.warning("remediation_step_failed", node=view.name, error=str(exc))
            except Exception as exc:  # one node's surprise must not stop the others
                log.error("remediation_step_crashed", node=view.name, error=repr(exc))
        self._noted = {k: v for k, v in self._noted.items() if k in nodes}
        self._unspent = {k: v for k, v in self._unspent.items() if k in nodes}
        return self.events

    def _node(self, view: NodeView, budget: Budget, suspect: Suspect | None = None) -> None:
        rec, action = view.record, wanted_action(view.health)
        if view.remediation_off:
            if rec is not None or action is not None:
                self._once(view, "RemediationOff", "remediation is off for this node: not acting")
            return
        if rec is None:
            if action is not None and suspect is not None:  # one started goes on
                self._once(view, "RemediationHeld", f"{_WORD[action]} held: {suspect.describe()}")
            elif action is not None:
                self._start(view, action, budget)
            return
        self._noted.pop(view.name, None)
        now = self.wall()
        if view.health == str(Verdict.SCHEDULABLE) or (
            view.health is None and rec.step is not Step.RECOVERING
        ):
            self._finish(view, rec)
            budget.done(view.name)
            return
        match rec.step:
            case Step.DRAINING:
                if action is not None:
                    self._drain(view, rec, now)
            case Step.FAILED:
                if action is not None and now >= (rec.retry_at or 0):
                    self._act(view, rec, now)
            case Step.REBOOTING:
                if view.boot_id and view.boot_id != rec.boot_id:
                    self._rebooted(view, rec, now)
                elif now - rec.since > self.cfg.reboot_timeout:
                    self._failed(view, rec, now, "no reboot seen in time")
            case Step.REPLACING:
                if view.boot_id and view.boot_id != rec.boot_id:
                    self._rebooted(view, rec, now)
                elif now - rec.since > self.cfg.replace_timeout:
                    self._failed(view, rec, now, "the node is still here")
            case Step.RECOVERING:
                self._recovering(view, rec, action, now)
            case Step.REPORTED:
                pass  # an operator acts; the node returning to Schedulable ends it

    # -- the steps ------------------------------------------------------------------------

    def _start(self, view: NodeView, action: Action, budget: Budget) -> None:
        now = self.wall()
        refusal = budget.refuses(view.name, now) or self._fleet_refuses(budget)
        if refusal is not None:
            self._once(view, "RemediationWaiting", f"{_WORD[action]} waits: {refusal}")
            return
        now = round(now, 3)  # as the Lease keeps it
        if not self.record_start(now, self._unspent.pop(view.name, None)):
            return  # fenced: not the leader any more
        rec = Record(Step.DRAINING, action, now, now, cordoned=not view.unschedulable)
        try:
            self._write(view, rec, cordon=True)
        except KubeError:
            self._unspent[view.name] = now
            raise
        budget.start(view.name, now)
        self._noted.pop(view.name, None)
        self._say(
            view,
            rec,
            "warn",
            "RemediationStarted",
            f"{view.health}: cordoned, draining for {_WORD[action]}",
        )
        self._drain(view, rec, now)

    def _suspect_network(self) -> None:
        """The network nodes suspected now (topology), said when one is first and when it
        clears; an API error keeps the last pass's."""
        cfg = self.cfg.topology
        if not cfg.labels:
            return
        try:
            faulty = self.client.list_nodes(self.keys.fault_types_label)
        except KubeError as exc:
            log.warning("topology_unread", error=str(exc))
            return
        now = suspects(faulty, self.keys, cfg, self.wall())
        before = {s.domain for s in self.suspects}
        for s in now:
            if s.domain not in before:
                self.events.append(self._domain_event(s, "error", "NetworkDomainSuspected"))
        for s in self.suspects:
            if s.domain not in {n.domain for n in now}:
                self.events.append(self._domain_event(s, "info", "NetworkDomainCleared"))
        self.suspects = now

    def _domain_event(self, s: Suspect, level: str, reason: str) -> Event:
        if level == "error":
            msg = f"{s.describe()}; their remediation is held"
        else:
            msg = f"network node {s.domain} no longer suspected: remediation of its nodes resumes"
        return {
            "level": level,
            "ts": rfc3339(self.wall()),
            "msg": msg,
            "reason": reason,
            "network_node": s.domain,
            "nodes": list(s.nodes),
            "faults": list(s.faults),
        }

    def _fleet_refuses(self, budget: Budget) -> str | None:
        if self.percent is None:
            return None
        if self._fleet is None:
            self._fleet = len(self.client.list_nodes(self.keys.health_status_label)) or 1
        fleet = self._fleet
        after = len(budget.in_progress) + 1
        if after * 100 > self.percent * fleet:
            return (
                f"{len(budget.in_progress)} of {fleet} nodes in remediation already "
                f"(at most {self.percent:g}%)"
            )
        return None

    def _drain(self, view: NodeView, rec: Record, now: float) -> None:
        left = to_evict(self.client.list_pods_on(view.name))
        if not left:
            self._act(view, rec, now)
            return
        blocked: list[str] = []
        for p in left:
            if (p.get("metadata") or {}).get("deletionTimestamp"):
                continue  # evicted already; its containers are stopping
            meta = p["metadata"]
            try:
                self.client.evict(meta["namespace"], meta["name"], self.cfg.eviction_grace)
            except KubeError as exc:
                if exc.status == 404:
                    continue
                blocked.append(f"{pod_name(p)} ({exc})")
        if now - rec.started <= self.cfg.drain_timeout:
            return
        names = ", ".join(blocked or [pod_name(p) for p in left])
        if self.cfg.force:
            self._say(
                view,
                rec,
                "warn",
                "DrainDeadlineForced",
                f"drain deadline passed with {len(left)} pods left ({names[:600]}): "
                f"asking for the {_WORD[rec.action]} anyway (force)",
            )
            self._act(view, rec, now)
        elif "drain-deadline" not in rec.reported:
            rec.reported.append("drain-deadline")
            self._write(view, rec)
            self._say(
                view,
                rec,
                "error",
                "DrainBlocked",
                f"drain deadline passed with {len(left)} pods left ({names[:600]}): not "
                f"asking for the {_WORD[rec.action]}; evictions go on (controller.force acts "
                "anyway)",
            )

    def _act(self, view: NodeView, rec: Record, now: float) -> None:
        if not self.is_leader():
            return
        if view.instance_id is None:
            self._failed(view, rec, now, "no EC2 instance id in spec.providerID or the name")
            return
        outcome = self.backend.act(rec.action, [view.instance_id])[0]
        rec.since, rec.retry_at, rec.boot_id = now, None, view.boot_id
        if outcome.result is Result.SKIPPED:
            rec.step = Step.REPORTED
            self._write(view, rec)
            if rec.action is Action.REPLACE:  # an operator replaces it
                self._record_replaced(view)
            self._say(
                view,
                rec,
                "warn",
                "RemediationReported",
                f"drained; needs {_WORD[rec.action]} of {view.instance_id} "
                f"(backend {self.backend.name}: an operator acts)",
            )
        elif outcome.result is Result.FAILED:
            self._failed(view, rec, now, f"{self.backend.name}: {outcome.message}")
        else:
            rec.step = _NEXT[rec.action]
            self._write(view, rec)
            if rec.action is Action.REPLACE:
                self._record_replaced(view)
            already = " (already in progress)" if outcome.result is Result.IN_PROGRESS else ""
            self._say(
                view,
                rec,
                "warn",
                f"Remediation{rec.step}",
                f"{_WORD[rec.action]} of {view.instance_id} asked of {self.backend.name}{already}",
            )

    def _record_replaced(self, view: NodeView) -> None:
        """The node's faulty hardware on the cluster's record; a failure is logged: the
        replacement goes on regardless."""
        if self.replaced is None or not view.faulty_hardware:
            return
        try:
            self.replaced.record(
                view.faulty_hardware, view.name, view.uid, view.instance_id, view.health or ""
            )
        except KubeError as exc:
            log.warning("replaced_hardware_unrecorded", node=view.name, error=str(exc))

    def _failed(self, view: NodeView, rec: Record, now: float, why: str) -> None:
        rec.step, rec.since = Step.FAILED, now
        rec.retry_at = now + self.cfg.retry_interval
        self._write(view, rec)
        self._say(
            view,
            rec,
            "error",
            "RemediationFailed",
            f"{_WORD[rec.action]} failed: {why}; trying again after {rfc3339(rec.retry_at)}",
        )

    def _rebooted(self, view: NodeView, rec: Record, now: float) -> None:
        rec.step, rec.since, rec.seen_clear = Step.RECOVERING, now, False
        labels: dict[str, Any] = {}
        if view.health in PENDING and not view.health_by_agent:
            # An operator's (or HyperPod's) label: the agent never takes that back itself, so
            # the node is handed to its agent as under a deep check.
            labels[self.keys.health_status_label] = str(Verdict.UNSCHEDULABLE)
        self._write(view, rec, labels=labels)
        self._say(
            view,
            rec,
            "info",
            "RemediationRebooted",
            f"new boot ({view.boot_id}): the node's agent decides whether it is Schedulable",
        )

    def _recovering(self, view: NodeView, rec: Record, action: Action | None, now: float) -> None:
        if action is None:
            if not rec.seen_clear:
                rec.seen_clear = True
                self._write(view, rec)
            return
        if not rec.seen_clear and now - rec.since <= self.cfg.settle:
            return  # the label may be the last boot's: the agent has not spoken yet
        rec.attempts += 1
        if action is Action.REBOOT and rec.attempts > self.cfg.reboots_before_replace:
            action = Action.REPLACE
        rec.action, rec.step, rec.since, rec.reported = action, Step.DRAINING, now, []
        self._write(view, rec, cordon=True)
        self._say(
            view,
            rec,
            "warn",
            "RemediationAgain",
            f"{view.health} again after the {_WORD[Action.REBOOT]}: {_WORD[action]} "
            f"(attempt {rec.attempts})",
        )
        self._drain(view, rec, now)

    def _finish(self, view: NodeView, rec: Record) -> None:
        if not self.is_leader():
            return
        keys = self.keys
        patch: dict[str, Any] = {
            "metadata": {
                "resourceVersion": view.resource_version,
                "labels": {keys.remediation_step_label: None},
                "annotations": {keys.remediation_state_annotation: None},
            }
        }
        if rec.cordoned and view.unschedulable:
            patch["spec"] = {"unschedulable": None}
        self.client.patch_node(view.name, patch, MERGE)
        state = view.health or "no health label"
        done = "uncordoned" if "spec" in patch else "left as it was cordoned"
        self._say(view, rec, "info", "RemediationDone", f"{state}: remediation ended; {done}")

    # -- writing and saying ---------------------------------------------------------------

    def _write(
        self,
        view: NodeView,
        rec: Record,
        cordon: bool = False,
        labels: dict[str, Any] | None = None,
    ) -> None:
        """The record and step on the node, with the resourceVersion read as a precondition
        (409: someone changed the node; the next pass looks again)."""
        if not self.is_leader():
            raise KubeError(None, "not the leader: nothing written")
        keys = self.keys
        patch: dict[str, Any] = {
            "metadata": {
                "resourceVersion": view.resource_version,
                "labels": {keys.remediation_step_label: str(rec.step), **(labels or {})},
                "annotations": {keys.remediation_state_annotation: rec.dump()},
            }
        }
        if cordon and not view.unschedulable:
            patch["spec"] = {"unschedulable": True}
        node = self.client.patch_node(view.name, patch, MERGE)
        view.resource_version = node["metadata"].get("resourceVersion")
        view.unschedulable = view.unschedulable or cordon

    def _once(self, view: NodeView, reason: str, msg: str) -> None:
        if self._noted.get(view.name) != msg:
            self._noted[view.name] = msg
            self.events.append(self._event(view, "info", reason, msg))

    def _say(self, view: NodeView, rec: Record, level: str, reason: str, msg: str) -> None:
        event = self._event(view, level, reason, msg)
        event.update(step=str(rec.step), action=str(rec.action), attempt=rec.attempts)
        log.info("remediation", node=view.name, reason=reason, msg=msg)
        self.events.append(event)

    def _event(self, view: NodeView, level: str, reason: str, msg: str) -> Event:
        event: Event = {"level": level, "ts": rfc3339(self.wall()), "msg": msg}
        event.update(node=view.name, reason=reason, health=view.health)
        if view.instance_id:
            event["instance_id"] = view.instance_id
        if view.uid:
            event["node_uid"] = view.uid
        return event
