"""deploy/: every manifest valid against the Kubernetes schemas, the kustomization builds, the
agent's settings load, RBAC no wider than documented, and the admission policy's CEL judged on
the writes the agent makes and the ones it must never make."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"  # ValidatingAdmissionPolicy v1 and the node-name claim: 1.30 on
HEALTH = "sagemaker.amazonaws.com/node-health-status"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def resources() -> list[dict[str, Any]]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [d for name in kust["resources"] for d in docs(name)]


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    for doc in resources():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` builds from `directory`; the test is skipped without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the manifests are validated one by one above)")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_kustomization_builds() -> None:
    import kubernetes_validate

    built = kustomize(DEPLOY)
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in built}
    assert {"DaemonSet", "ConfigMap", "ClusterRole", "ValidatingAdmissionPolicy"} <= kinds
    ds = next(d for d in built if d["kind"] == "DaemonSet")
    cm = next(d for d in built if d["kind"] == "ConfigMap")
    assert ds["metadata"]["namespace"] == "node-health"
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]  # hashed name


def test_the_agents_settings_in_the_configmap_load(tmp_path: Path) -> None:
    from agent.config import load_settings

    settings = load_settings(DEPLOY / "config.yaml")
    assert str(settings.host_root) == "/host"
    assert settings.kubernetes.max_unschedulable_percent == 10


def test_the_agent_stops_inside_the_pods_grace_period() -> None:
    """The kubelet SIGKILLs at terminationGracePeriodSeconds: the agent's own stop budget (as
    deployed) must end first, with a margin for the interpreter's exit."""
    from agent.config import load_settings

    [ds] = docs("daemonset.yaml")
    grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert load_settings(DEPLOY / "config.yaml").stop_timeout + 5 <= grace


def test_rbac_is_what_the_readme_says_and_no_more() -> None:
    [role, _] = docs("rbac.yaml")
    granted = {
        (res, verb)
        for rule in role["rules"]
        for res in rule["resources"]
        for verb in rule["verbs"]
        if rule["apiGroups"] == [""]
    }
    assert granted == {
        ("nodes", "get"),
        ("nodes", "list"),
        ("nodes", "watch"),
        ("nodes", "patch"),
        ("nodes/status", "patch"),
        ("events", "create"),
        ("events", "patch"),
    }
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])


