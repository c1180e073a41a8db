"""The CloudWatch sink's cut-down botocore data (agent/ship/botocore_data): current, and a
client made with it reaches the same endpoints as one made with botocore's whole data."""

from __future__ import annotations

import functools
import json

import botocore
import botocore.session
import pytest
from botocore.config import Config

from agent.ship import aws
from tests.conftest import REPO

STALE = "stale: run `python -m agent.ship.aws` and commit the result"


def test_the_cut_data_is_current() -> None:
    """Against the botocore it was cut from (constraints.txt pins it, for the image). Another
    botocore (a plain `pip install`, newer) is given its own whole data: a test below."""
    if botocore.__version__ != aws.VERSION.read_text().strip():
        pytest.skip(f"botocore {botocore.__version__} here: the data is cut from another one")
    for path, text in aws.files().items():
        assert path.read_text() == text, f"{path.name}: {STALE}"


def test_the_cut_data_is_from_the_botocore_the_image_installs() -> None:
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines())
    assert aws.VERSION.read_text().strip() == pins["botocore"], STALE


@pytest.fixture(autouse=True)
def credentials(monkeypatch, tmp_path) -> None:
    """Test keys, and no file or metadata service to find others in."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)


@functools.cache
def _session() -> botocore.session.Session:
    return botocore.session.Session()


def whole(region: str, config: Config) -> botocore.client.BaseClient:
    """A client with botocore's whole data (one session: its data is loaded once)."""
    return _session().create_client("logs", region_name=region, config=config)


@pytest.mark.parametrize(
    "region",
    # a partition each (the ISO ones' dual-stack names are where the legacy data and the
    # endpoint rule sets part)
    [
        "us-east-1",
        "ap-southeast-5",
        "cn-north-1",
        "us-gov-west-1",
        "us-iso-east-1",
        "us-isob-east-1",
    ],
)
@pytest.mark.parametrize(
    "config",
    [
        Config(),
        Config(use_fips_endpoint=True),
        Config(use_dualstack_endpoint=True),
        Config(use_fips_endpoint=True, use_dualstack_endpoint=True),
    ],
    ids=["plain", "fips", "dualstack", "fips-dualstack"],
)
def test_the_same_endpoint_as_with_botocores_whole_data(region, config) -> None:
    cut, full = aws.logs_client(region, config), whole(region, config)
    assert cut.meta.service_model.operation_names == sorted(aws.OPERATIONS)  # the cut data
    assert (cut.meta.endpoint_url, cut.meta.region_name) == (
        full.meta.endpoint_url,
        full.meta.region_name,
    )
    # What a request is signed for and sent to comes from the endpoint rule set.
    params = {"logGroupName": "g", "logStreamName": "s"}
    cut_request = _prepared(cut, params)
    assert cut_request == _prepared(full, params)


def _prepared(client, params: dict) -> tuple[str, str]:
    """The URL and the credential scope of a CreateLogStream `client` would send."""
    seen: list[tuple[str, str]] = []

    def record(request, **kw):
        auth = request.headers.get("Authorization", b"").decode()
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/", 1)[1]
        seen.append((request.url, scope))
        raise _Sent

    client.meta.events.register("before-send.logs.CreateLogStream", record)
    with pytest.raises(_Sent):
        client.create_log_stream(**params)
    return seen[0]


class _Sent(Exception):
    pass


def test_another_botocore_gets_its_own_whole_data(tmp_path, monkeypatch) -> None:
    (tmp_path / "botocore_version").write_text("0.0.1\n")
    monkeypatch.setattr(aws, "VERSION", tmp_path / "botocore_version")
    client = aws.logs_client("us-east-1", Config())
    assert "FilterLogEvents" in client.meta.service_model.operation_names


def test_the_users_own_data_path_still_comes_first(tmp_path, monkeypatch) -> None:
    """AWS_DATA_PATH (botocore's setting for one's own endpoints and models) wins over ours."""
    endpoints = aws.cut_endpoints(json.loads((aws.DATA / "endpoints.json").read_text()))
    aws_partition = next(p for p in endpoints["partitions"] if p["partition"] == "aws")
    aws_partition["services"]["logs"]["endpoints"]["us-east-1"] = {"hostname": "logs.example"}
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    client = aws.logs_client("us-east-1", Config())
    assert client.meta.endpoint_url == "https://logs.example"
