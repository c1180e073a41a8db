"""The controller's look at every node: a new node's agent asked for its deep check; its own
connectivity runs: which nodes it picks (asked for by annotation, or new to the cluster), the
partner known good for a node alone of its type, the request answered and removed, and a run
interrupted when the controller stops or no longer leads. Against the fake API server, with
the MPI Operator stand-in of test_connectivity."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from agent.controller.connectivity import Interrupted
from agent.controller.requests import Requests, known_good, plan, wants_deep_check
from agent.controller.view import uses_accelerators
from agent.kube.client import KubeClient
from agent.models import ConnectivitySettings, ControllerSettings, NodeKeys
from agent.policy import Verdict
from tests.controller.test_connectivity import Operator, fleet
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.fake_workloads import pod

KEYS = NodeKeys()
ASK, RESULT = KEYS.connectivity_request_annotation, KEYS.connectivity_result_annotation
HEALTH, DHC = KEYS.health_status_label, KEYS.deep_health_check_label
NOW = time.time()


def node(name: str, itype: str = "p5.48xlarge", age: float = 10 * 86400, **labels: str) -> dict:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - age))
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "labels": {"node.kubernetes.io/instance-type": itype, HEALTH: "Schedulable", **labels},
            "annotations": {},
        },
        "spec": {},
    }


def asked(n: dict) -> dict:
    n["metadata"]["annotations"][ASK] = "now"
    return n


def passed(n: dict) -> dict:
    n["metadata"]["annotations"][RESULT] = json.dumps({"verdict": "Passed"})
    return n


def test_plan_takes_what_was_asked_first_and_new_nodes_only_when_set() -> None:
    nodes = [
        asked(node("p4-a", "p4d.24xlarge")),
        node("young", age=60),
        node("young-cpu", "m5.xlarge", age=60),  # no GPUs: never new
        node("young-checking", age=60, **{DHC: "InProgress"}),  # its own deep check runs
        node("young-sick", age=60, **{HEALTH: "Unschedulable"}),
        passed(node("young-tested", age=60)),
        node("old"),
        asked(node("draining", **{KEYS.remediation_step_label: "Draining"})),
        asked(node("pending", **{HEALTH: "UnschedulablePendingReboot"})),
    ]
    off = plan(nodes, KEYS, ControllerSettings(), NOW)
    assert [(g.itype, g.requested, g.new) for g in off] == [("p4d.24xlarge", ["p4-a"], [])]
    on = plan(nodes, KEYS, settings(new_nodes=True), NOW)
    assert [(g.itype, g.requested, g.new) for g in on] == [
        ("p4d.24xlarge", ["p4-a"], []),
        ("p5.48xlarge", [], ["young"]),
    ]


def test_known_good_partners_passed_last_time_and_take_work() -> None:
    nodes = [
        passed(node("good")),
        passed(node("other-type", "p4d.24xlarge")),
        passed(node("cordoned")) | {"spec": {"unschedulable": True}},
        passed(node("sick", **{HEALTH: "Unschedulable"})),
        node("never-tested"),
        passed(node("asked")),
    ]
    assert known_good(nodes, KEYS, "p5.48xlarge", {"asked"}) == ["good"]


def test_accelerators_in_use_are_those_of_pods_not_finished() -> None:
    assert uses_accelerators([pod("t", "train", "n", gpus=8)])
    assert not uses_accelerators([pod("t", "done", "n", gpus=8, phase="Succeeded")])
    assert not uses_accelerators([pod("kube-system", "dcgm-exporter", "n", owner="DaemonSet")])
    init = pod("t", "init", "n")
    init["spec"]["initContainers"] = [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": 1}}}]
    assert uses_accelerators([init])


def settings(new_nodes: bool = False, **cfg: object) -> ControllerSettings:
    conn = ConnectivitySettings(poll=0.01, max_share=1.0, new_nodes=new_nodes)
    return ControllerSettings(connectivity=conn, **cfg)


def requests(kcfg: Path, events: list, stopped=lambda: False, **cfg: object) -> Requests:
    return Requests(KubeClient(str(kcfg)), settings(**cfg), KEYS, events.append, stopped)


def annotate(api: FakeKubeAPI, name: str, key: str, value: str) -> None:
    api.edit(name, lambda n: n["metadata"]["annotations"].update({key: value}))


def test_nodes_asked_for_are_tested_labelled_and_the_request_removed(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    names = fleet(api, 6)
    for name in names[:4]:
        annotate(api, name, ASK, "run")
    events: list[dict] = []
    with Operator(api, bad={"gpu-2"}) as op:
        requests(kcfg, events).scan()
    assert {n for pair in op.seen for n in pair} == set(names[:4])  # only those asked for
    bad = api.node("gpu-2")["metadata"]
    assert bad["labels"][HEALTH] == "UnschedulablePendingReplacement"
    assert bad["labels"][DHC] == "Failed"
    for name in names[:4]:
        assert ASK not in api.node(name)["metadata"]["annotations"]
    assert DHC not in api.node("gpu-5")["metadata"]["labels"]
    reasons = {e["node"]: e["reason"] for e in events if e.get("verdict")}
    assert reasons == {
        "gpu-0": "InstanceConnectivityPassed",
        "gpu-1": "InstanceConnectivityPassed",
        "gpu-2": "InstanceConnectivityFailed",
        "gpu-3": "InstanceConnectivityPassed",
    }


def test_a_node_alone_is_tested_against_a_free_node_known_good(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    fleet(api, 4)
    for name in ("gpu-0", "gpu-1", "gpu-2"):
        annotate(api, name, RESULT, json.dumps({"verdict": "Passed"}))
    api.add_pod("team", "trainer", "gpu-0", gpus=8)  # gpu-0 is busy
    api.add_pod("kube-system", "exporter", "gpu-1", owner="DaemonSet")  # no GPU: free
    annotate(api, "gpu-3", ASK, "run")
    with Operator(api, bad={"gpu-3"}) as op:
        requests(kcfg, []).scan()
    assert op.seen == [("gpu-3", "gpu-1")]
    assert api.node("gpu-3")["metadata"]["labels"][DHC] == "Failed"  # failed against good
    assert DHC not in api.node("gpu-1")["metadata"]["labels"]  # the partner is not relabelled


def test_with_no_free_partner_the_request_waits_and_says_so_once(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    fleet(api, 2)
    annotate(api, "gpu-0", RESULT, json.dumps({"verdict": "Passed"}))
    api.add_pod("team", "trainer", "gpu-0", gpus=8)
    annotate(api, "gpu-1", ASK, "run")
    events: list[dict] = []
    scanner = requests(kcfg, events)
    scanner.scan()
    scanner.scan()
    assert api.state.mpijobs == {} and not api.state.deleted_mpijobs
    assert ASK in api.node("gpu-1")["metadata"]["annotations"]  # still asked for
    [waiting] = events
    assert waiting["reason"] == "InstanceConnectivityWaiting" and waiting["node"] == "gpu-1"


def test_new_nodes_are_tested_when_free(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 4)
    young = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    for name in names[1:]:
        api.edit(name, lambda n: n["metadata"].update(creationTimestamp=young))
    api.add_pod("team", "trainer", "gpu-3", gpus=8)  # new, but already at work: later
    with Operator(api, bad=set()) as op:
        requests(kcfg, [], new_nodes=True).scan()
        assert op.seen == [("gpu-1", "gpu-2")]
        requests(kcfg, [], new_nodes=True).scan()  # tested: no longer new
        assert op.seen == [("gpu-1", "gpu-2")]
    assert api.node("gpu-1")["metadata"]["labels"][DHC] == "Passed"
    assert RESULT not in api.node("gpu-3")["metadata"]["annotations"]


def test_a_request_that_cannot_run_is_refused_once_and_removed(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    api.add_node("cpu-0", {"node.kubernetes.io/instance-type": "m5.xlarge", HEALTH: "Schedulable"})
    api.add_node("cpu-1", {"node.kubernetes.io/instance-type": "m5.xlarge", HEALTH: "Schedulable"})
    for name in ("cpu-0", "cpu-1"):
        annotate(api, name, ASK, "run")
    events: list[dict] = []
    requests(kcfg, events).scan()
    assert [(e["node"], e["reason"]) for e in events] == [
        ("cpu-0", "InstanceConnectivityRefused"),
        ("cpu-1", "InstanceConnectivityRefused"),
    ]
    assert "no GPU count known for m5.xlarge" in events[0]["msg"]
    assert ASK not in api.node("cpu-0")["metadata"]["annotations"]


def test_a_stop_deletes_the_mpijobs_and_labels_nothing(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 2)
    for name in names:
        annotate(api, name, ASK, "run")
    halt = threading.Event()
    scanner = requests(kcfg, [], stopped=halt.is_set)
    done: list[BaseException] = []

    def run() -> None:
        try:
            scanner.scan()
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()  # no operator: the MPIJob stays running
    deadline = time.monotonic() + 5
    while not api.state.mpijobs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.state.mpijobs
    halt.set()
    thread.join(5)
    assert isinstance(done[0], Interrupted)
    assert api.state.mpijobs == {}
    for name in names:
        meta = api.node(name)["metadata"]
        assert ASK in meta["annotations"] and DHC not in meta["labels"]
        assert meta["labels"][HEALTH] == str(Verdict.SCHEDULABLE)


def test_a_new_node_with_accelerators_is_asked_for_its_deep_check_once() -> None:
    young = 120.0
    assert wants_deep_check(node("new", age=young), KEYS, 3600, NOW)
    assert wants_deep_check(node("trn", "trn1.32xlarge", age=young), KEYS, 3600, NOW)
    not_wanted = [
        node("old"),
        node("cpu", "m5.xlarge", age=young),
        node("checked", age=young, **{DHC: "Passed"}),
        node("pending", age=young, **{HEALTH: "UnschedulablePendingReplacement"}),
    ]
    asked_already = node("asked", age=young)
    asked_already["metadata"]["annotations"][KEYS.deep_check_request_annotation] = "run"
    no_agent = node("no-agent", age=young)
    del no_agent["metadata"]["labels"][HEALTH]
    for n in [*not_wanted, asked_already, no_agent]:
        assert not wants_deep_check(n, KEYS, 3600, NOW), n["metadata"]["name"]


def test_the_scan_asks_the_agent_of_a_replacement_node_for_its_deep_check(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    fleet(api, 2)  # created weeks ago
    api.add_node(
        "hyperpod-i-0fedcba9876543210",
        {"node.kubernetes.io/instance-type": "p5.48xlarge", HEALTH: "Schedulable"},
    )
    young = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    api.edit(
        "hyperpod-i-0fedcba9876543210", lambda n: n["metadata"].update(creationTimestamp=young)
    )
    events: list[dict] = []
    scanner = requests(kcfg, events)
    scanner.scan()
    scanner.scan()  # asked already: not again
    # its agent took the request and its run could not judge (no result label): still once
    api.edit(
        "hyperpod-i-0fedcba9876543210",
        lambda n: n["metadata"]["annotations"].pop(KEYS.deep_check_request_annotation),
    )
    scanner.scan()
    [patch] = api.requests("PATCH", "/api/v1/nodes/hyperpod-i-0fedcba9876543210")  # once
    assert patch.body == {"metadata": {"annotations": {KEYS.deep_check_request_annotation: "run"}}}
    assert [(e["node"], e["reason"]) for e in events] == [
        ("hyperpod-i-0fedcba9876543210", "DeepCheckRequested")
    ]
    assert KEYS.deep_check_request_annotation not in api.node("gpu-0")["metadata"]["annotations"]
    api.add_node(
        "gpu-9", {"node.kubernetes.io/instance-type": "p5.48xlarge", HEALTH: "Schedulable"}
    )
    api.edit("gpu-9", lambda n: n["metadata"].update(creationTimestamp=young))
    requests(kcfg, events, deep_check_new_nodes=False).scan()  # switched off
    assert len(events) == 1
    assert KEYS.deep_check_request_annotation not in api.node("gpu-9")["metadata"]["annotations"]
