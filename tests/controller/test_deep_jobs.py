"""The deep check as a Job on the node (`deep_check.runner: job`): the Job's shape (valid
against Kubernetes' schemas, pinned to the node, every accelerator and EFA device asked for,
the agent's taint tolerated, the node's state directory mounted), the controller starting one
per node for an operator's annotation and for a new node, leaving nodes in remediation alone,
reporting how each ended, all within its RBAC; and end to end, a Job's run read back by the
node's agent into its deep-health-check label."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.controller.deepjob import APP, GROUP, NODE_ANNOTATION, PLURAL, VERSION, job, job_name
from agent.controller.requests import Requests
from agent.kube.client import KubeClient
from agent.models import ControllerSettings, DeepCheckSettings, NodeKeys
from tests.conftest import wait_for, whole_table
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.fake_workloads import finish_job
from tests.kube.rbac import denied
from tests.test_deploy import K8S_VERSION, controller_resources

KEYS = NodeKeys()
ASK, DEEP, HEALTH = (
    KEYS.deep_check_request_annotation,
    KEYS.deep_health_check_label,
    (KEYS.health_status_label),
)
NS = "node-health"
JOB_MODE = DeepCheckSettings(runner="job", image="registry.example/nh-deep-check:1", level=1)
P5 = {"node.kubernetes.io/instance-type": "p5.48xlarge"}
P5_DEVICES = {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32", "cpu": "192"}


def p5_node(name: str = "node-a", allocatable: dict | None = None) -> dict:
    return {
        "metadata": {"name": name, "labels": dict(P5), "annotations": {}},
        "status": {"allocatable": P5_DEVICES if allocatable is None else allocatable},
    }


def test_the_job_is_valid_pinned_to_its_node_and_asks_for_every_device() -> None:
    import kubernetes_validate

    body = job(p5_node(), JOB_MODE, KEYS, NS)
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)
    spec = body["spec"]
    assert (spec["backoffLimit"], spec["template"]["spec"]["restartPolicy"]) == (0, "Never")
    assert spec["activeDeadlineSeconds"] > JOB_MODE.deadline  # the run's deadline comes first
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term == {
        "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]
    }
    assert {"key": KEYS.taint_key, "operator": "Exists"} in pod["tolerations"]
    [c] = pod["containers"]
    assert c["image"] == "registry.example/nh-deep-check:1"
    want = {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}  # not the CPUs: devices only
    assert c["resources"] == {"limits": want, "requests": want}
    assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][-1] == "node-health"
    assert c["args"][:2] == ["deep-check", "--json"]
    assert c["args"][c["args"].index("--instance-type") + 1] == "p5.48xlarge"
    assert c["args"][c["args"].index("--gpus") + 1] == "8"
    assert c["args"][c["args"].index("--level") + 1] == "1"
    assert (
        "--force" not in c["args"]
        and "--force"
        in job(p5_node(), JOB_MODE, KEYS, NS, True)["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"] == "/var/lib/node-health"  # the agent's (deploy/)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "state")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert mount["mountPath"] == env["NODE_HEALTH_STATE_DIR"] == "/var/lib/node-health"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "privileged" not in c["securityContext"]
    assert body["metadata"]["annotations"][NODE_ANNOTATION] == "node-a"


def test_devices_from_the_instance_type_until_the_plugins_report_and_a_neuron_node() -> None:
    fresh = job(p5_node(allocatable={}), JOB_MODE, KEYS, NS)
    limits = fresh["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}
    trn = p5_node(allocatable={"aws.amazon.com/neuron": "16", "vpc.amazonaws.com/efa": "8"})
    trn["metadata"]["labels"] = {"node.kubernetes.io/instance-type": "trn1.32xlarge"}
    [c] = job(trn, JOB_MODE, KEYS, NS)["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8}
    assert "--gpus" not in c["args"]


def test_one_name_per_node_and_always_a_dns_label() -> None:
    long = "ip-10-0-123-45." + "x" * 200 + ".compute.internal"
    names = {
        job_name(n) for n in ("node-a", "Node-A.example", long, "hyperpod-i-0123456789abcdef0")
    }
    assert len(names) == 4
    assert job_name("node-a") == job_name("node-a")
    for name in names:
        assert len(name) <= 63 and name[0].isalnum() and name[-1].isalnum(), name


def controller(api: FakeKubeAPI, kcfg: Path, events: list, **cfg) -> Requests:
    client = KubeClient(kubeconfig=str(kcfg), timeout=5)
    return Requests(
        client,
        ControllerSettings(**cfg),
        KEYS,
        events.append,
        stopped=lambda: False,
        deep=JOB_MODE,
    )


def jobs(api: FakeKubeAPI) -> dict[str, dict]:
    return {name: j for (_, name), j in api.state.jobs.items()}


def annotate(api: FakeKubeAPI, name: str, value: str = "run") -> None:
    api.edit(name, lambda n: n["metadata"]["annotations"].update({ASK: value}))


def test_an_operators_request_becomes_one_job_and_its_end_is_reported(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    api.edit("node-a", lambda n: n["metadata"]["labels"].update(P5))
    events: list = []
    requests = controller(api, kcfg, events)
    requests.scan()
    assert jobs(api) == {}  # nothing asked, not new
    annotate(api, "node-a")
    requests.scan()
    [name] = jobs(api)
    assert name == job_name("node-a")
    assert ASK not in api.node("node-a")["metadata"]["annotations"]  # answered
    assert [e["reason"] for e in events] == ["DeepCheckJobStarted"]
    assert events[0]["node"] == "node-a"
    annotate(api, "node-a")  # asked again while it runs: that run answers it
    requests.scan()
    assert len(jobs(api)) == 1 and api.state.deleted_jobs == []
    assert ASK not in api.node("node-a")["metadata"]["annotations"]
    finish_job(api, NS, name, "Failed", "DeadlineExceeded")
    requests.scan()
    requests.scan()  # said once
    ended = [e for e in events if e["reason"] == "DeepCheckJobFinished"]
    assert len(ended) == 1 and ended[0]["level"] == "warn"
    assert "Failed (DeadlineExceeded)" in ended[0]["msg"]
    # Nothing labelled from the Job: the node's agent labels it from the run's record.
    assert DEEP not in api.node("node-a")["metadata"]["labels"]
    annotate(api, "node-a", "force")  # asked again after the end: the old Job makes way
    requests.scan()
    assert api.state.deleted_jobs == [name]
    [again] = jobs(api).values()
    assert "--force" in again["spec"]["template"]["spec"]["containers"][0]["args"]
    assert denied(api.requests(), controller_resources(), NS) == []


def test_new_nodes_get_a_job_once_and_remediated_nodes_are_left_alone(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    young = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    api.add_node("fresh", {**P5, HEALTH: "Schedulable"})
    api.edit("fresh", lambda n: n["metadata"].update(creationTimestamp=young))
    api.add_node("draining", {**P5, HEALTH: "Schedulable", KEYS.remediation_step_label: "Draining"})
    annotate(api, "draining")
    api.add_node("cpu", {"node.kubernetes.io/instance-type": "m5.xlarge", HEALTH: "Schedulable"})
    api.edit("cpu", lambda n: n["metadata"].update(creationTimestamp=young))
    events: list = []
    requests = controller(api, kcfg, events)
    requests.scan()
    assert set(jobs(api)) == {job_name("fresh")}
    assert [(e["node"], e["reason"]) for e in events] == [("fresh", "DeepCheckJobStarted")]
    assert ASK in api.node("draining")["metadata"]["annotations"]  # kept for after
    api.state.jobs.clear()  # gone (its TTL, say): a new node is checked once, not again
    requests.scan()
    assert jobs(api) == {}


def test_a_job_that_cannot_be_created_is_said_and_tried_again(api: FakeKubeAPI, kcfg: Path) -> None:
    annotate(api, "node-a")
    api.fail("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}", 403)
    events: list = []
    requests = controller(api, kcfg, events)
    requests.scan()
    assert jobs(api) == {}
    assert [e["reason"] for e in events] == ["DeepCheckJobFailed"]
    assert ASK in api.node("node-a")["metadata"]["annotations"]  # still asked
    requests.scan()
    assert set(jobs(api)) == {job_name("node-a")}
    assert ASK not in api.node("node-a")["metadata"]["annotations"]


def test_unlistable_jobs_leave_the_rest_of_the_scan_running(api: FakeKubeAPI, kcfg: Path) -> None:
    annotate(api, "node-a")
    api.fail("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}", 500)
    requests = controller(api, kcfg, [])
    requests.scan()  # no exception: the next scan tries again
    assert jobs(api) == {} and ASK in api.node("node-a")["metadata"]["annotations"]
    requests.scan()
    assert set(jobs(api)) == {job_name("node-a")}


@pytest.mark.usefixtures("host_root")
def test_a_jobs_run_is_read_back_by_the_nodes_agent(cli_env, tmp_path, api: FakeKubeAPI, kcfg):
    """End to end: the agent (runner job) leaves the operator's request to the controller,
    the controller starts the Job, the Job's `node-health deep-check` (the real CLI with the
    Job's arguments, fake tools, the node's state directory) writes its record, and the
    node's agent labels the node from it."""
    from tests.kube.test_daemon_kube import in_cluster
    from tests.test_cli import node_health
    from tests.test_daemon import start, stop, with_tools

    env = with_tools(cli_env, tmp_path) | {
        # A passing run: the quoted table with the end dcgmi prints (a cut one is unknown).
        "FAKE_DCGMI_OUTPUT": str(whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt")),
    }
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\ndeep_check: {runner: job}\n"
    )
    agent = start(env, "--config", in_cluster(str(cfg), kcfg))
    try:
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(HEALTH) == "Schedulable")
        annotate(api, "node-a")
        # The agent sees the change (its watch) and writes nothing for it: the request stays.
        wait_for(lambda: any("watch" in r.query for r in api.requests("GET")))
        time.sleep(1.0)
        assert api.node("node-a")["metadata"]["annotations"].get(ASK) == "run"
        requests = controller(api, kcfg, [])
        requests.scan()
        [body] = jobs(api).values()
        [c] = body["spec"]["template"]["spec"]["containers"]
        run_env = env | {
            "NODE_HEALTH_STATE_DIR": str(tmp_path / "state"),  # the Job's hostPath
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",  # in a pod: the daemon labels the node
        }
        out = node_health(run_env, *c["args"], timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout.splitlines()[-1])["deep_health_check_status"] == "Passed"
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(DEEP) == "Passed", 30)
    finally:
        stop(agent)
    assert "deep_check_requested" not in agent.stderr.read()  # the agent ran none itself
    records = list((tmp_path / "state" / "deep-health-check").glob("*.jsonl"))
    assert len(records) == 1
    assert body["metadata"]["labels"]["app.kubernetes.io/name"] == APP


def test_the_shipped_agent_and_controller_settings_agree_on_the_runner() -> None:
    """Set apart, a deep check asked for would be run by no one (agent `job`, controller
    `agent`) or raced for (the agent takes the annotation the controller wants)."""
    from agent.config import load_settings
    from tests.conftest import REPO

    agent = load_settings(REPO / "deploy" / "config.yaml").deep_check
    ctl = load_settings(REPO / "deploy" / "controller" / "config.yaml").deep_check
    assert agent.runner == ctl.runner
