"""Remediation backends: SageMaker HyperPod's batch calls against botocore's Stubber (which
checks each request against the service's published model and answers with its documented
shapes), EC2 against moto, and the fleet budget."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from agent.controller.backends import (
    Action,
    Ec2Backend,
    NoneBackend,
    Result,
    SageMakerBackend,
    backend,
)
from agent.controller.budget import Budget

IDS = [f"i-0{n:016x}" for n in range(30)]


def sagemaker():
    client = boto3.client(
        "sagemaker", region_name="us-west-2", aws_access_key_id="t", aws_secret_access_key="t"
    )
    return client, Stubber(client)


def test_sagemaker_reboot_in_batches_of_25_and_in_use_is_not_an_error() -> None:
    client, stub = sagemaker()
    stub.add_response(
        "batch_reboot_cluster_nodes",
        {
            "Successful": IDS[:24],
            "Failed": [
                {"NodeId": IDS[24], "ErrorCode": "InstanceIdInUse", "Message": "in recovery"}
            ],
        },
        {"ClusterName": "train-1", "NodeIds": IDS[:25]},
    )
    stub.add_response(
        "batch_reboot_cluster_nodes",
        {
            "Successful": IDS[25:29],
            "Failed": [
                {
                    "NodeId": IDS[29],
                    "ErrorCode": "InstanceIdNotFound",
                    "Message": "not in the cluster",
                }
            ],
        },
        {"ClusterName": "train-1", "NodeIds": IDS[25:]},
    )
    with stub:
        out = SageMakerBackend("train-1", client).act(Action.REBOOT, IDS)
    stub.assert_no_pending_responses()
    by_id = {o.instance_id: o for o in out}
    assert sum(o.result is Result.STARTED for o in out) == 28
    assert by_id[IDS[24]].result is Result.IN_PROGRESS
    assert by_id[IDS[29]].result is Result.FAILED
    assert by_id[IDS[29]].message == "InstanceIdNotFound: not in the cluster"


def test_sagemaker_replace_and_an_api_error_fails_the_batch_only() -> None:
    client, stub = sagemaker()
    stub.add_client_error(
        "batch_replace_cluster_nodes",
        service_error_code="ThrottlingException",
        http_status_code=400,
        expected_params={"ClusterName": "train-1", "NodeIds": IDS[:1]},
    )
    with stub:
        [outcome] = SageMakerBackend("train-1", client).act(Action.REPLACE, IDS[:1])
    assert outcome.result is Result.FAILED and "ThrottlingException" in outcome.message


def test_ec2_reboot_and_terminate_for_replacement() -> None:
    from moto import mock_aws

    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-west-2")
        image = ec2.describe_images()["Images"][0]["ImageId"]
        ids = [
            i["InstanceId"]
            for i in ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2)["Instances"]
        ]
        b = Ec2Backend(ec2)
        assert [o.result for o in b.act(Action.REBOOT, ids[:1])] == [Result.STARTED]
        out = b.act(Action.REPLACE, [ids[1], "i-0000000000000dead"])
        assert [o.result for o in out] == [Result.STARTED, Result.FAILED]
        state = ec2.describe_instances(InstanceIds=[ids[1]])["Reservations"][0]["Instances"][0]
        assert state["State"]["Name"] in ("shutting-down", "terminated")


def test_none_only_reports_and_names_are_checked() -> None:
    [o] = NoneBackend().act(Action.REPLACE, IDS[:1])
    assert (o.result, o.message) == (Result.SKIPPED, "would replace (backend none)")
    with pytest.raises(ValueError, match="needs cluster_name"):
        backend("sagemaker")
    with pytest.raises(ValueError, match="unknown remediation backend"):
        backend("magic")


def test_the_budget_caps_concurrent_and_hourly_remediations() -> None:
    b = Budget(concurrent=2, per_hour=3)
    assert b.refuses("a", 0) is None
    b.start("a", 0)
    b.start("b", 10)
    assert b.refuses("c", 20) == "2 nodes in remediation already (at most 2)"
    assert b.refuses("a", 20) is None  # already counted
    b.done("a")
    b.start("c", 30)
    b.done("b")
    assert b.refuses("d", 40) == "3 remediations started in the last hour (at most 3)"
    assert b.refuses("d", 3601) is None  # the first one is more than an hour ago
