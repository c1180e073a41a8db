"""The fake API server's pods, evictions (with PodDisruptionBudgets) and leases, served as
kube-apiserver serves them:

- `GET /api/v1/pods?fieldSelector=spec.nodeName=...` (field selectors `spec.nodeName`,
  `status.phase`, `metadata.name`, `metadata.namespace`, with `=`, `==`, `!=`).
- `POST .../pods/<name>/eviction` (policy/v1 or v1beta1 Eviction): 400 when the body's name
  differs from the URL's, 404 for a pod that is gone, success at once for a pod already
  terminating; else each PodDisruptionBudget selecting the pod is consulted: more than one is a
  500, one with no disruption allowed is a 429 `DisruptionBudget`; otherwise the budget is
  spent and the pod deleted (or, with `api.hold_deletion`, left terminating).
- `coordination.k8s.io/v1` leases: GET, POST (409 AlreadyExists), PUT with the body's
  `metadata.resourceVersion` required (422) and checked (409), spec fields validated.
- `batch/v1` jobs: POST (409 AlreadyExists; name, template and restartPolicy validated), GET,
  LIST (label selectors), DELETE; `finish_job` plays the Job controller's part.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.kube.fake_api import FakeKubeAPI

from tests.kube.fake_api import ApiError, selects

PODS = re.compile(r"^/api/v1/pods$")
EVICTION = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/eviction$")
LEASES = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$")
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def pod(
    namespace: str,
    name: str,
    node: str,
    labels: dict[str, str] | None = None,
    owner: str | None = None,
    phase: str = "Running",
    mirror: bool = False,
    gpus: int = 0,
) -> dict:
    """A pod as the API server returns it; `owner` is the controller's kind (`DaemonSet`...);
    `gpus`: what its container asks for (a request and limit, as the device plugin needs)."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{namespace}-{name}",
        "labels": dict(labels or {}),
        "annotations": {},
    }
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1" if owner != "Job" else "batch/v1",
                "kind": owner,
                "name": f"{name}-owner",
                "uid": f"uid-{name}-owner",
                "controller": True,
            }
        ]
    if mirror:
        meta["annotations"]["kubernetes.io/config.mirror"] = "mirror-hash"
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    if gpus:
        asked = {"nvidia.com/gpu": str(gpus)}
        container["resources"] = {"requests": asked, "limits": dict(asked)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [container]},
        "status": {"phase": phase},
    }


def list_pods(api: FakeKubeAPI, query: dict[str, str]) -> dict:
    fields, selector = query.get("fieldSelector", ""), query.get("labelSelector", "")
    with api.lock:
        items = [
            copy.deepcopy(p)
            for p in api.state.pods.values()
            if _pod_fields(fields, p) and selects(selector, p["metadata"].get("labels") or {})
        ]
        rv = str(api.state.rv)
    return {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
        "items": items,
    }


_POD_FIELDS = {
    "spec.nodeName": lambda p: p["spec"].get("nodeName", ""),
    "status.phase": lambda p: p["status"].get("phase", ""),
    "metadata.name": lambda p: p["metadata"]["name"],
    "metadata.namespace": lambda p: p["metadata"]["namespace"],
}


def _pod_fields(selector: str, p: dict) -> bool:
    for term in filter(None, selector.split(",")):
        negate = "!=" in term
        key, value = re.split(r"!=|==|=", term, maxsplit=1)
        if key not in _POD_FIELDS:
            raise ApiError(400, "BadRequest", f'field label not supported: "{key}" for pods')
        if (_POD_FIELDS[key](p) == value) == negate:
            return False
    return True


