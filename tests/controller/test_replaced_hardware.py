"""The cluster's record of hardware replaced for a fault: written when the controller has a
node replaced, matched on every node's hardware annotation, through the fake API server with
the real kubernetes client."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from agent.controller.replaced import DATA_KEY, MAX_RECORDED, ReplacedHardware
from agent.kube.client import KubeClient
from agent.kube.plan import Owned
from agent.models import NodeKeys
from tests.aws.fake_sagemaker import FakeSageMaker
from tests.conftest import wait_for
from tests.controller.test_controller_process import IID, config, reasons, start
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.rbac import denied
from tests.test_deploy import controller_resources

KEYS = NodeKeys()
NS, CM = "node-health", "node-health-replaced-hardware"
UUID = "GPU-8e3c2a1f-7d4b-4c55-9a0e-3f1b2c6d7e8f"
SERIAL = "1652222014738"
HEALTHY = {"id": "GPU-0b1c", "kind": "gpu", "uuid": "GPU-0b1c", "faults": 0, "reboots": 0}


def hardware(serials: list[str], devices: list[dict]) -> str:
    """The agent's annotation, as agent.hardware.History.summary writes it."""
    return json.dumps({"serials": serials, "devices": devices, "remediations": 0})


FAULTY = {"id": UUID, "kind": "gpu", "uuid": UUID, "serial": SERIAL, "faults": 3, "reboots": 2}


def record(api: FakeKubeAPI) -> dict:
    cm = api.state.configmaps.get((NS, CM))
    return json.loads(cm["data"][DATA_KEY]) if cm else {}


def test_a_replaced_gpu_that_turns_up_on_another_node_is_flagged_at_once(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path
) -> None:
    old = "hyperpod-" + IID
    api.add_node(old, {KEYS.health_status_label: "UnschedulablePendingReplacement"})

    def by_agent(n: dict) -> None:
        n["status"]["nodeInfo"] = {"bootID": "boot-1"}
        n["metadata"]["annotations"].update(
            {
                KEYS.owned_annotation: Owned(health="UnschedulablePendingReplacement").dump(),
                KEYS.hardware_annotation: hardware(["GPU-0b1c", SERIAL, UUID], [FAULTY, HEALTHY]),
            }
        )

    api.edit(old, by_agent)
    api.add_node("gpu-clean", {}).update()
    api.edit(
        "gpu-clean",
        lambda n: n["metadata"]["annotations"].update(
            {KEYS.hardware_annotation: hardware(["GPU-77aa"], [])}
        ),
    )
    cfg = config(tmp_path, kcfg, "a")
    cfg.write_text(cfg.read_text() + "  scan: 0.2\n  deep_check_new_nodes: false\n")
    with FakeSageMaker() as sagemaker:
        sagemaker.add_cluster("train-1", [IID])
        proc = start(cfg, sagemaker.url, "ctl-a")
        try:
            wait_for(lambda: UUID in record(api), 20)
            # the replacement's GPU, repaired or not, in another instance
            api.add_node("gpu-new", {})
            api.edit(
                "gpu-new",
                lambda n: n["metadata"]["annotations"].update(
                    {KEYS.hardware_annotation: hardware([SERIAL, "GPU-new-uuid"], [])}
                ),
            )
            wait_for(lambda: "ReplacedHardwareReturned" in reasons(api), 20)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert sagemaker.calls[0].operation == "BatchReplaceClusterNodes"
    assert set(record(api)) == {UUID, SERIAL}  # the faulty GPU only, not its healthy peer
    assert record(api)[SERIAL]["node"] == old and record(api)[SERIAL]["instance_id"] == IID
    new = api.node("gpu-new")["metadata"]
    assert new["labels"][KEYS.replaced_hardware_label] == "true"
    assert new["annotations"][KEYS.deep_check_request_annotation] == "run"
    assert KEYS.health_status_label not in new["labels"]  # the agent's label stays the agent's
    clean = api.node("gpu-clean")["metadata"]
    assert KEYS.replaced_hardware_label not in clean["labels"]
    [event] = [e for e in api.events() if e["reason"] == "ReplacedHardwareReturned"]
    assert event["involvedObject"]["name"] == "gpu-new"
    assert f"{SERIAL} was on {old} ({IID})" in event["message"]
    said = [json.loads(line) for line in out.splitlines() if "ReplacedHardwareReturned" in line]
    assert [e["hardware"] for e in said] == [[SERIAL]]  # once, on stdout (and CloudWatch)
    assert denied(api.requests(), controller_resources(), NS) == []


def client(kcfg: Path) -> KubeClient:
    return KubeClient(str(kcfg))


def test_the_record_is_bounded_oldest_first(api: FakeKubeAPI, kcfg: Path) -> None:
    replaced = ReplacedHardware(client(kcfg), NS, CM, KEYS)
    replaced.record([f"s-{i}" for i in range(MAX_RECORDED)], "a", "uid-a", None, "x")
    replaced.record(["s-new", "s-0"], "b", "uid-b", None, "y")  # s-0 again: now among the newest
    kept = record(api)
    assert len(kept) == MAX_RECORDED
    assert "s-1" not in kept and "s-new" in kept and kept["s-0"]["node"] == "b"


def test_an_unreadable_record_is_written_afresh(api: FakeKubeAPI, kcfg: Path) -> None:
    replaced = ReplacedHardware(client(kcfg), NS, CM, KEYS)
    replaced.record(["s-1"], "a", "uid-a", None, "x")
    api.state.configmaps[(NS, CM)]["data"][DATA_KEY] = "{not json"
    assert replaced.scan([]) == []
    replaced.record(["s-2"], "b", "uid-b", None, "y")
    assert set(record(api)) == {"s-2"}


def test_a_conflict_on_the_record_does_not_stop_the_replacement(
    api: FakeKubeAPI, kcfg: Path, tmp_path: Path
) -> None:
    """The record is best effort: a failed write is logged, the replacement goes on."""
    node = "hyperpod-" + IID
    api.add_node(node, {KEYS.health_status_label: "UnschedulablePendingReplacement"})
    api.edit(
        node,
        lambda n: n["metadata"]["annotations"].update(
            {KEYS.hardware_annotation: hardware([UUID], [FAULTY])}
        ),
    )
    api.fail("POST", r"/api/v1/namespaces/node-health/configmaps", 500, times=10_000)
    cfg = config(tmp_path, kcfg, "a")
    with FakeSageMaker() as sagemaker:
        sagemaker.add_cluster("train-1", [IID])
        proc = start(cfg, sagemaker.url, "ctl-a")
        try:
            wait_for(
                lambda: (
                    api.node(node)["metadata"]["labels"].get(KEYS.remediation_step_label)
                    == "Replacing"
                ),
                20,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert record(api) == {}
    assert "replaced_hardware_unrecorded" in err
