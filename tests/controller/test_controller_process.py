"""`node-health controller` as a real process against the fake API server, with SageMaker's
batch calls served by a fake built from their documented shapes and EC2 by moto in server mode:
leader election between two replicas, the drain, the reboot asked for once, a replacement by
termination, events on the node, on stdout and in the spool, a clean stop that hands the Lease
over, and the connectivity check on the nodes asked for. Every request each made is one that
deploy/controller's RBAC allows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.kube.plan import Owned
from agent.models import NodeKeys
from tests.aws.conftest import aws_env
from tests.aws.fake_sagemaker import FakeSageMaker
from tests.conftest import REPO, wait_for
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.rbac import denied
from tests.test_deploy import controller_resources

KEYS = NodeKeys()
HEALTH, STEP = KEYS.health_status_label, KEYS.remediation_step_label
ASK = KEYS.connectivity_request_annotation
IID = "i-0123456789abcdef0"
LEASE = ("node-health", "node-health-controller")
KEYS_FOR_MOTO = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def sagemaker():
    with FakeSageMaker() as fake:
        fake.add_cluster("train-1", [IID])
        yield fake


def config(tmp_path: Path, kcfg: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""cluster_name: train-1
state_dir: {tmp_path / name}
http_listen: ""
kubernetes: {{kubeconfig: '{kcfg}'}}
controller:
  backend: sagemaker
  interval: 0.2
  retry_period: 0.2
  lease_duration: 3
  renew_deadline: 2
"""
    )
    return path


