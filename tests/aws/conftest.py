"""moto's CloudWatch Logs in server mode, over real HTTP, for the agent and for the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

REGION = "us-west-2"


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on a free port; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    reset(url)  # moto keeps its state per process, not per server: start each test afresh
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def moto_url():
    with moto_server() as url:
        yield url


def reset(url: str) -> None:
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))


def aws_env(url: str) -> dict[str, str]:
    """What the agent's process needs to talk to `url` as if it were AWS."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def logs_client(url: str):
    import boto3

    return boto3.client(
        "logs",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def all_events(url: str, group: str, stream: str) -> list[dict]:
    client = logs_client(url)
    out, token = [], None
    while True:
        kw = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        if token:
            kw["nextToken"] = token
        page = client.get_log_events(**kw)
        out += page["events"]
        if page.get("nextForwardToken") in (None, token):
            return out
        token = page["nextForwardToken"]
