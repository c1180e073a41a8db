"""`node-health status` against the fake API server: every node with its states and last
reason, counts per state, as a table or JSON."""

from __future__ import annotations

import json

from tests.test_cli import node_health

HEALTH = "sagemaker.amazonaws.com/node-health-status"
DEEP = "sagemaker.amazonaws.com/deep-health-check-status"
TYPE = "node.kubernetes.io/instance-type"


def seed(api) -> None:
    api.edit(
        "node-a",
        lambda n: n["metadata"]["labels"].update({HEALTH: "Schedulable", TYPE: "p5.48xlarge"}),
    )
    api.add_node(
        "node-b",
        {
            HEALTH: "UnschedulablePendingReboot",
            DEEP: "Failed",
            TYPE: "p5.48xlarge",
            "node-health-agent.io/remediation-step": "Draining",
        },
    )
    details = [
        {
            "timestamp": "2026-11-23T09:00:00Z",
            "type": "KernelDeadlock",
            "reason": "TaskHung",
            "message": "old",
        },
        {
            "timestamp": "2026-11-23T10:00:00Z",
            "type": "NvidiaGPUUnhealthy",
            "reason": "XidHardwareFailure",
            "message": "Xid 79",
        },
    ]
    api.edit(
        "node-b",
        lambda n: n["metadata"]["annotations"].update(
            {
                "sagemaker.amazonaws.com/fault-details": json.dumps(details),
                "node-health-agent.io/connectivity": json.dumps({"verdict": "Failed"}),
            }
        ),
    )
    api.add_node("node-c")  # never seen by the agent


def test_status_table_and_counts(cli_env, api, kcfg):
    seed(api)
    out = node_health(cli_env, "status", "--kubeconfig", str(kcfg))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "NODE", "HEALTH", "DEEP-CHECK", "REMEDIATION", "CONNECTIVITY", "INSTANCE-TYPE", "REASON"
    ]  # fmt: skip
    assert lines[2].split()[:6] == [
        "node-b", "UnschedulablePendingReboot", "Failed", "Draining", "Failed", "p5.48xlarge"
    ]  # fmt: skip
    assert lines[2].endswith("XidHardwareFailure: Xid 79")
    assert lines[3].split() == ["node-c", "-", "-", "-", "-", "-", "-"]
    assert lines[-1] == "3 nodes (-: 1, Schedulable: 1, UnschedulablePendingReboot: 1)"


def test_status_json_with_a_selector(cli_env, api, kcfg):
    seed(api)
    out = node_health(cli_env, "status", "--kubeconfig", str(kcfg), "--json", "--selector", HEALTH)
    doc = json.loads(out.stdout)
    assert [n["node"] for n in doc["nodes"]] == ["node-a", "node-b"]
    assert doc["counts"] == {"Schedulable": 1, "UnschedulablePendingReboot": 1}


def test_status_without_a_cluster_says_so(cli_env, tmp_path):
    out = node_health(cli_env | {"KUBECONFIG": str(tmp_path / "none")}, "status")
    assert out.returncode == 2
    assert "cannot reach the cluster" in out.stderr


def test_status_shows_each_node_against_its_peers_and_the_network_node_suspected(
    cli_env, api, kcfg
):
    import time

    from agent.events import rfc3339

    layer3 = "topology.k8s.aws/network-node-layer-3"
    now = rfc3339(time.time())
    for i, busbw in enumerate([480.0, 482.0, 479.0, 481.0, 400.0]):
        name = f"p5-{i}"
        api.add_node(name, {TYPE: "p5.48xlarge", layer3: "nn-1"})
        figures = json.dumps({"run": "r", "figures": {"nccl_busbw_1073741824": busbw}})
        faults = json.dumps([{"timestamp": now, "type": "EfaPort", "reason": "r", "message": "m"}])
        ann = {"node-health-agent.io/performance": figures}
        if i < 3:
            ann["sagemaker.amazonaws.com/fault-details"] = faults
        api.edit(name, lambda n, a=ann: n["metadata"]["annotations"].update(a))
    out = node_health(cli_env, "status", "--kubeconfig", str(kcfg))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    table = text[text.index("INSTANCE-TYPE  NODE") :].splitlines()
    assert table[0].split() == [
        "INSTANCE-TYPE", "NODE", "WORST-FIGURE", "VALUE", "MEDIAN", "WORSE", "DEGRADED"
    ]  # fmt: skip
    assert table[5].split() == [
        "p5.48xlarge", "p5-4", "nccl_busbw_1073741824", "400", "480", "+16.7%", "yes"
    ]  # fmt: skip
    assert table[1].split()[-1] == "-"
    assert (
        "network node topology.k8s.aws/network-node-layer-3=nn-1 suspected: 3 nodes under it "
        "report network faults (EfaPort): p5-0, p5-1, p5-2; remediation held"
    ) in text
    doc = json.loads(node_health(cli_env, "status", "--kubeconfig", str(kcfg), "--json").stdout)
    assert [r["node"] for r in doc["performance"] if r["degraded"] == "yes"] == ["p5-4"]
    assert len(doc["suspected"]) == 1


def test_status_wide_shows_the_whole_last_reason_and_the_table_its_start(cli_env, api, kcfg):
    seed(api)
    long = "Xid 79 " + "x" * 200
    details = [
        {"timestamp": "2026-11-23T11:00:00Z", "reason": "XidHardwareFailure", "message": long}
    ]
    api.edit(
        "node-b",
        lambda n: n["metadata"]["annotations"].update(
            {"sagemaker.amazonaws.com/fault-details": json.dumps(details)}
        ),
    )
    whole = f"XidHardwareFailure: {long}"
    table = node_health(cli_env, "status", "--kubeconfig", str(kcfg)).stdout.splitlines()
    assert table[2].endswith(whole[:120]) and whole not in table[2]
    wide = node_health(cli_env, "status", "--kubeconfig", str(kcfg), "-o", "wide").stdout
    assert whole in wide.splitlines()[2]  # piped: one line per node, never wrapped
    doc = json.loads(node_health(cli_env, "status", "--kubeconfig", str(kcfg), "-o", "json").stdout)
    assert doc["nodes"][1]["reason"] == whole