def test_the_daemonset_runs_non_root_on_every_node_with_the_host_read_only() -> None:
    [ds] = docs("daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    host = [m for m in agent["volumeMounts"] if m["mountPath"].startswith("/host")]
    assert {m["mountPath"] for m in host} >= {"/host/proc", "/host/sys", "/host/dev/kmsg"}
    assert all(m.get("readOnly") for m in host)
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert not any("AWS_" in e for e in env)  # credentials: Pod Identity or IRSA only


# ---- the admission policy's CEL, evaluated as the API server would ---------------------------

AGENT = "system:serviceaccount:node-health:node-health-agent"


def node(**labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "node-a", "labels": {"team": "ml", **labels}, "annotations": {}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    }


def admitted(old: dict, new: dict, claim: str | None = "node-a", user: str = AGENT) -> list[str]:
    """The messages of the validations that deny this write; [] when it is admitted."""
    import celpy

    policy = docs("admission-policy.yaml")[0]["spec"]
    env = celpy.Environment()

    def run(expr: str, act: dict) -> Any:
        return env.program(env.compile(expr)).evaluate(act)

    extra = {"authentication.kubernetes.io/node-name": [claim]} if claim else {}
    req = {"userInfo": {"username": user, "extra": extra}}
    act = {
        "object": celpy.json_to_cel(new),
        "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel(req),
    }
    if not all(run(m["expression"], act) for m in policy["matchConditions"]):
        return []  # not the agent: the policy does not apply
    variables = {v["name"]: run(v["expression"], act) for v in policy["variables"]}
    act["variables"] = celpy.celtypes.MapType(
        {celpy.celtypes.StringType(k): v for k, v in variables.items()}
    )
    return [
        v.get("message") or v.get("messageExpression")
        for v in policy["validations"]
        if not run(v["expression"], act)
    ]


def agent_write(n: dict) -> dict:
    new = copy.deepcopy(n)
    new["metadata"]["labels"][HEALTH] = "UnschedulablePendingReboot"
    new["metadata"]["annotations"]["node-health-agent.io/owned"] = "{}"
    new["spec"]["taints"].append({"key": HEALTH, "value": "x", "effect": "NoSchedule"})
    new["status"]["conditions"].append({"type": "NvidiaGPUUnhealthy", "status": "True"})
    return new


def test_the_agents_own_writes_on_its_own_node_are_admitted() -> None:
    old = node()
    assert admitted(old, agent_write(old)) == []
    back = agent_write(old)
    assert admitted(back, old) == []  # and taken back


@pytest.mark.parametrize(
    ("change", "denied"),
    [
        (lambda n: n["metadata"]["labels"].update(team="other"), "own labels"),
        (lambda n: n["metadata"]["labels"].pop("team"), "own labels"),
        (lambda n: n["metadata"]["annotations"].update({"x/y": "1"}), "own annotations"),
        (lambda n: n["spec"]["taints"].pop(0), "own taint"),
        (lambda n: n["status"]["conditions"][0].update(status="False"), "kubelet's conditions"),
    ],
)
def test_anything_else_is_denied(change, denied) -> None:
    old = node()
    new = agent_write(old)
    change(new)
    [message] = admitted(old, new)
    assert denied in message


def test_another_node_or_no_claim_is_denied_and_others_are_not_concerned() -> None:
    old = node()
    new = agent_write(old)
    assert admitted(old, new, claim="node-b") == [
        "'the agent on node ' + variables.nodeName + ' may not change node ' + object.metadata.name"
    ]
    assert len(admitted(old, new, claim=None)) == 2  # no claim: refused, and says why
    assert admitted(old, new, user="system:node:node-a") == []


# ---- the controller (deploy/controller/) ---------------------------------------------------

CONTROLLER = DEPLOY / "controller"


def controller_resources() -> list[dict[str, Any]]:
    kust = yaml.safe_load((CONTROLLER / "kustomization.yaml").read_text())
    return [
        d
        for name in kust["resources"]
        for d in yaml.safe_load_all((CONTROLLER / name).read_text())
        if d
    ]


def test_the_controllers_manifests_are_valid_and_its_settings_load() -> None:
    import kubernetes_validate

    from agent.config import load_settings

    for doc in controller_resources():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    settings = load_settings(CONTROLLER / "config.yaml")
    assert settings.controller.backend == "none"  # nothing acts until chosen
    dep = next(d for d in controller_resources() if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    [ctl] = pod["containers"]
    assert ctl["args"] == ["controller"]
    env = {e["name"]: e for e in ctl["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert (
        ctl["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    )
    assert settings.controller.lease_name in yaml.safe_dump(controller_resources())
    assert settings.controller.replaced_record in yaml.safe_dump(controller_resources())


def test_the_controllers_rbac_is_nodes_pods_evictions_events_its_lease_record_and_jobs() -> None:
    granted = {
        (group, res, verb, tuple(rule.get("resourceNames", ())))
        for doc in controller_resources()
        if doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("", "nodes", "list", ()),
        ("", "nodes", "patch", ()),
        ("", "pods", "list", ()),
        ("", "pods/eviction", "create", ()),
        ("", "events", "create", ()),
        ("", "events", "patch", ()),
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", ("node-health-controller",)),
        ("coordination.k8s.io", "leases", "update", ("node-health-controller",)),
        ("", "configmaps", "create", ()),
        ("", "configmaps", "get", ("node-health-replaced-hardware",)),
        ("", "configmaps", "update", ("node-health-replaced-hardware",)),
        ("kubeflow.org", "mpijobs", "create", ()),
        ("kubeflow.org", "mpijobs", "get", ()),
        ("kubeflow.org", "mpijobs", "delete", ()),
        ("", "pods/log", "get", ()),
        ("batch", "jobs", "create", ()),
        ("batch", "jobs", "list", ()),
        ("batch", "jobs", "delete", ()),
    }
    role = next(d for d in controller_resources() if d["kind"] == "Role")
    assert {"mpijobs", "pods/log", "jobs"} <= {
        r for rule in role["rules"] for r in rule["resources"]
    }
    assert "namespace" not in role["metadata"]  # kustomize puts it in node-health


def test_the_controller_kustomization_builds() -> None:
    built = kustomize(CONTROLLER)
    assert {
        d["metadata"].get("namespace") for d in built if d["kind"] in ("Role", "Deployment")
    } == {"node-health"}
    dep = next(d for d in built if d["kind"] == "Deployment")
    cm = next(d for d in built if d["kind"] == "ConfigMap")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]


def test_the_iam_policies_grant_what_each_backend_calls() -> None:
    import json

    def actions(name: str) -> set[str]:
        policy = json.loads((CONTROLLER / "iam" / name).read_text())
        return {a for s in policy["Statement"] for a in s["Action"]}

    import botocore.session

    session = botocore.session.get_session()
    for name, service in (("sagemaker.json", "sagemaker"), ("ec2.json", "ec2")):
        model = session.get_service_model(service)
        for action in actions(name):
            assert action.split(":")[1] in model.operation_names  # a real operation
    assert actions("sagemaker.json") == {
        "sagemaker:BatchRebootClusterNodes",
        "sagemaker:BatchReplaceClusterNodes",
    }
    assert actions("ec2.json") == {"ec2:RebootInstances", "ec2:TerminateInstances"}
    assert actions("cloudwatch.json") == {
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }


def test_cluster_scoped_objects_get_no_namespace() -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for doc in kustomize(DEPLOY):
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["kind"]
        else:
            assert doc["metadata"]["namespace"] == "node-health", doc["kind"]


def cel(expr: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(expr)).evaluate({})


def test_the_admission_policy_names_what_the_agent_is_and_writes() -> None:
    """Renaming the service account, the namespace or a key in one place and not the other
    would make the policy deny the agent (or, for keys, let it write what it should not)."""
    from agent.config import load_settings

    built = kustomize(DEPLOY)
    [ds] = [d for d in built if d["kind"] == "DaemonSet"]
    [binding] = [d for d in built if d["kind"] == "ClusterRoleBinding"]
    [policy] = [d for d in built if d["kind"] == "ValidatingAdmissionPolicy"]
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = ds["metadata"]["namespace"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": namespace} in binding[
        "subjects"
    ]
    [only] = policy["spec"]["matchConditions"]
    assert f"'system:serviceaccount:{namespace}:{account}'" in only["expression"]
    keys = load_settings(DEPLOY / "config.yaml").node_keys
    variables = {v["name"]: cel(v["expression"]) for v in policy["spec"]["variables"][:3]}
    assert set(variables["ownLabels"]) == {
        keys.health_status_label,
        keys.deep_health_check_label,
        keys.fault_types_label,
        keys.fault_reasons_label,
    }
    assert set(variables["ownAnnotations"]) == {
        keys.fault_details_annotation,
        keys.owned_annotation,
        keys.deep_check_request_annotation,
        keys.hardware_annotation,
        keys.performance_annotation,
    }
    assert variables["taintKey"] == keys.taint_key


def test_the_daemonset_runs_on_the_accelerator_types_the_agent_knows() -> None:
    from checks.api import load_yaml

    [ds] = docs("daemonset.yaml")
    affinity = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    [term] = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    [match] = term["matchExpressions"]
    assert (match["key"], match["operator"]) == ("node.kubernetes.io/instance-type", "In")
    types = load_yaml((REPO / "checks" / "instance_types.yaml").read_text())["types"]
    # EC2's names, and HyperPod's (its nodes' instance-type label reads ml.p5.48xlarge).
    assert set(match["values"]) == set(types) | {f"ml.{t}" for t in types}
