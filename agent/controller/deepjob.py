"""The deep check as a Job on the node (`deep_check.runner: job`).

The agent's image is slim and has none of the deep check's tools (dcgmi, nccl-tests,
stress-ng, libfabric's fi_info and fi_pingpong, the Neuron tools); the Dockerfile's
`deep-check` target has them. The controller runs `node-health deep-check` from that image as
a Job pinned to the node, asking for every GPU, EFA device and Neuron device the node offers
(so no other pod holds them while it runs, and the Job waits until they are free), with the
node's state directory mounted: the run's record lands where the node's agent reads it, and
the agent labels the node from it and takes a failed run into its policy, as for a run in its
own pod (agent/deeprecord.py). The controller never labels the node from the Job: a Job that
never started, or was killed, leaves a record that says nothing (or none), never a fault.

One Job per node at a time, by a name made from the node's; a finished one is deleted when
the node is asked for again (and by ttlSecondsAfterFinished).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.controller.connectivity import TYPE_LABEL
from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.models import DeepCheckSettings, NodeKeys
from checks.instance_types import expected

log = structlog.get_logger("agent.controller")

GROUP, VERSION, PLURAL = "batch", "v1", "jobs"
APP_LABEL, APP = "app.kubernetes.io/name", "node-health-deep-check"
NODE_ANNOTATION = "node-health-agent.io/node"  # the node a Job is for (a name may not fit a label)
GPU, EFA, NEURON = "nvidia.com/gpu", "vpc.amazonaws.com/efa", "aws.amazon.com/neuron"
# Beyond the run's own deadline: pulling the image (several GiB) and waiting for the devices.
START_MARGIN = 900
TTL = 86400  # a finished Job (and its pod's log) is kept a day, unless asked for again
STATE_DIR = "/var/lib/node-health"  # the agent's, on the host (deploy/daemonset.yaml)
# The records' directory stays the agent's (uid 1000) when this run makes it; a DCGM host
# engine for dcgmi in the pod (none on a node without GPUs: the diagnostic is skipped there);
# then the run, its exit status the Job's.
START = (
    'install -d -o 1000 -g 1000 "$NODE_HEALTH_STATE_DIR/deep-health-check" && '
    "{ nv-hostengine >/dev/null 2>&1 || true; } && "
    'exec "$0" "$@"'
)


def job_name(node: str) -> str:
    """`nh-deep-<node>-<hash>`: a DNS label (63 characters at most) per node."""
    digest = hashlib.sha256(node.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", node.lower())[:40].strip("-")
    return f"nh-deep-{stem}-{digest}" if stem else f"nh-deep-{digest}"


def devices(node: dict[str, Any]) -> dict[str, int]:
    """Every GPU, EFA device and Neuron device of the node: what its device plugins report
    (allocatable); a node that reports none yet, its instance type's count."""
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    if allocatable:
        out = {}
        for name in (GPU, EFA, NEURON):
            try:
                count = int(str(allocatable.get(name, "0")))
            except ValueError:
                count = 0
            if count > 0:
                out[name] = count
        return out
    labels = (node.get("metadata") or {}).get("labels") or {}
    want = expected(labels.get(TYPE_LABEL))
    counts = {GPU: want.gpus, EFA: want.efa_devices, NEURON: want.neuron_devices}
    return {name: n for name, n in counts.items() if n}