def evict(api: FakeKubeAPI, namespace: str, name: str, body: Any) -> dict:
    if not isinstance(body, dict) or body.get("kind") != "Eviction":
        raise ApiError(400, "BadRequest", "the body must be an Eviction")
    if body.get("apiVersion") not in ("policy/v1", "policy/v1beta1"):
        raise ApiError(400, "BadRequest", f"unsupported Eviction version {body.get('apiVersion')}")
    meta = body.get("metadata") or {}
    if meta.get("name") != name:
        raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
    if meta.get("namespace", namespace) != namespace:
        raise ApiError(400, "BadRequest", "namespace in URL does not match the Eviction object")
    grace = (body.get("deleteOptions") or {}).get("gracePeriodSeconds")
    if grace is not None and (not isinstance(grace, int) or grace < 0):
        raise ApiError(422, "Invalid", "deleteOptions.gracePeriodSeconds: must be >= 0")
    with api.lock:
        key = (namespace, name)
        p = api.state.pods.get(key)
        if p is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        if p["metadata"].get("deletionTimestamp"):
            return _success()
        if p["status"].get("phase") not in ("Succeeded", "Failed"):  # those evict freely
            budgets = [
                b
                for (ns, _), b in api.state.pdbs.items()
                if ns == namespace and selects(b["selector"], p["metadata"].get("labels") or {})
            ]
            if len(budgets) > 1:
                raise ApiError(
                    500,
                    "InternalError",
                    "This pod has more than one PodDisruptionBudget, which the eviction "
                    "subresource does not support.",
                )
            if budgets:
                b = budgets[0]
                if b["allowed"] <= 0:
                    err = ApiError(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    )
                    err.details = {
                        "causes": [
                            {
                                "reason": "DisruptionBudget",
                                "message": f"The disruption budget {b['name']} needs "
                                f"{b['min_available']} healthy pods and has "
                                f"{b['min_available']} currently",
                            }
                        ]
                    }
                    raise err
                b["allowed"] -= 1
        api.state.evictions.append((namespace, name, grace))
        if api.hold_deletion:
            p["metadata"]["deletionTimestamp"] = "2026-11-23T00:00:00Z"
            p["metadata"]["deletionGracePeriodSeconds"] = 30 if grace is None else grace
        else:
            del api.state.pods[key]
        api.state.rv += 1
    return _success()


def _success() -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}


# -- leases -----------------------------------------------------------------------------------


def _get(store: dict, resource: str, namespace: str, name: str) -> dict:
    """Call with the lock held."""
    found = store.get((namespace, name))
    if found is None:
        raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
    return copy.deepcopy(found)


