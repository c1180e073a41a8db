"""The multi-node connectivity check (HyperPod's InstanceConnectivity): NCCL all-reduce across
pairs of nodes of one instance type, each pair an MPIJob (kubeflow.org/v2beta1: a launcher and
one worker on each node, over EFA), judged on the launcher's `all_reduce_perf` output with the
same rules and per-instance-type threshold as the node's own NCCL test (checks/nvidia/nccl.py).
Failed pairs are bisected against nodes known good (agent/controller/pairs.py); a faulty node is
labelled with the deep-check result. At most `max_share` of the fleet is under test at once.

Synchronous: `node-health deep-check --connectivity` runs it from an operator's machine, and
the controller from a thread (agent/controller/requests.py), which can interrupt it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.controller.pairs import Pair, Planner, Verdict
from agent.deepcheck import nccl_figures
from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.models import ConnectivitySettings, NodeKeys
from checks.api import Status
from checks.instance_types import expected
from checks.nvidia import nccl

GROUP, VERSION, PLURAL = "kubeflow.org", "v2beta1", "mpijobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
TYPE_LABEL = "node.kubernetes.io/instance-type"
DEFAULT_SIZE = 1 << 30  # the largest message when the type has no threshold
NOT_SERVED = "the API server does not serve MPIJobs: is the Kubeflow MPI Operator installed?"


class ConnectivityError(Exception):
    """The check cannot start (nodes missing, mixed types, no GPU count): said to the user."""


class Interrupted(Exception):
    """Stopped before the end (the controller stops, or no longer leads): its MPIJobs are
    deleted and no node is labelled."""


@dataclass
class PairResult:
    pair: Pair
    passed: bool | None  # None: the test could not run or decide
    message: str
    busbw: float | None = None
    figures: dict[str, float] = field(default_factory=dict)  # bus bandwidth at each size


def mpijob(
    name: str,
    pair: Pair,
    cfg: ConnectivitySettings,
    gpus: int,
    efa: int | None,
    size: int,
    keys: NodeKeys,
) -> dict[str, Any]:
    """The MPIJob for one pair: one worker on each node (node affinity to the two, anti-affinity
    between the workers), tolerating the health taint (a node under a deep check carries it).
    `size`: the largest message, the one the bandwidth threshold is set at."""
    command = [part.format(ranks=2 * gpus, gpus=gpus, size=size) for part in cfg.command]
    limits: dict[str, Any] = {"nvidia.com/gpu": gpus}
    if efa:
        limits["vpc.amazonaws.com/efa"] = efa
    labels = {"app.kubernetes.io/name": "node-health-connectivity"}
    tolerations = [{"key": keys.taint_key, "operator": "Exists", "effect": "NoSchedule"}]
    worker_spec = {
        "tolerations": tolerations,
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": list(pair),
                                }
                            ]
                        }
                    ]
                }
            },
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {JOB_NAME_LABEL: name}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            },
        },
        "containers": [
            {
                "name": "worker",
                "image": cfg.image,
                "resources": {"limits": limits, "requests": dict(limits)},
            }
        ],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MPIJob",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {
            "slotsPerWorker": gpus,
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": 2,
                "activeDeadlineSeconds": int(cfg.timeout),
            },
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    # the operator's place for it (one in the pod template is overridden)
                    "restartPolicy": "OnFailure",
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "tolerations": tolerations,
                            "containers": [
                                {"name": "launcher", "image": cfg.image, "command": command}
                            ],
                        },
                    },
                },
                "Worker": {
                    "replicas": 2,
                    "restartPolicy": "Never",
                    "template": {"metadata": {"labels": labels}, "spec": worker_spec},
                },
            },
        },
    }


class Connectivity:
    def __init__(
        self,
        client: KubeClient,
        cfg: ConnectivitySettings,
        keys: NodeKeys,
        say: Callable[[Event], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client, self.cfg, self.keys, self.say = client, cfg, keys, say
        self.clock, self.sleep, self.stopped = clock, sleep, stopped
        self.run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:4]

    def check(
        self, names: list[str], mark: bool = True, partners: Sequence[str] = ()
    ) -> dict[str, Verdict]:
        """Test `names` (one instance type, at least two with `partners`); label them unless
        not `mark`. `partners`: nodes known good to test against (they are not labelled)."""
        nodes = {n["metadata"]["name"]: n for n in self.client.list_nodes("")}
        missing = sorted((set(names) | set(partners)) - set(nodes))
        if missing:
            raise ConnectivityError(f"no such nodes: {', '.join(missing)}")
        if len(set(names) | set(partners)) < 2:
            raise ConnectivityError("the connectivity check needs at least two nodes")
        every = [*names, *partners]
        types = {(nodes[n]["metadata"].get("labels") or {}).get(TYPE_LABEL) for n in every}
        if len(types) != 1 or None in types:
            raise ConnectivityError(
                f"the nodes must share one instance type ({TYPE_LABEL}); found "
                f"{sorted(str(t) for t in types)}"
            )
        itype = types.pop()
        want = expected(itype)
        if not want.gpus:
            raise ConnectivityError(f"no GPU count known for {itype} (checks/instance_types.yaml)")
        threshold = nccl.threshold_for(itype)
        fleet = sum(
            1
            for n in nodes.values()
            if self.keys.health_status_label in (n["metadata"].get("labels") or {})
        )
        pairs_at_once = max(1, int(self.cfg.max_share * max(fleet, len(names))) // 2)
        planner = Planner(sorted(set(names)), good=set(partners) - set(names))
        results: list[PairResult] = []
        running: dict[str, tuple[Pair, float]] = {}
        self._say(
            "info",
            f"connectivity check {self.run_id}: {len(set(names))} {itype} nodes, "
            f"at most {pairs_at_once} pairs at once",
        )
        while True:
            for pair in planner.next_pairs(pairs_at_once - len(running)):
                name = f"nh-conn-{self.run_id}-{len(results) + len(running)}"
                size = threshold.size if threshold else DEFAULT_SIZE
                body = mpijob(name, pair, self.cfg, want.gpus, want.efa_devices, size, self.keys)
                try:
                    self.client.create_object(GROUP, VERSION, self.cfg.namespace, PLURAL, body)
                except KubeError as exc:
                    why = str(exc)
                    if exc.status == 404:
                        why = NOT_SERVED
                    result = PairResult(pair, None, f"cannot create the MPIJob: {why}")
                    planner.record(pair, None)
                    results.append(result)
                    self._pair_said(result)
                    continue
                running[name] = (pair, self.clock())
            if not running:
                break
            self.sleep(self.cfg.poll)
            if self.stopped():
                for name in running:
                    self._delete(name)
                raise Interrupted(f"connectivity check {self.run_id} interrupted")
            for name, (pair, started) in list(running.items()):
                result = self._look(name, pair, started, threshold)
                if result is not None:
                    del running[name]
                    planner.record(pair, result.passed)
                    results.append(result)
                    self._pair_said(result)
        verdicts = planner.verdicts()
        if mark:
            for node, verdict in verdicts.items():
                if self.stopped():
                    raise Interrupted(f"connectivity check {self.run_id} interrupted")
                self._mark(node, verdict, [r for r in results if node in r.pair])
        return verdicts

    def _look(
        self, name: str, pair: Pair, started: float, threshold: nccl.BusBandwidth | None
    ) -> PairResult | None:
        try:
            job = self.client.get_object(GROUP, VERSION, self.cfg.namespace, PLURAL, name)
        except KubeError as exc:
            if exc.retryable:
                return None
            return PairResult(pair, None, f"MPIJob {name} unreadable: {exc}")
        state = {
            c.get("type"): c
            for c in (job.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        if "Succeeded" not in state and "Failed" not in state:
            if self.clock() - started <= self.cfg.timeout:
                return None
            self._delete(name)
            return PairResult(pair, None, f"no result within {self.cfg.timeout:g}s")
        log = self._launcher_log(name)
        self._delete(name)
        run = nccl.parse(log)
        # Succeeded: the launcher exited 0 (the operator says so). Its log is judged as a saved
        # output is: the table, with or without the summary (kubelet may have rotated it).
        [finding] = nccl.judge(run, threshold, None if "Succeeded" in state else 1)
        busbw, figures = finding.evidence.get("busbw"), nccl_figures(log)
        if finding.status is Status.OK:
            return PairResult(pair, True, finding.message, busbw, figures)
        if finding.status is Status.FAULT:
            return PairResult(pair, False, finding.message, busbw, figures)
        return PairResult(pair, None, finding.message)

    def _launcher_log(self, name: str) -> str:
        try:
            pods = self.client.list_pods(
                self.cfg.namespace, f"{JOB_NAME_LABEL}={name},{JOB_ROLE_LABEL}=launcher"
            )
            if not pods:
                return ""
            return self.client.pod_log(self.cfg.namespace, pods[-1]["metadata"]["name"])
        except KubeError:
            return ""

    def _delete(self, name: str) -> None:
        # On failure its activeDeadlineSeconds ends it; the name is this run's alone.
        with contextlib.suppress(KubeError):
            self.client.delete_object(GROUP, VERSION, self.cfg.namespace, PLURAL, name)

    def _mark(self, node: str, verdict: Verdict, results: list[PairResult]) -> None:
        keys = self.keys
        record = {
            "run": self.run_id,
            "verdict": str(verdict),
            "tests": [
                {
                    "with": next(n for n in r.pair if n != node),
                    "passed": r.passed,
                    "busbw": r.busbw,
                    "message": r.message,
                    **({"figures": r.figures} if r.figures else {}),
                }
                for r in results
            ],
        }
        labels: dict[str, Any] = {}
        if verdict is Verdict.FAILED:
            labels[keys.deep_health_check_label] = "Failed"
            labels[keys.health_status_label] = "UnschedulablePendingReplacement"
        elif verdict is Verdict.PASSED:
            labels[keys.deep_health_check_label] = "Passed"
        # A request on the node is answered by this result, whoever ran it.
        notes = {
            keys.connectivity_result_annotation: json.dumps(record),
            keys.connectivity_request_annotation: None,
        }
        patch = {"metadata": {"labels": labels, "annotations": notes}}
        try:
            self.client.patch_node(node, patch, MERGE)
        except KubeError as exc:
            self._say("error", f"{node}: the result could not be written: {exc}", node=node)
        level = {Verdict.FAILED: "error", Verdict.PASSED: "info", Verdict.UNKNOWN: "warn"}[verdict]
        msg = {
            Verdict.FAILED: "Encountered FaultyInstance. Replace the Instance. "
            "InstanceConnectivity failed against nodes known good",
            Verdict.PASSED: "InstanceConnectivity passed",
            Verdict.UNKNOWN: "InstanceConnectivity could not decide (no node known good to "
            "compare with, or the test did not run)",
        }[verdict]
        self._say(
            level,
            f"{node}: {msg}",
            node=node,
            verdict=str(verdict),
            reason=f"InstanceConnectivity{verdict}",
        )

    def _pair_said(self, r: PairResult) -> None:
        outcome = {True: "passed", False: "fell short", None: "could not decide"}[r.passed]
        level = {True: "info", False: "warn", None: "warn"}[r.passed]
        self._say(
            level,
            f"{r.pair[0]} + {r.pair[1]}: {outcome}: {r.message}",
            pair=list(r.pair),
            busbw=r.busbw,
        )

    def _say(self, level: str, msg: str, **fields: Any) -> None:
        event: Event = {"level": level, "ts": rfc3339(time.time()), "msg": msg}
        event.update(check="InstanceConnectivity", run=self.run_id, **fields)
        self.say(event)
