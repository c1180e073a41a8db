"""The daemon (`node-health run`, a real process) against the fake API server: a fault takes its
Node out with labels, taint, condition and a Node event; a deep check asked for with the
annotation runs and labels the node; a kubeconfig that cannot be loaded is a clear error."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import spooled, wait_for, whole_table
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.rbac import denied
from tests.test_cli import node_health
from tests.test_daemon import faulty, start, stop, with_tools
from tests.test_deploy import docs

HEALTH = "sagemaker.amazonaws.com/node-health-status"
DEEP = "sagemaker.amazonaws.com/deep-health-check-status"


def in_cluster(config: str, kcfg: Path, more: str = "") -> str:
    """`config` (a file) with the kubernetes section added (and `more` of its settings)."""
    path = Path(config)
    path.write_text(
        path.read_text() + f"kubernetes: {{enabled: true, kubeconfig: '{kcfg}'{more}}}\n"
    )
    return str(path)


def test_a_fault_takes_the_node_out_through_the_api(cli_env, tmp_path, api: FakeKubeAPI, kcfg):
    proc = start(cli_env, "--config", in_cluster(faulty(tmp_path), kcfg))
    try:
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(HEALTH) is not None)
        wait_for(lambda: any(e["reason"] == "XidHardwareFailure" for e in api.events()))
    finally:
        stop(proc)
    node = api.node("node-a")
    assert node["metadata"]["labels"][HEALTH] == "UnschedulablePendingReboot"
    assert node["metadata"]["labels"]["sagemaker.amazonaws.com/fault-types"] == (
        "NvidiaGPUUnhealthy"
    )
    assert node["spec"]["taints"] == [
        {"key": HEALTH, "value": "UnschedulablePendingReboot", "effect": "NoSchedule"}
    ]
    gpu = next(c for c in node["status"]["conditions"] if c["type"] == "NvidiaGPUUnhealthy")
    assert (gpu["status"], gpu["reason"]) == ("True", "XidHardwareFailure")
    event = next(e for e in api.events() if e["reason"] == "XidHardwareFailure")
    assert event["type"] == "Warning"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": "node-a",
        "uid": "uid-node-a",
    }
    assert event["metadata"]["namespace"] == "default"
    assert not (tmp_path / "state" / "node-state.json").exists()  # no local stand-in
    assert any("verdict" in e for e in spooled(tmp_path / "state"))
    assert denied(api.requests(), docs("rbac.yaml"), "node-health") == []  # deploy/ allows it


def test_a_deep_check_asked_for_by_annotation_runs(cli_env, tmp_path, api: FakeKubeAPI, kcfg):
    env = with_tools(cli_env, tmp_path) | {
        "FAKE_DCGMI_OUTPUT": str(whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt")),
    }
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\ndeep_check: {level: 1}\n"
    )
    proc = start(env, "--config", in_cluster(str(cfg), kcfg))
    try:
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(HEALTH) == "Schedulable")
        api.edit(
            "node-a",
            lambda n: n["metadata"]["annotations"].update(
                {"node-health-agent.io/deep-check": "run"}
            ),
        )
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(DEEP) == "Passed", 30)
    finally:
        stop(proc)
    node = api.node("node-a")
    assert "node-health-agent.io/deep-check" not in node["metadata"]["annotations"]
    assert node["metadata"]["labels"][HEALTH] == "Schedulable"
    # While it ran, the node was out, as HyperPod's is during a deep check.
    patched = [
        r.body["metadata"]["labels"].get(DEEP)
        for r in api.requests("PATCH", "/api/v1/nodes/node-a")
        if "labels" in r.body.get("metadata", {})
    ]
    assert "InProgress" in patched
    assert "deep_check_requested" in proc.stderr.read()


def test_an_unloadable_kubeconfig_is_a_configuration_error(cli_env, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kubernetes: {enabled: true, kubeconfig: /nonexistent/kubeconfig}\n")
    out = node_health(cli_env, "run", "--config", str(cfg))
    assert out.returncode == 2
    assert "configuration error: kubernetes: cannot load /nonexistent/kubeconfig" in out.stderr


def test_reboot_recovery_brings_the_node_back(cli_env, tmp_path, host_root, api, kcfg):
    """UnschedulablePendingReboot through the API; the node reboots (a new boot id) and the
    fault is gone: the agent itself takes its own Pending label back to Schedulable."""
    boot_id = host_root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text("boot-1\n")
    proc = start(cli_env, "--config", in_cluster(faulty(tmp_path), kcfg))
    try:
        wait_for(
            lambda: (
                api.node("node-a")["metadata"]["labels"].get(HEALTH) == "UnschedulablePendingReboot"
            )
        )
    finally:
        stop(proc)
    boot_id.write_text("boot-2\n")
    cfg = tmp_path / "healed.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n  fixed: {enabled: false}\n"
    )
    proc = start(cli_env, "--config", in_cluster(str(cfg), kcfg))
    try:
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(HEALTH) == "Schedulable")
    finally:
        stop(proc)
    node = api.node("node-a")
    assert node["spec"]["taints"] == []
    assert "sagemaker.amazonaws.com/fault-types" not in node["metadata"]["labels"]


def test_the_breaker_keeps_the_node_in_and_says_so_everywhere(cli_env, tmp_path, api, kcfg):
    api.add_node("node-b", {HEALTH: "UnschedulablePendingReplacement"})
    cfg = in_cluster(faulty(tmp_path), kcfg, ", max_unschedulable: 1")
    state = tmp_path / "state"
    proc = start(cli_env, "--config", cfg)
    try:
        wait_for(lambda: any(e["reason"] == "CircuitBreakerOpen" for e in api.events()))
        wait_for(lambda: any("circuit breaker" in e["msg"] for e in spooled(state)))
    finally:
        stop(proc)
    node = api.node("node-a")
    assert node["metadata"]["labels"].get(HEALTH) != "UnschedulablePendingReboot"
    assert not node["spec"].get("taints")
    gpu = next(c for c in node["status"]["conditions"] if c["type"] == "NvidiaGPUUnhealthy")
    assert gpu["status"] == "True"  # the finding is still reported
    refusal = next(e for e in spooled(state) if "circuit breaker" in e["msg"])
    assert refusal["msg"] == (
        "Node not taken out: circuit breaker: 1 nodes are unschedulable already (at most 1)"
    )
    assert refusal["level"] == "warn"


def metric(body: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))


def test_conditions_refused_for_good_still_take_the_node_out(cli_env, tmp_path, api, kcfg):
    """nodes/status answers 403 to every write: the label and taint land, the failures are
    counted by kind, and nothing else stops."""
    from tests.test_daemon import _answers, free_port, get

    api.fail("PATCH", r"/api/v1/nodes/node-a/status", 403, times=10_000)
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", in_cluster(faulty(tmp_path, action="replace"), kcfg))
    try:
        wait_for(lambda: bool(api.node("node-a")["spec"].get("taints")))
        wait_for(lambda: _answers(port))
        wait_for(
            lambda: (
                metric(
                    get(f"http://127.0.0.1:{port}/metrics")[1],
                    'node_health_kube_write_errors_total{kind="condition"}',
                )
                >= 1
            )
        )
    finally:
        assert stop(proc) < 10
    assert proc.returncode == 0
    node = api.node("node-a")
    assert node["metadata"]["labels"][HEALTH] == "UnschedulablePendingReplacement"
    assert node["spec"]["taints"][0]["value"] == "UnschedulablePendingReplacement"


def test_readyz_says_when_the_node_decision_keeps_failing(cli_env, tmp_path, api, kcfg):
    from tests.test_daemon import _answers, free_port, get

    api.fail("PATCH", r"/api/v1/nodes/node-a", 422, times=10_000)
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", in_cluster(faulty(tmp_path), kcfg, ", write_alarm: 0.5s"))
    try:
        wait_for(lambda: _answers(port))
        wait_for(lambda: "node writer failing" in get(f"http://127.0.0.1:{port}/readyz")[1])
        # The alarm may go off on the start's write (a label, no taint yet), before the fault
        # is in: wait for the write that takes the node out to have failed too.
        wait_for(
            lambda: (
                metric(
                    get(f"http://127.0.0.1:{port}/metrics")[1],
                    'node_health_kube_write_errors_total{kind="taint"}',
                )
                >= 1
            )
        )
        code, body = get(f"http://127.0.0.1:{port}/readyz")
        metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")  # alive: no restart
    finally:
        stop(proc)
    assert code == 503 and "422" in body
    assert metric(metrics, 'node_health_kube_write_errors_total{kind="label"}') >= 1
    assert metric(metrics, 'node_health_kube_write_errors_total{kind="taint"}') >= 1
