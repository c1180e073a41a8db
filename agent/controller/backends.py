"""Who reboots or replaces a node once the controller has drained it: SageMaker HyperPod, EC2,
or nobody (report only). Each takes instance ids and says, per id, what happened.

- `sagemaker`: BatchRebootClusterNodes / BatchReplaceClusterNodes, 1 to 25 node ids a call (the
  API's limit). `InstanceIdInUse` means a recovery of that node is already running: not an
  error, the node is on its way.
- `ec2`: RebootInstances; for a replacement TerminateInstances, so that the instance's Auto
  Scaling group (an EKS managed node group's) launches a new one.
- `none`: nothing is done; the controller reports what it would have asked for.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

BATCH = 25  # SageMaker's NodeIds: 1 to 25


class Action(enum.StrEnum):
    REBOOT = "reboot"
    REPLACE = "replace"


class Result(enum.StrEnum):
    STARTED = "started"  # asked for, and accepted
    IN_PROGRESS = "in_progress"  # already under way (not by this call): fine
    FAILED = "failed"  # refused for this node; the message says why
    SKIPPED = "skipped"  # the `none` backend: only reported


@dataclass(frozen=True)
class Outcome:
    instance_id: str
    result: Result
    message: str = ""


class Backend(Protocol):
    name: str

    def act(self, action: Action, instance_ids: list[str]) -> list[Outcome]: ...


def _chunks(ids: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(ids), n):
        yield ids[i : i + n]


class NoneBackend:
    name = "none"

    def act(self, action: Action, instance_ids: list[str]) -> list[Outcome]:
        return [Outcome(i, Result.SKIPPED, f"would {action} (backend none)") for i in instance_ids]


class SageMakerBackend:
    name = "sagemaker"

    def __init__(self, cluster_name: str, client: Any = None) -> None:
        self.cluster = cluster_name
        self.client = client

    def act(self, action: Action, instance_ids: list[str]) -> list[Outcome]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        call = (
            client.batch_reboot_cluster_nodes
            if action is Action.REBOOT
            else client.batch_replace_cluster_nodes
        )
        out: list[Outcome] = []
        for chunk in _chunks(instance_ids, BATCH):
            try:
                answer = call(ClusterName=self.cluster, NodeIds=chunk)
            except (ClientError, BotoCoreError) as exc:
                out += [Outcome(i, Result.FAILED, str(exc)) for i in chunk]
                continue
            out += [Outcome(i, Result.STARTED) for i in answer.get("Successful") or []]
            for f in answer.get("Failed") or []:
                code, msg = f.get("ErrorCode", ""), f.get("Message", "")
                result = Result.IN_PROGRESS if code == "InstanceIdInUse" else Result.FAILED
                out.append(Outcome(f["NodeId"], result, f"{code}: {msg}".strip(": ")))
        return out

    def _client(self) -> Any:
        if self.client is None:
            import boto3

            self.client = boto3.client("sagemaker")
        return self.client


class Ec2Backend:
    name = "ec2"

    def __init__(self, client: Any = None) -> None:
        self.client = client

    def act(self, action: Action, instance_ids: list[str]) -> list[Outcome]:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.client is None:
            import boto3

            self.client = boto3.client("ec2")
        out = []
        for i in instance_ids:  # one by one: one unknown id must not fail the others
            try:
                if action is Action.REBOOT:
                    self.client.reboot_instances(InstanceIds=[i])
                else:
                    self.client.terminate_instances(InstanceIds=[i])
            except (ClientError, BotoCoreError) as exc:
                out.append(Outcome(i, Result.FAILED, str(exc)))
                continue
            out.append(Outcome(i, Result.STARTED))
        return out


def backend(name: str, cluster_name: str | None = None) -> Backend:
    if name == "sagemaker":
        if not cluster_name:
            raise ValueError("the sagemaker backend needs cluster_name")
        return SageMakerBackend(cluster_name)
    if name == "ec2":
        return Ec2Backend()
    if name == "none":
        return NoneBackend()
    raise ValueError(f"unknown remediation backend {name!r} (sagemaker, ec2, none)")