def get_lease(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        return _get(api.state.leases, "leases.coordination.k8s.io", namespace, name)


def create_lease(api: FakeKubeAPI, namespace: str, body: Any) -> dict:
    _validate_lease(body, namespace)
    name = body["metadata"]["name"]
    with api.lock:
        if (namespace, name) in api.state.leases:
            raise ApiError(
                409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists'
            )
        return _store_lease(api, namespace, body)


def replace_lease(api: FakeKubeAPI, namespace: str, name: str, body: Any) -> dict:
    _validate_lease(body, namespace)
    if body["metadata"]["name"] != name:
        raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
    rv = body["metadata"].get("resourceVersion")
    if not rv:  # leases do not allow unconditional updates
        raise ApiError(
            422,
            "Invalid",
            f'Lease.coordination.k8s.io "{name}" is invalid: metadata.resourceVersion: '
            "Invalid value: 0x0: must be specified for an update",
        )
    with api.lock:
        old = api.state.leases.get((namespace, name))
        if old is None:
            raise ApiError(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
        if rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the '
                "object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        return _store_lease(api, namespace, body)


def _store_lease(api: FakeKubeAPI, namespace: str, body: dict) -> dict:
    api.state.rv += 1
    lease = copy.deepcopy(body)
    lease.setdefault("apiVersion", "coordination.k8s.io/v1")
    lease.setdefault("kind", "Lease")
    lease["metadata"].update(namespace=namespace, resourceVersion=str(api.state.rv))
    api.state.leases[(namespace, lease["metadata"]["name"])] = lease
    api.state.lease_writes.append(copy.deepcopy(lease))
    return copy.deepcopy(lease)


def _validate_lease(body: Any, namespace: str) -> None:
    if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
        raise ApiError(422, "Invalid", "metadata.name: Required value")
    if body["metadata"].get("namespace", namespace) != namespace:
        raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
    spec = body.get("spec") or {}
    problems = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        problems.append("spec.leaseDurationSeconds: must be greater than 0")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        problems.append("spec.leaseTransitions: must be greater than or equal to 0")
    for key in ("acquireTime", "renewTime"):
        if spec.get(key) is not None and not MICROTIME.match(str(spec[key])):
            problems.append(f"spec.{key}: not a MicroTime (RFC 3339 with microseconds)")
    if problems:
        raise ApiError(422, "Invalid", "; ".join(problems))


# -- ConfigMaps ----------------------------------------------------------------------------------

CONFIGMAPS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?$")


def get_configmap(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        return _get(api.state.configmaps, "configmaps", namespace, name)


def create_configmap(api: FakeKubeAPI, namespace: str, body: Any) -> dict:
    name = _validate_configmap(body, namespace)
    with api.lock:
        if (namespace, name) in api.state.configmaps:
            raise ApiError(409, "AlreadyExists", f'configmaps "{name}" already exists')
        return _store_configmap(api, namespace, body)


def replace_configmap(api: FakeKubeAPI, namespace: str, name: str, body: Any) -> dict:
    """PUT; a resourceVersion in the body is a precondition (409 when it is not the current)."""
    if _validate_configmap(body, namespace) != name:
        raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
    with api.lock:
        old = api.state.configmaps.get((namespace, name))
        if old is None:
            raise ApiError(404, "NotFound", f'configmaps "{name}" not found')
        rv = body["metadata"].get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on configmaps "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        return _store_configmap(api, namespace, body)


def _store_configmap(api: FakeKubeAPI, namespace: str, body: dict) -> dict:
    api.state.rv += 1
    cm = copy.deepcopy(body)
    cm.setdefault("apiVersion", "v1")
    cm.setdefault("kind", "ConfigMap")
    cm["metadata"].update(namespace=namespace, resourceVersion=str(api.state.rv))
    api.state.configmaps[(namespace, cm["metadata"]["name"])] = cm
    return copy.deepcopy(cm)


def _validate_configmap(body: Any, namespace: str) -> str:
    """The name; as the API server: string data only, at most 1 MiB in all."""
    if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
        raise ApiError(422, "Invalid", "metadata.name: Required value")
    if body["metadata"].get("namespace", namespace) != namespace:
        raise ApiError(400, "BadRequest", "the namespace of the object does not match the URL")
    data = body.get("data") or {}
    if not all(isinstance(v, str) for v in data.values()):
        raise ApiError(400, "BadRequest", "data: values must be strings")
    if sum(len(k) + len(v) for k, v in data.items()) > 1024 * 1024:
        raise ApiError(422, "Invalid", "data: Too long: must have at most 1048576 bytes")
    return str(body["metadata"]["name"])


# -- MPIJobs (kubeflow.org/v2beta1, the MPI Operator's) and pod logs ------------------------------

MPIJOBS = re.compile(r"^/apis/kubeflow\.org/v2beta1/namespaces/([^/]+)/mpijobs(?:/([^/]+))?$")
NS_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


class Text(str):
    """An answer served as text/plain (a pod's log)."""


def create_mpijob(api: FakeKubeAPI, namespace: str, body: Any) -> dict:
    if not isinstance(body, dict) or body.get("kind") != "MPIJob":
        raise ApiError(400, "BadRequest", "the body must be an MPIJob")
    if body.get("apiVersion") != "kubeflow.org/v2beta1":
        raise ApiError(400, "BadRequest", f"no kind MPIJob in {body.get('apiVersion')}")
    name = (body.get("metadata") or {}).get("name") or ""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ApiError(422, "Invalid", f"metadata.name: Invalid value: {name!r}")
    specs = (body.get("spec") or {}).get("mpiReplicaSpecs") or {}
    if set(specs) != {"Launcher", "Worker"}:
        raise ApiError(422, "Invalid", "spec.mpiReplicaSpecs: Launcher and Worker required")
    for role, spec in specs.items():
        containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers or not all(c.get("image") and c.get("name") for c in containers):
            raise ApiError(422, "Invalid", f"spec.mpiReplicaSpecs[{role}]: containers invalid")
    with api.lock:
        if (namespace, name) in api.state.mpijobs:
            raise ApiError(409, "AlreadyExists", f'mpijobs.kubeflow.org "{name}" already exists')
        api.state.rv += 1
        job = copy.deepcopy(body)
        job["metadata"].update(namespace=namespace, resourceVersion=str(api.state.rv))
        job["status"] = {}
        api.state.mpijobs[(namespace, name)] = job
        api.state.most_mpijobs = max(api.state.most_mpijobs, len(api.state.mpijobs))
        api.lock.notify_all()
        return copy.deepcopy(job)


def get_mpijob(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        return _get(api.state.mpijobs, "mpijobs.kubeflow.org", namespace, name)


def delete_mpijob(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        if api.state.mpijobs.pop((namespace, name), None) is None:
            raise ApiError(404, "NotFound", f'mpijobs.kubeflow.org "{name}" not found')
        for key, p in list(api.state.pods.items()):
            if (
                key[0] == namespace
                and p["metadata"]["labels"].get("training.kubeflow.org/job-name") == name
            ):
                del api.state.pods[key]
        api.state.deleted_mpijobs.append(name)
    return {"kind": "Status", "apiVersion": "v1", "status": "Success"}


def list_namespaced_pods(api: FakeKubeAPI, namespace: str, query: dict[str, str]) -> dict:
    out = list_pods(api, query)
    out["items"] = [p for p in out["items"] if p["metadata"]["namespace"] == namespace]
    return out


def pod_log(api: FakeKubeAPI, namespace: str, name: str) -> Text:
    with api.lock:
        if (namespace, name) not in api.state.pods:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        return Text(api.state.logs.get((namespace, name), ""))


def finish_mpijob(api: FakeKubeAPI, namespace: str, name: str, succeeded: bool, log: str) -> None:
    """What the MPI Operator and the launcher do: a launcher pod that printed `log`, and the
    job's Succeeded or Failed condition."""
    with api.lock:
        job = api.state.mpijobs[(namespace, name)]
        pod_name = f"{name}-launcher-x7k2p"
        p = pod(
            namespace,
            pod_name,
            "cpu-node",
            labels={
                "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/job-role": "launcher",
            },
            owner="Job",
            phase="Succeeded" if succeeded else "Failed",
        )
        api.state.pods[(namespace, pod_name)] = p
        api.state.logs[(namespace, pod_name)] = log
        kind = "Succeeded" if succeeded else "Failed"
        job["status"] = {
            "conditions": [
                {"type": "Created", "status": "True", "reason": "MPIJobCreated"},
                {"type": "Running", "status": "False", "reason": "MPIJobRunning"},
                {"type": kind, "status": "True", "reason": f"MPIJob{kind}"},
            ]
        }
        api.state.rv += 1


# -- Jobs (batch/v1) ---------------------------------------------------------------------------

JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")


def create_job(api: FakeKubeAPI, namespace: str, body: Any) -> dict:
    if not isinstance(body, dict) or body.get("kind") != "Job":
        raise ApiError(400, "BadRequest", "the body must be a Job")
    if body.get("apiVersion") != "batch/v1":
        raise ApiError(400, "BadRequest", f"no kind Job in {body.get('apiVersion')}")
    name = (body.get("metadata") or {}).get("name") or ""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ApiError(422, "Invalid", f"metadata.name: Invalid value: {name!r}")
    spec = ((body.get("spec") or {}).get("template") or {}).get("spec") or {}
    if spec.get("restartPolicy") not in ("Never", "OnFailure"):
        raise ApiError(422, "Invalid", "spec.template.spec.restartPolicy: Unsupported value")
    containers = spec.get("containers") or []
    if not containers or not all(c.get("image") and c.get("name") for c in containers):
        raise ApiError(422, "Invalid", "spec.template.spec.containers: Required value")
    with api.lock:
        if (namespace, name) in api.state.jobs:
            raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        api.state.rv += 1
        job = copy.deepcopy(body)
        job["metadata"].update(
            namespace=namespace, resourceVersion=str(api.state.rv), uid=f"uid-{name}-{api.state.rv}"
        )
        job["status"] = {}
        api.state.jobs[(namespace, name)] = job
        return copy.deepcopy(job)


def get_job(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        return _get(api.state.jobs, "jobs.batch", namespace, name)


def list_jobs(api: FakeKubeAPI, namespace: str, query: dict[str, str]) -> dict:
    selector = query.get("labelSelector", "")
    with api.lock:
        items = [
            copy.deepcopy(j)
            for (ns, _), j in sorted(api.state.jobs.items())
            if ns == namespace and selects(selector, j["metadata"].get("labels") or {})
        ]
        rv = str(api.state.rv)
    return {
        "kind": "JobList",
        "apiVersion": "batch/v1",
        "metadata": {"resourceVersion": rv},
        "items": items,
    }


def delete_job(api: FakeKubeAPI, namespace: str, name: str) -> dict:
    with api.lock:
        if api.state.jobs.pop((namespace, name), None) is None:
            raise ApiError(404, "NotFound", f'jobs.batch "{name}" not found')
        api.state.deleted_jobs.append(name)
    return {"kind": "Status", "apiVersion": "v1", "status": "Success"}


def finish_job(api: FakeKubeAPI, namespace: str, name: str, kind: str, reason: str) -> None:
    """What the Job controller writes when a Job ends: its `Complete` or `Failed` condition
    (reasons as batch/v1's: `Completed`, `BackoffLimitExceeded`, `DeadlineExceeded`)."""
    with api.lock:
        job = api.state.jobs[(namespace, name)]
        job["status"] = {
            "conditions": [{"type": kind, "status": "True", "reason": reason}],
            ("succeeded" if kind == "Complete" else "failed"): 1,
        }
        api.state.rv += 1
