"""`node-health logs tail` against moto: the agent's streams only, one node, the deep-check
streams, --since, --filter, the three formats, and --follow with no duplicates and no gaps."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest

from agent import logs_tail as lt
from tests.aws.conftest import aws_env, logs_client
from tests.conftest import wait_for
from tests.test_cli import node_health

GROUP = "/aws/sagemaker/Clusters/train-1/abc123"
A = "SagemakerHealthMonitoringAgent/gpu-workers/i-0aaa"
B = "SagemakerHealthMonitoringAgent/gpu-workers/i-0bbb"
DEEP = "DeepHealthCheckResults/20261123T100000Z-1a2b3c4d"


def put(url: str, stream: str, *events: dict, ago: float = 0) -> None:
    client = logs_client(url)
    for make, kw in (
        (client.create_log_group, {"logGroupName": GROUP}),
        (client.create_log_stream, {"logGroupName": GROUP, "logStreamName": stream}),
    ):
        with contextlib.suppress(client.exceptions.ResourceAlreadyExistsException):
            make(**kw)
    now = int((time.time() - ago) * 1000)
    client.put_log_events(
        logGroupName=GROUP,
        logStreamName=stream,
        logEvents=[{"timestamp": now, "message": json.dumps(e)} for e in events],
    )


def ev(msg: str, node: str = "node-a", level: str = "info", **more) -> dict:
    return {"level": level, "ts": "2026-11-23T10:00:00Z", "msg": msg, "node": node, **more}


def tail(cli_env, url: str, *args: str) -> list[str]:
    out = node_health(cli_env | aws_env(url), "logs", "tail", "--log-group", GROUP, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.fixture
def seeded(moto_url):
    put(
        moto_url,
        A,
        ev("first on a"),
        ev("NPD caught event: Xid", level="error", reason="XidHardwareFailure"),
    )
    put(moto_url, B, ev("on b", node="node-b"))
    put(moto_url, "some-other-stream", ev("not ours"))
    put(moto_url, DEEP, ev("Deep health check passed.", deep_health_check_status="Passed"))
    put(moto_url, A, ev("long ago"), ago=3 * 3600)
    return moto_url


def test_the_agents_detection_streams_since_10_minutes(cli_env, seeded):
    lines = tail(cli_env, seeded, "--format", "short")
    assert [line.split(None, 2)[2] for line in lines] == [
        "first on a",
        "NPD caught event: Xid",
        "on b",
    ]
    assert lines[1].startswith("2026-11-23T10:00:00Z error")


def test_one_node_one_instance_and_the_deep_check_streams(cli_env, seeded):
    assert [
        json.loads(x)["msg"] for x in tail(cli_env, seeded, "--node", "node-b", "--format", "json")
    ] == ["on b"]
    assert len(tail(cli_env, seeded, "--instance-id", "i-0aaa")) == 2
    [deep] = tail(cli_env, seeded, "--deep-health", "--format", "detailed")
    assert DEEP in deep and '"deep_health_check_status":"Passed"' in deep
    assert len(tail(cli_env, seeded, "--since", "4h")) == 4


def test_a_filter_pattern_goes_to_cloudwatch(cli_env, seeded):
    lines = tail(cli_env, seeded, "--filter", "XidHardwareFailure", "--format", "json")
    assert [json.loads(x)["msg"] for x in lines] == ["NPD caught event: Xid"]


def test_follow_prints_each_new_event_once(cli_env, moto_url):
    put(moto_url, A, ev("before"))
    env = cli_env | aws_env(moto_url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "logs",
            "tail",
            "--log-group",
            GROUP,
            "--follow",
            "--interval",
            "0.2",
            "--format",
            "json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        import threading

        threading.Thread(
            target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
        ).start()
        wait_for(lambda: len(lines) == 1, 20)
        for i in range(5):
            put(moto_url, A if i % 2 else B, ev(f"new {i}"))
            time.sleep(0.1)
        put(moto_url, A, ev("late but in time"), ago=30)  # indexed late: still within look-back
        wait_for(lambda: len(lines) == 7, 20)
        time.sleep(1.0)  # several more polls: nothing printed twice
    finally:
        proc.terminate()
        proc.wait(10)
    msgs = [json.loads(x)["msg"] for x in lines]
    assert sorted(msgs) == sorted(["before", *(f"new {i}" for i in range(5)), "late but in time"])


def test_since_accepts_durations_and_times_and_refuses_the_rest():
    assert lt.since_ms("10m", now=1000.0) == 400_000
    assert lt.since_ms("2026-11-23T10:00:00Z") == 1795428000000
    with pytest.raises(ValueError, match="neither a duration"):
        lt.since_ms("yesterday")


def test_colored_levels_on_a_terminal():
    event = {"timestamp": 0, "message": json.dumps(ev("x", level="error"))}
    assert "\x1b[31merror" in lt.render(event, "short", color=True)
    assert "\x1b[" not in lt.render(event, "short", color=False)


def test_the_region_comes_from_aws_region_as_the_sdks_read_it(cli_env, seeded, moto_url) -> None:
    env = cli_env | aws_env(moto_url)
    del env["AWS_DEFAULT_REGION"]
    out = node_health(env | {"AWS_REGION": "us-west-2"}, "logs", "tail", "--log-group", GROUP)
    assert out.returncode == 0 and out.stderr == ""


def test_no_region_at_all_is_one_line_and_exit_2(cli_env, tmp_path) -> None:
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_")}
    env |= {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    out = node_health(env, "logs", "tail", "--log-group", GROUP)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "node-health: no AWS region: give --region, set cloudwatch.region or AWS_REGION"
    ]


def test_stream_names_and_a_stream_prefix_instead_of_the_agents_streams(cli_env, seeded):
    names = tail(
        cli_env, seeded, "--log-stream-names", B, "--log-stream-names", "some-other-stream"
    )
    assert sorted(line.split(None, 2)[2] for line in names) == ["not ours", "on b"]
    prefixed = tail(cli_env, seeded, "--log-stream-name-prefix", "some-", "-o", "json")
    assert [json.loads(x)["msg"] for x in prefixed] == ["not ours"]
    both = node_health(
        cli_env | aws_env(seeded),
        *("logs", "tail", "--log-group", GROUP, "--log-stream-names", A),
        *("--log-stream-name-prefix", "x"),
    )
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_since_epoch_seconds_and_an_offset_as_aws_logs_tail_takes_them(cli_env, seeded):
    hours_ago = time.time() - 4 * 3600
    assert len(tail(cli_env, seeded, "--since", str(int(hours_ago)))) == 4
    local = time.strftime("%Y-%m-%dT%H:%M:%S+02:00", time.gmtime(hours_ago + 7200))
    assert len(tail(cli_env, seeded, "--since", local)) == 4
    assert len(tail(cli_env, seeded, "--since", "1.5h")) == 3


def test_output_is_the_format_by_another_name(cli_env, seeded):
    assert tail(cli_env, seeded, "-o", "json") == tail(cli_env, seeded, "--format", "json")
    assert tail(cli_env, seeded, "-o", "wide") == tail(cli_env, seeded, "--format", "detailed")
    clash = node_health(
        cli_env | aws_env(seeded),
        "logs",
        "tail",
        "--log-group",
        GROUP,
        "-o",
        "json",
        "--format",
        "short",
    )
    assert clash.returncode == 2


def test_color_on_and_off_and_no_color_in_auto(cli_env, seeded):
    assert any("\x1b[31merror" in line for line in tail(cli_env, seeded, "--color", "on"))
    env = cli_env | {"NO_COLOR": "1"}
    assert any("\x1b[31m" in line for line in tail(env, seeded, "--color", "on"))  # a flag wins
    from agent.terminal import color

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert color("auto", Terminal())  # type: ignore[arg-type]
    assert not color("off", Terminal())  # type: ignore[arg-type]


def test_no_color_on_a_terminal_in_auto(cli_env, seeded, monkeypatch):
    from agent.terminal import color

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("NO_COLOR", "1")
    assert not color("auto", Terminal())  # type: ignore[arg-type]
    monkeypatch.setenv("NO_COLOR", "")  # set but empty: no effect (no-color.org)
    assert color("auto", Terminal())  # type: ignore[arg-type]


def test_follow_waits_for_a_group_that_does_not_exist_yet(cli_env, moto_url):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "logs",
            "tail",
            "--log-group",
            GROUP,
            "--follow",
            *("--interval", "0.2", "--format", "json"),
        ],
        env=cli_env | aws_env(moto_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    said: list[str] = []
    try:
        import threading

        for stream, into in ((proc.stdout, lines), (proc.stderr, said)):
            threading.Thread(
                target=lambda s=stream, i=into: i.extend(iter(s.readline, "")), daemon=True
            ).start()
        wait_for(lambda: said, 20)  # it found no group, and says it waits
        time.sleep(0.6)  # several more polls of a group that is not there
        assert proc.poll() is None
        put(moto_url, A, ev("first"))
        wait_for(lambda: len(lines) == 1, 20)
    finally:
        proc.terminate()
        proc.wait(10)
    assert json.loads(lines[0])["msg"] == "first"
    assert said == [f"node-health: waiting for log group {GROUP}\n"]


def test_without_follow_a_missing_group_is_an_error(cli_env, moto_url):
    out = node_health(cli_env | aws_env(moto_url), "logs", "tail", "--log-group", GROUP)
    assert out.returncode == 2 and "ResourceNotFoundException" in out.stderr
