"""One switch, many nodes: network faults on several nodes under one network node suspect the
network node and hold those nodes' remediation, pass by pass against the fake API server."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from agent.controller.topology import suspects
from agent.events import rfc3339
from agent.models import NodeKeys, TopologySettings
from tests.aws.conftest import all_events, logs_client, moto_server
from tests.conftest import spooled, wait_for
from tests.controller.test_controller_process import start
from tests.controller.test_remediation import STEP, World, gpu_node, reasons, set_health
from tests.kube.fake_api import FakeKubeAPI
from tests.test_daemon import free_port, get

KEYS = NodeKeys()
LAYER3 = "topology.k8s.aws/network-node-layer-3"
NOW = 1_790_000_000.0


def faulty(api: FakeKubeAPI, name: str, switch: str, kind: str, at: float, health: str) -> None:
    """A node whose agent reported `kind` at `at` (its fault-details, fault-types label)."""
    gpu_node(api, name, health)

    def agent(n: dict) -> None:
        n["metadata"]["labels"].update({LAYER3: switch, KEYS.fault_types_label: kind})
        details = [{"timestamp": rfc3339(at), "type": kind, "reason": "r", "message": "m"}]
        n["metadata"]["annotations"][KEYS.fault_details_annotation] = json.dumps(details)

    api.edit(name, agent)


def test_three_nodes_with_efa_faults_under_one_switch_hold_their_remediation(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    for name in ("gpu-1", "gpu-2", "gpu-3"):
        faulty(api, name, "nn-3a", "EfaPort", NOW, "UnschedulablePendingReplacement")
    faulty(api, "gpu-9", "nn-3b", "EfaPort", NOW, "UnschedulablePendingReplacement")
    world = World(api, kcfg, concurrent=5)
    world.now = NOW
    events = world.run()
    by_reason = {e["reason"]: e for e in events}
    suspected = by_reason["NetworkDomainSuspected"]
    assert suspected["network_node"] == f"{LAYER3}=nn-3a"
    assert suspected["nodes"] == ["gpu-1", "gpu-2", "gpu-3"]
    held = [e["node"] for e in events if e["reason"] == "RemediationHeld"]
    assert held == ["gpu-1", "gpu-2", "gpu-3"]
    assert (
        "network node topology.k8s.aws/network-node-layer-3=nn-3a suspected"
        in (next(e for e in events if e["reason"] == "RemediationHeld")["msg"])
    )
    assert len(world.backend.calls) == 1  # gpu-9's replacement only
    assert STEP not in world.node("gpu-1")["metadata"]["labels"]  # not cordoned, not drained
    assert world.node("gpu-9")["metadata"]["labels"][STEP] == "Replacing"  # alone on its switch
    assert world.run() == []  # said once
    # The switch is fixed: two nodes' agents clear; the third is a node fault after all.
    set_health(api, "gpu-1", "Schedulable")
    set_health(api, "gpu-2", "Schedulable")
    for name in ("gpu-1", "gpu-2"):
        api.edit(name, lambda n: n["metadata"]["labels"].pop(KEYS.fault_types_label))
    events = world.run()
    assert reasons(events)[:2] == ["NetworkDomainCleared", "RemediationStarted"]
    assert events[1]["node"] == "gpu-3"


def test_old_faults_other_types_and_too_few_nodes_suspect_nothing(api: FakeKubeAPI) -> None:
    cfg = TopologySettings()

    def node(name: str, switch: str, kind: str, at: float) -> dict:
        details = [{"timestamp": rfc3339(at), "type": kind}]
        return {
            "metadata": {
                "name": name,
                "labels": {LAYER3: switch},
                "annotations": {KEYS.fault_details_annotation: json.dumps(details)},
            }
        }

    nodes = [
        node("a", "s1", "EfaPort", NOW),
        node("b", "s1", "EfaPort", NOW - 2 * 3600),  # before the window
        node("c", "s1", "NvidiaXid", NOW),  # not a network fault
        node("d", "s1", "InstanceConnectivity", NOW),
        node("e", "s2", "EfaPort", NOW),
    ]
    assert suspects(nodes, KEYS, cfg, NOW) == []
    nodes.append(node("f", "s1", "EfaErrors", NOW))
    [s] = suspects(nodes, KEYS, cfg, NOW)
    assert (s.value, s.nodes, s.faults) == (
        "s1",
        ("a", "d", "f"),
        ("EfaErrors", "EfaPort", "InstanceConnectivity"),
    )
    assert suspects(nodes, KEYS, TopologySettings(labels=[]), NOW) == []
    assert suspects(nodes, KEYS, TopologySettings(min_nodes=4), NOW) == []


def test_a_node_without_topology_labels_is_remediated_as_before(api: FakeKubeAPI, kcfg) -> None:
    for name in ("gpu-1", "gpu-2", "gpu-3"):
        gpu_node(api, name, "UnschedulablePendingReboot")
        api.edit(
            name, lambda n: n["metadata"]["labels"].update({KEYS.fault_types_label: "EfaPort"})
        )
    world = World(api, kcfg, concurrent=5)
    assert reasons(world.run()).count("RemediationStarted") == 3


def test_the_suspect_reaches_cloudwatch_in_hyperpods_shape_and_the_metric(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path
) -> None:
    """The controller as a process, CloudWatch Logs from moto: the suspicion is one event in
    the cluster's log group, in the controller's stream, shaped as HyperPod's log lines (level,
    ts, msg first), the same as spooled; the gauge counts the network node; each held node has
    its Kubernetes Event."""
    for name in ("gpu-1", "gpu-2", "gpu-3"):
        faulty(api, name, "nn-3a", "EfaPort", time.time(), "UnschedulablePendingReplacement")
    group, stream = "/aws/sagemaker/Clusters/train-1/abc123", "NodeHealthController/train-1"
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""cluster_name: train-1
cluster_id: abc123
state_dir: {tmp_path / "state"}
http_listen: "127.0.0.1:{port}"
cloudwatch: {{flush_interval: 0.2s}}
kubernetes: {{kubeconfig: '{kcfg}'}}
controller: {{interval: 0.2, retry_period: 0.2, deep_check_new_nodes: false}}
"""
    )

    def shipped() -> list[dict]:
        try:
            return [json.loads(e["message"]) for e in all_events(url, group, stream)]
        except logs_client(url).exceptions.ResourceNotFoundException:
            return []  # the group or the stream not made yet

    with moto_server() as url:
        proc = start(cfg, url, "ctl-a")
        try:
            wait_for(lambda: any(e.get("reason") == "NetworkDomainSuspected" for e in shipped()))
            wait_for(
                lambda: (
                    "node_health_suspect_network_nodes 1.0"
                    in get(f"http://127.0.0.1:{port}/metrics")[1]
                )
            )
            raw = [e["message"] for e in all_events(url, group, stream)]
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    [line] = [m for m in raw if '"NetworkDomainSuspected"' in m]
    event = json.loads(line)
    assert list(event)[:3] == ["level", "ts", "msg"]  # HyperPod's log line: these first
    assert event["level"] == "error" and event["ts"].endswith("Z")
    assert event["msg"].startswith(f"network node {LAYER3}=nn-3a suspected: 3 nodes")
    assert (event["network_node"], event["nodes"], event["faults"]) == (
        f"{LAYER3}=nn-3a",
        ["gpu-1", "gpu-2", "gpu-3"],
        ["EfaPort"],
    )
    controller_state = tmp_path / "state" / "controller"
    assert [e for e in spooled(controller_state) if e.get("reason") == event["reason"]] == [event]
    assert [json.loads(x) for x in out.splitlines() if '"NetworkDomainSuspected"' in x] == [event]
    held = sorted(
        e["involvedObject"]["name"] for e in api.events() if e["reason"] == "RemediationHeld"
    )
    assert held == ["gpu-1", "gpu-2", "gpu-3"]
