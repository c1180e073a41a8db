"""Remediation, pass by pass, against the fake API server: cordon, drain through the Eviction
API (PodDisruptionBudgets answered with 429), the backend's reboot or replacement, the new
boot, and the node's return; the budget, the remediation switch, restarts and failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.controller.backends import Action, Outcome, Result
from agent.controller.remediator import Remediator
from agent.controller.view import Record, Step
from agent.kube.client import KubeClient
from agent.kube.plan import Owned
from agent.models import ControllerSettings, NodeKeys
from tests.kube.fake_api import FakeKubeAPI

KEYS = NodeKeys()
HEALTH, STEP = KEYS.health_status_label, KEYS.remediation_step_label
STATE = KEYS.remediation_state_annotation


class Backend:
    """Records what it is asked; answers `result` (per instance id when a dict)."""

    name = "test"

    def __init__(self, result: Result = Result.STARTED, message: str = "") -> None:
        self.result, self.message = result, message
        self.calls: list[tuple[Action, list[str]]] = []

    def act(self, action: Action, ids: list[str]) -> list[Outcome]:
        self.calls.append((action, list(ids)))
        return [Outcome(i, self.result, self.message) for i in ids]


class World:
    """The remediator with a clock and a Lease the tests control."""

    def __init__(self, api: FakeKubeAPI, kcfg: Path, **cfg: object) -> None:
        self.api = api
        self.now = 1_790_000_000.0
        self.leader = True
        self.starts: list[float] = []
        self.backend = Backend()
        self.kcfg = kcfg
        self.cfg = ControllerSettings(**cfg)
        self.fresh()

    def fresh(self, percent: float | None = None) -> None:
        """A new controller process (nothing in memory)."""
        self.r = Remediator(
            KubeClient(str(self.kcfg)),
            KEYS,
            self.cfg,
            self.backend,
            percent,
            is_leader=lambda: self.leader,
            record_start=self._record,
            starts=lambda: [t for t in self.starts if self.now - t < 3600],
            wall=lambda: self.now,
        )

    def _record(self, at: float, instead_of: float | None) -> bool:
        if self.leader:
            self.starts = [t for t in self.starts if t != instead_of] + [at]
        return self.leader

    def run(self, advance: float = 5.0) -> list[dict]:
        self.now += advance
        return self.r.run_pass()

    def node(self, name: str = "gpu-1") -> dict:
        return self.api.node(name)

    def record(self, name: str = "gpu-1") -> Record | None:
        return Record.parse(self.node(name)["metadata"]["annotations"].get(STATE))


def gpu_node(api: FakeKubeAPI, name: str, health: str, by_agent: bool = True, **kw) -> None:
    iid = "i-0" + name.encode().hex().ljust(16, "0")[:16]
    api.add_node(name, {HEALTH: health}, providerID=f"aws:///us-west-2a/{iid}", **kw)

    def agent_marks(n: dict) -> None:
        n["status"]["nodeInfo"] = {"bootID": "boot-1"}
        if by_agent:
            n["metadata"]["annotations"][KEYS.owned_annotation] = Owned(health=health).dump()

    api.edit(name, agent_marks)


def set_health(api: FakeKubeAPI, name: str, health: str | None, by_agent: bool = True) -> None:
    def change(n: dict) -> None:
        labels, ann = n["metadata"]["labels"], n["metadata"]["annotations"]
        if health is None:
            labels.pop(HEALTH, None)
        else:
            labels[HEALTH] = health
            if by_agent:
                ann[KEYS.owned_annotation] = Owned(health=health).dump()

    api.edit(name, change)


def reboot(api: FakeKubeAPI, name: str, boot: str = "boot-2") -> None:
    api.edit(name, lambda n: n["status"].__setitem__("nodeInfo", {"bootID": boot}))


def reasons(events: list[dict]) -> list[str]:
    return [e["reason"] for e in events]


@pytest.fixture
def world(api: FakeKubeAPI, kcfg: Path) -> World:
    gpu_node(api, "gpu-1", "UnschedulablePendingReboot")
    return World(api, kcfg)


def test_reboot_end_to_end_cordon_drain_reboot_return(world: World, api: FakeKubeAPI) -> None:
    api.add_pod("team", "trainer-0", "gpu-1", labels={"app": "train"}, owner="StatefulSet")
    api.add_pod("kube-system", "efa-plugin", "gpu-1", owner="DaemonSet")
    api.add_pod("kube-system", "static-web", "gpu-1", mirror=True)
    api.add_pod("team", "done", "gpu-1", owner="Job", phase="Succeeded")
    api.add_pod("team", "elsewhere", "gpu-2")

    events = world.run()
    node = world.node()
    assert node["spec"]["unschedulable"] is True
    assert node["metadata"]["labels"][STEP] == "Draining"
    assert api.state.evictions == [("team", "trainer-0", None)]
    assert api.pods_on("gpu-1") == ["kube-system/efa-plugin", "kube-system/static-web", "team/done"]
    assert reasons(events) == ["RemediationStarted"]
    assert events[0]["node"] == "gpu-1" and events[0]["level"] == "warn"
    assert list(events[0])[:3] == ["level", "ts", "msg"]
    assert world.backend.calls == []  # the pass that evicted does not act yet

    events = world.run()
    iid = "i-0" + b"gpu-1".hex().ljust(16, "0")
    assert world.backend.calls == [(Action.REBOOT, [iid])]
    assert reasons(events) == ["RemediationRebooting"]
    assert world.record().step is Step.REBOOTING and world.record().boot_id == "boot-1"

    assert world.run() == [] and len(world.backend.calls) == 1  # waiting for the new boot

    reboot(api, "gpu-1")
    assert reasons(world.run()) == ["RemediationRebooted"]
    assert world.record().step is Step.RECOVERING
    assert world.node()["metadata"]["labels"][HEALTH] == "UnschedulablePendingReboot"

    set_health(api, "gpu-1", "Unschedulable")  # the agent's deep check after the reboot
    assert world.run() == []
    set_health(api, "gpu-1", "Schedulable")
    events = world.run()
    assert reasons(events) == ["RemediationDone"] and "uncordoned" in events[0]["msg"]
    node = world.node()
    assert "unschedulable" not in node["spec"]
    assert STEP not in node["metadata"]["labels"] and STATE not in node["metadata"]["annotations"]
    assert world.run() == [] and len(world.backend.calls) == 1


def test_state_is_on_the_node_so_a_restarted_controller_does_not_ask_twice(
    world: World, api: FakeKubeAPI
) -> None:
    world.run()
    world.run()
    assert len(world.backend.calls) == 1
    world.fresh()  # a new process, or a new leader
    world.run()
    world.run(world.cfg.reboot_timeout - 20)
    assert len(world.backend.calls) == 1
    assert world.record().step is Step.REBOOTING


def test_a_pod_disruption_budget_holds_the_drain_and_the_deadline_is_reported_once(
    world: World, api: FakeKubeAPI
) -> None:
    api.add_pod("team", "db-0", "gpu-1", labels={"app": "db"}, owner="StatefulSet")
    api.add_pdb("team", "db", "app=db", allowed=0)
    world.run()
    world.run()
    refused = [r for r in api.requests("POST", r".*/eviction") if r.code == 429]
    assert len(refused) == 2 and world.backend.calls == []
    events = world.run(world.cfg.drain_timeout)
    assert reasons(events) == ["DrainBlocked"]
    assert "team/db-0" in events[0]["msg"] and "disruption budget" in events[0]["msg"]
    assert events[0]["level"] == "error"
    assert world.run() == [] and world.backend.calls == []  # said once; evictions go on
    assert api.pods_on("gpu-1") == ["team/db-0"]

    api.add_pdb("team", "db", "app=db", allowed=1)  # the budget allows one now
    world.run()
    assert api.pods_on("gpu-1") == []
    world.run()
    assert len(world.backend.calls) == 1


def test_force_acts_when_the_drain_deadline_passes(api: FakeKubeAPI, kcfg: Path) -> None:
    gpu_node(api, "gpu-1", "UnschedulablePendingReplacement")
    api.add_pod("team", "db-0", "gpu-1", labels={"app": "db"})
    api.add_pdb("team", "db", "app=db", allowed=0)
    world = World(api, kcfg, force=True, drain_timeout=60)
    world.run()
    assert world.backend.calls == []
    events = world.run(61)
    assert reasons(events) == ["DrainDeadlineForced", "RemediationReplacing"]
    assert world.backend.calls[0][0] is Action.REPLACE


def test_terminating_pods_are_waited_for_not_evicted_again(world: World, api) -> None:
    api.hold_deletion = True
    api.add_pod("team", "trainer-0", "gpu-1", owner="StatefulSet")
    world.run()
    world.run()
    assert len(api.state.evictions) == 1 and world.backend.calls == []
    api.finish_deletion()
    world.run()
    assert len(world.backend.calls) == 1


def test_remediation_off_means_nothing_is_touched(world: World, api: FakeKubeAPI) -> None:
    api.add_pod("team", "trainer-0", "gpu-1")
    api.edit(
        "gpu-1", lambda n: n["metadata"]["annotations"].update({KEYS.remediation_annotation: "off"})
    )
    before = world.node()
    events = world.run()
    assert reasons(events) == ["RemediationOff"]
    assert world.run() == []  # said once
    assert world.node() == before
    assert api.state.evictions == [] and world.backend.calls == []
    assert api.requests("PATCH") == []


def test_not_the_leader_writes_nothing(world: World, api: FakeKubeAPI) -> None:
    world.leader = False
    assert world.run() == []
    assert api.requests("PATCH") == [] and world.backend.calls == []


def test_budget_one_at_a_time_and_per_hour(api: FakeKubeAPI, kcfg: Path) -> None:
    for name in ("gpu-1", "gpu-2", "gpu-3"):
        gpu_node(api, name, "UnschedulablePendingReboot")
    world = World(api, kcfg, concurrent=1, per_hour=2)
    events = world.run()  # no pods to evict: gpu-1 is drained and rebooted at once
    assert reasons(events) == [
        "RemediationStarted",
        "RemediationRebooting",
        "RemediationWaiting",
        "RemediationWaiting",
    ]
    assert "1 nodes in remediation already (at most 1)" in events[2]["msg"]
    assert world.run() == []  # the waits are not said again
    set_health(api, "gpu-1", "Schedulable")
    events = world.run()
    assert reasons(events)[:2] == ["RemediationDone", "RemediationStarted"]
    assert events[1]["node"] == "gpu-2"
    set_health(api, "gpu-2", "Schedulable")
    events = world.run()
    assert reasons(events) == ["RemediationDone", "RemediationWaiting"]
    assert "2 remediations started in the last hour (at most 2)" in events[1]["msg"]
    events = world.run(3600)
    assert reasons(events)[0] == "RemediationStarted" and events[0]["node"] == "gpu-3"


def test_fleet_share_limit(api: FakeKubeAPI, kcfg: Path) -> None:
    for name in ("gpu-1", "gpu-2"):
        gpu_node(api, name, "UnschedulablePendingReboot")
    for n in range(8):
        gpu_node(api, f"ok-{n}", "Schedulable")
    world = World(api, kcfg, concurrent=5)
    world.fresh(percent=10)
    events = world.run()
    assert reasons(events) == ["RemediationStarted", "RemediationRebooting", "RemediationWaiting"]
    assert "1 of 10 nodes in remediation already (at most 10%)" in events[2]["msg"]


def test_a_label_set_by_hand_is_handed_back_to_the_agent_after_the_reboot(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    gpu_node(api, "gpu-1", "UnschedulablePendingReboot", by_agent=False)
    world = World(api, kcfg)
    world.run()
    world.run()
    reboot(api, "gpu-1")
    world.run()
    assert world.node()["metadata"]["labels"][HEALTH] == "Unschedulable"
    assert world.record().step is Step.RECOVERING


def test_needing_a_reboot_again_after_one_means_a_replacement(world: World, api) -> None:
    world.run()
    world.run()
    reboot(api, "gpu-1")
    world.run()
    set_health(api, "gpu-1", "Unschedulable")  # deep check after the reboot...
    world.run()
    set_health(api, "gpu-1", "UnschedulablePendingReboot")  # ...failed
    events = world.run()
    assert reasons(events) == ["RemediationAgain", "RemediationReplacing"]
    assert "replacement (attempt 2)" in events[0]["msg"]
    assert [a for a, _ in world.backend.calls] == [Action.REBOOT, Action.REPLACE]


def test_a_stale_label_after_the_reboot_waits_for_the_agent(world: World, api) -> None:
    world.run()
    world.run()
    reboot(api, "gpu-1")
    world.run()
    assert world.run() == [] and len(world.backend.calls) == 1  # the agent has not spoken
    events = world.run(world.cfg.settle)  # nor within `settle`: the fault stands
    assert reasons(events)[0] == "RemediationAgain"


def test_backend_failure_is_reported_and_tried_again_later(world: World, api) -> None:
    world.backend.result, world.backend.message = Result.FAILED, "InvalidInstanceStatus: busy"
    events = world.run()
    assert reasons(events) == ["RemediationStarted", "RemediationFailed"]
    assert "InvalidInstanceStatus: busy" in events[1]["msg"] and events[1]["level"] == "error"
    assert world.record().step is Step.FAILED
    world.run()
    assert len(world.backend.calls) == 1
    world.backend.result = Result.IN_PROGRESS
    events = world.run(world.cfg.retry_interval)
    assert reasons(events) == ["RemediationRebooting"] and "already in progress" in events[0]["msg"]
    assert len(world.backend.calls) == 2


def test_no_reboot_seen_in_time_fails(world: World, api: FakeKubeAPI) -> None:
    world.run()
    world.run()
    events = world.run(world.cfg.reboot_timeout + 1)
    assert reasons(events) == ["RemediationFailed"] and "no reboot seen" in events[0]["msg"]


def test_backend_none_reports_and_an_operator_finishes(api: FakeKubeAPI, kcfg: Path) -> None:
    gpu_node(api, "gpu-1", "UnschedulablePendingReplacement")
    world = World(api, kcfg)
    world.backend.result = Result.SKIPPED
    events = world.run()
    assert reasons(events) == ["RemediationStarted", "RemediationReported"]
    assert world.record().step is Step.REPORTED
    assert world.run() == []
    set_health(api, "gpu-1", "Schedulable", by_agent=False)
    assert reasons(world.run()) == ["RemediationDone"]


def test_a_node_cordoned_before_stays_cordoned(world: World, api: FakeKubeAPI) -> None:
    api.edit("gpu-1", lambda n: n["spec"].update(unschedulable=True))
    world.run()
    assert world.record().cordoned is False
    set_health(api, "gpu-1", "Schedulable")
    events = world.run()
    assert "left as it was cordoned" in events[0]["msg"]
    assert world.node()["spec"]["unschedulable"] is True


def test_a_node_without_an_instance_id_fails_with_a_reason(api, kcfg: Path) -> None:
    api.add_node("bare", {HEALTH: "UnschedulablePendingReboot"})
    world = World(api, kcfg)
    events = world.run()
    assert reasons(events) == ["RemediationStarted", "RemediationFailed"]
    assert "no EC2 instance id" in events[1]["msg"] and world.backend.calls == []


def test_a_conflicting_write_is_retried_on_the_next_pass(api, kcfg: Path) -> None:
    gpu_node(api, "gpu-1", "UnschedulablePendingReboot")
    world = World(api, kcfg, per_hour=1)
    api.fail("PATCH", "/api/v1/nodes/gpu-1", 409)
    assert world.run() == []
    # the retry takes the slot the conflict left, not a second one (per_hour 1 would refuse)
    assert reasons(world.run()) == ["RemediationStarted", "RemediationRebooting"]
    assert len(world.starts) == 1


def test_the_label_removed_mid_drain_ends_it_and_uncordons(world: World, api) -> None:
    api.add_pod("team", "db-0", "gpu-1", labels={"app": "db"})
    api.add_pdb("team", "db", "app=db", allowed=0)
    world.run()
    set_health(api, "gpu-1", None)
    events = world.run()
    assert reasons(events) == ["RemediationDone"]
    assert "unschedulable" not in world.node()["spec"] and world.backend.calls == []