def start(cfg: Path, url: str, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_HEALTH_", "KUBE"))}
    env.update(aws_env(url), PYTHONPATH=str(REPO), POD_NAME=name)
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "controller", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def holder(api: FakeKubeAPI) -> str:
    lease = api.lease(*LEASE)
    return (lease or {}).get("spec", {}).get("holderIdentity") or ""


def test_two_replicas_one_leads_remediates_and_hands_over(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path, sagemaker: FakeSageMaker
) -> None:
    api.add_node("hyperpod-" + IID, {HEALTH: "UnschedulablePendingReboot"})
    node = "hyperpod-" + IID

    def by_agent(n: dict) -> None:
        n["status"]["nodeInfo"] = {"bootID": "boot-1"}
        n["metadata"]["annotations"][KEYS.owned_annotation] = Owned(
            health="UnschedulablePendingReboot"
        ).dump()

    api.edit(node, by_agent)
    api.add_pod("team", "trainer-0", node, owner="StatefulSet")

    a = start(config(tmp_path, kcfg, "a"), sagemaker.url, "ctl-a")
    try:
        wait_for(lambda: holder(api).startswith("ctl-a_"), timeout=20)
        b = start(config(tmp_path, kcfg, "b"), sagemaker.url, "ctl-b")
        try:
            wait_for(lambda: api.node(node)["metadata"]["labels"].get(STEP) == "Rebooting", 20)
            assert [c.body for c in sagemaker.calls] == [
                {"ClusterName": "train-1", "NodeIds": [IID]}
            ]
            assert sagemaker.calls[0].operation == "BatchRebootClusterNodes"
            assert api.state.evictions == [("team", "trainer-0", None)]
            assert api.node(node)["spec"]["unschedulable"] is True
            wait_for(lambda: {"RemediationStarted", "RemediationRebooting"} <= reasons(api))
            event = next(e for e in api.events() if e["reason"] == "RemediationRebooting")
            assert event["involvedObject"]["name"] == node
            assert event["reportingComponent"] == "node-health-controller"
            assert event["reportingInstance"] == "ctl-a"
            assert event["type"] == "Warning"

            a.send_signal(signal.SIGTERM)
            assert a.wait(timeout=10) == 0
            # a gave the Lease up: b takes it without waiting for it to expire
            wait_for(lambda: holder(api).startswith("ctl-b_"), timeout=3)

            api.edit(node, lambda n: n["status"].update(nodeInfo={"bootID": "boot-2"}))
            wait_for(lambda: api.node(node)["metadata"]["labels"].get(STEP) == "Recovering", 10)

            def back(n: dict) -> None:
                n["metadata"]["labels"][HEALTH] = "Schedulable"
                n["metadata"]["annotations"][KEYS.owned_annotation] = Owned(
                    health="Schedulable"
                ).dump()

            api.edit(node, back)
            wait_for(lambda: STEP not in api.node(node)["metadata"]["labels"], 10)
            assert "unschedulable" not in api.node(node)["spec"]
            assert len(sagemaker.calls) == 1  # b did not ask again
        finally:
            b.send_signal(signal.SIGTERM)
            b_out, b_err = b.communicate(timeout=10)
    finally:
        if a.poll() is None:
            a.kill()
        a_out, _ = a.communicate(timeout=10)
    assert b.returncode == 0, b_err
    assert holder(api) == ""
    lines = [json.loads(line) for line in (a_out + b_out).splitlines()]
    assert all(list(e)[:3] == ["level", "ts", "msg"] for e in lines)
    steps = [e["reason"] for e in lines if "reason" in e]
    assert steps == [
        "RemediationStarted",
        "RemediationRebooting",
        "RemediationRebooted",
        "RemediationDone",
    ]
    spooled = [
        json.loads(line)
        for seg in sorted((tmp_path / "a" / "controller" / "spool").glob("*.jsonl"))
        for line in seg.read_text().splitlines()
    ]
    assert [e.get("reason") for e in spooled if e.get("reason")] == steps[:2]
    assert denied(api.requests(), controller_resources(), "node-health") == []


def reasons(api: FakeKubeAPI) -> set[str]:
    return {e["reason"] for e in api.events()}


def test_sagemaker_backend_without_a_cluster_name_is_a_configuration_error(
    kcfg: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"kubernetes: {{kubeconfig: '{kcfg}'}}\ncontroller: {{backend: sagemaker}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_HEALTH_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-m", "agent", "controller", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "controller.backend sagemaker needs cluster_name" in out.stderr


def test_the_leader_tests_the_nodes_asked_for_and_says_so_on_them(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path
) -> None:
    from tests.controller.test_connectivity import Operator, fleet

    names = fleet(api, 2)
    for name in names:
        api.edit(name, lambda n: n["metadata"]["annotations"].update({ASK: "now"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""state_dir: {tmp_path / "state"}
http_listen: ""
kubernetes: {{kubeconfig: '{kcfg}'}}
controller:
  retry_period: 0.2
  scan: 0.2
  connectivity: {{poll: 0.05, max_share: 1}}
"""
    )
    with Operator(api, bad=set()) as op:
        proc = start(cfg, "http://127.0.0.1:9", "ctl-a")
        try:
            wait_for(lambda: "InstanceConnectivityPassed" in reasons(api), 20)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert op.seen == [("gpu-0", "gpu-1")]  # once: the request was answered
    for name in names:
        meta = api.node(name)["metadata"]
        assert meta["labels"][KEYS.deep_health_check_label] == "Passed"
        assert ASK not in meta["annotations"]
    event = next(e for e in api.events() if e["reason"] == "InstanceConnectivityPassed")
    assert event["reportingComponent"] == "node-health-controller"
    verdicts = [json.loads(line) for line in out.splitlines() if '"verdict"' in line]
    assert {e["node"]: e["verdict"] for e in verdicts} == {"gpu-0": "Passed", "gpu-1": "Passed"}
    assert denied(api.requests(), controller_resources(), "node-health") == []


def test_the_ec2_backend_terminates_the_instance_for_a_replacement(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path
) -> None:
    import boto3

    from tests.aws.conftest import REGION, moto_server

    with moto_server() as url:
        ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION, **KEYS_FOR_MOTO)
        image = ec2.describe_images()["Images"][0]["ImageId"]
        iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        api.add_node(
            "gpu-1",
            {HEALTH: "UnschedulablePendingReplacement"},
            providerID=f"aws:///{REGION}a/{iid}",
        )
        api.add_pod("team", "trainer-0", "gpu-1", owner="StatefulSet")
        cfg = config(tmp_path, kcfg, "a")
        cfg.write_text(cfg.read_text().replace("backend: sagemaker", "backend: ec2"))
        proc = start(cfg, url, "ctl-a")
        try:
            wait_for(lambda: api.node("gpu-1")["metadata"]["labels"].get(STEP) == "Replacing", 20)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        [found] = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"]
        assert found["State"]["Name"] in ("shutting-down", "terminated")
    assert proc.returncode == 0, err
    assert api.state.evictions == [("team", "trainer-0", None)]
    assert {"RemediationStarted", "RemediationReplacing"} <= reasons(api)
    assert denied(api.requests(), controller_resources(), "node-health") == []


@pytest.mark.parametrize("fault", ["forbidden", "unreachable"])
def test_a_replica_that_cannot_reach_its_lease_says_why(tmp_path, api, kcfg, sagemaker, fault):
    """A 403 on the Lease, or no API server at all: an error in the log and on /readyz, not
    a quiet standby."""
    from tests.kube.conftest import kubeconfig
    from tests.test_daemon import _answers, free_port, get

    if fault == "forbidden":
        api.fail("GET", r"/apis/coordination\.k8s\.io/.*", 403, times=10_000)
    else:
        kcfg = kubeconfig(tmp_path / "dead", "http://127.0.0.1:9")  # nothing listens there
    port = free_port()
    cfg = config(tmp_path, kcfg, "a")
    cfg.write_text(cfg.read_text().replace('http_listen: ""', f'http_listen: "127.0.0.1:{port}"'))
    proc = start(cfg, sagemaker.url, "ctl-a")
    try:
        wait_for(lambda: _answers(port) and get(f"http://127.0.0.1:{port}/readyz")[0] == 503, 20)
        body = get(f"http://127.0.0.1:{port}/readyz")[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert "cannot take part in leader election" in body
    assert ("403" if fault == "forbidden" else "API server unreachable") in body
    errors = [line for line in proc.stderr.read().splitlines() if "lease_unavailable" in line]
    assert len(errors) == 1 and "error" in errors[0]