def job(
    node: dict[str, Any],
    cfg: DeepCheckSettings,
    keys: NodeKeys,
    namespace: str,
    force: bool = False,
) -> dict[str, Any]:
    """The Job for `node`'s deep check; `force`: run even while processes outside the cluster's
    pods use the accelerators."""
    meta = node.get("metadata") or {}
    name, itype = meta["name"], (meta.get("labels") or {}).get(TYPE_LABEL)
    limits = devices(node)
    args = ["deep-check", "--json", "--suite", cfg.suite, "--level", str(cfg.level)]
    args += ["--deadline", f"{int(cfg.deadline)}s"]
    if itype:  # the thresholds and counts of its type (IMDS may be closed to pods)
        args += ["--instance-type", itype]
    if limits.get(GPU):
        args += ["--gpus", str(limits[GPU])]
    if force:
        args.append("--force")
    host = [("proc", "/proc", "Directory"), ("sys", "/sys", "Directory")]
    mounts = [{"name": "state", "mountPath": STATE_DIR}, {"name": "shm", "mountPath": "/dev/shm"}]
    mounts += [{"name": v, "mountPath": f"/host{path}", "readOnly": True} for v, path, _ in host]
    volumes: list[dict[str, Any]] = [
        {"name": "state", "hostPath": {"path": STATE_DIR, "type": "DirectoryOrCreate"}},
        # NCCL's buffers between its threads; the runtime's 64 MiB is too small
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    volumes += [{"name": v, "hostPath": {"path": p, "type": t}} for v, p, t in host]
    labels = {APP_LABEL: APP}
    container = {
        "name": "deep-check",
        "image": cfg.image,
        "command": ["/bin/sh", "-c", START, "node-health"],
        "args": args,
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "NODE_HEALTH_STATE_DIR", "value": STATE_DIR},
            {"name": "NODE_HEALTH_HOST_ROOT", "value": "/host"},
            # the device plugin sets NVIDIA_VISIBLE_DEVICES to the GPUs it gave; DCGM's
            # diagnostic and NCCL run CUDA work
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "compute,utility"},
        ],
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        # Root, not privileged, with the runtime's default capabilities and IPC_LOCK: DCGM's
        # host engine and parts of its diagnostic need root (nv-hostengine's reference), EFA
        # pins more memory than a non-root memlock limit allows, and the records' directory
        # is made the agent's (CHOWN). The devices come from the device plugins.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["IPC_LOCK"]},
        },
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": labels,
            "annotations": {NODE_ANNOTATION: name},
        },
        "spec": {
            "backoffLimit": 0,  # a failed run is a result, not a reason to run again
            "activeDeadlineSeconds": int(cfg.deadline) + START_MARGIN,
            "ttlSecondsAfterFinished": TTL,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    # the scheduler, not nodeName: it waits for the devices instead of kubelet
                    # refusing the pod while a job holds them
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchFields": [
                                            {
                                                "key": "metadata.name",
                                                "operator": "In",
                                                "values": [name],
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    # the agent's taint (the node may be out while it is checked) and any
                    # other NoSchedule taint of an accelerator node: the Job is for this node
                    "tolerations": [
                        {"key": keys.taint_key, "operator": "Exists"},
                        {"operator": "Exists", "effect": "NoSchedule"},
                    ],
                    "terminationGracePeriodSeconds": 60,  # the run stops its tools, says so
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def finished(j: dict[str, Any]) -> str | None:
    """`Complete` or `Failed` (with its reason) once the Job is over; None while it runs."""
    for c in (j.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            reason = c.get("reason")
            return f"{c['type']} ({reason})" if reason else str(c["type"])
    return None


class DeepJobs:
    """Starts the deep checks the nodes are asked for (the annotation, by an operator) or need
    (new nodes, `deep_check_new_nodes`) as Jobs, and says how each ended."""

    def __init__(
        self,
        client: KubeClient,
        cfg: DeepCheckSettings,
        keys: NodeKeys,
        namespace: str,
        say: Callable[[Event], None],
        stopped: Callable[[], bool],
    ) -> None:
        self.client, self.cfg, self.keys, self.namespace = client, cfg, keys, namespace
        self.say, self.stopped = say, stopped
        self._said: set[str] = set()  # finished Jobs already reported (by uid)

    def scan(self, nodes: list[dict[str, Any]], new: set[str]) -> set[str]:
        """A Job for each node asked for and each of `new` (nodes that need their first deep
        check) that has none running; returns the new nodes it was started for. Raises
        KubeError when the Jobs cannot be listed."""
        jobs = {
            j["metadata"]["name"]: j
            for j in self.client.list_objects(
                GROUP, VERSION, self.namespace, PLURAL, f"{APP_LABEL}={APP}"
            )
        }
        for j in jobs.values():
            self._report(j)
        started: set[str] = set()
        for node in nodes:
            meta = node.get("metadata") or {}
            name = meta["name"]
            asked = (meta.get("annotations") or {}).get(self.keys.deep_check_request_annotation)
            if self.stopped() or (asked is None and name not in new):
                continue
            if self._start(node, jobs.get(job_name(name)), asked):
                started.add(name)
        return started

    def _start(
        self, node: dict[str, Any], current: dict[str, Any] | None, asked: str | None
    ) -> bool:
        name = node["metadata"]["name"]
        jname = job_name(name)
        if current is not None and finished(current) is None:
            if asked is not None:  # the run going answers it
                self._answered(name, f"{name}: deep check already running as Job {jname}")
            return False
        if current is not None:
            try:  # its result is on the node; the name is wanted for the new run
                self.client.delete_object(GROUP, VERSION, self.namespace, PLURAL, jname)
            except KubeError as exc:
                if exc.status != 404:
                    log.warning("deep_check_job_delete_failed", job=jname, error=str(exc))
                    return False
        body = job(node, self.cfg, self.keys, self.namespace, force=asked == "force")
        try:
            self.client.create_object(GROUP, VERSION, self.namespace, PLURAL, body)
        except KubeError as exc:  # the request stays: the next scan tries again
            if exc.status != 409:  # 409: the last one is still being deleted
                self._say("warn", f"{name}: deep check Job not created: {exc}", name, "Failed")
            return False
        msg = f"{name}: deep check started as Job {self.namespace}/{jname}"
        if asked is not None:
            self._answered(name, msg)
        else:
            self._say("info", msg + " (a new node)", name, "Started")
        return True

    def _answered(self, name: str, msg: str) -> None:
        """The request is answered by a Job: removed from the node, and said."""
        patch = {"metadata": {"annotations": {self.keys.deep_check_request_annotation: None}}}
        try:
            self.client.patch_node(name, patch, MERGE)
        except KubeError as exc:
            log.warning("deep_check_request_not_removed", node=name, error=str(exc))
        self._say("info", msg, name, "Started")

    def _report(self, j: dict[str, Any]) -> None:
        meta = j.get("metadata") or {}
        state, uid = finished(j), str(meta.get("uid") or meta.get("name"))
        if state is None or uid in self._said:
            return
        self._said.add(uid)
        node = str((meta.get("annotations") or {}).get(NODE_ANNOTATION) or "")
        ok = state.startswith("Complete")
        self._say(
            "info" if ok else "warn",
            f"{node}: deep check Job {meta.get('name')} ended: {state}; the node's agent labels "
            "it from the run's record (a run that never started or was stopped changes nothing)",
            node,
            "Finished",
        )

    def _say(self, level: str, msg: str, node: str, what: str) -> None:
        event: Event = {"level": level, "ts": rfc3339(time.time()), "msg": msg, "node": node}
        event["reason"] = f"DeepCheckJob{what}"
        self.say(event)
