"""Shipping through a proxy that holds moto to CloudWatch's real limits and injects faults:
throttling, 5xx, connection resets and a `kill -9` mid-ship lose nothing; a burst goes out in
the fewest PutLogEvents calls the limits allow."""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.aws.conftest import aws_env
from tests.aws.proxy import LogsProxy
from tests.conftest import wait_for
from tests.test_daemon import start, stop

QUIET = (
    "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n  fixed: {enabled: false}\n"
    "cluster_name: train-1\ncluster_id: abc123\nnode_group: gpu-workers\n"
    "instance_id: i-0123456789abcdef0\ncloudwatch: {flush_interval: 0.1s}\n"
)


@pytest.fixture
def proxy(moto_url):
    with LogsProxy(moto_url) as p:
        yield p


def spool_events(state: Path, n: int, size: int = 40) -> None:
    """`n` events already in the spool, as a daemon that could not ship them left them."""
    spool = state / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (spool / "0000000001.jsonl").open("w") as f:
        for i in range(n):
            event = {"level": "info", "ts": now, "msg": f"event {i} " + "x" * size, "seq": i}
            f.write(json.dumps(event, separators=(",", ":")) + "\n")


def seqs(proxy: LogsProxy) -> Counter:
    return Counter(
        json.loads(e["message"]).get("seq") for e in proxy.events() if '"seq"' in e["message"]
    )


def run_until_shipped(env, tmp_path, proxy, n: int, timeout: float = 60) -> None:
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    proc = start(env | aws_env(proxy.url), "--config", str(cfg))
    try:
        wait_for(lambda: len(seqs(proxy)) == n, timeout)
    finally:
        stop(proc)


def test_throttling_5xx_and_resets_lose_nothing(cli_env, tmp_path, proxy):
    spool_events(tmp_path / "state", 3000)
    proxy.faults.extend(["throttle", "500", "reset", "503", "throttle"])
    run_until_shipped(cli_env, tmp_path, proxy, 3000)
    counts = seqs(proxy)
    assert set(counts) == set(range(3000)) and max(counts.values()) == 1
    assert not proxy.faults  # every fault was met and got past
    assert proxy.refused == []


def full(puts: list[dict]) -> bool:
    """Every batch but the last is full: the next event would have broken a limit."""
    for batch, after in itertools.pairwise(puts):
        size = sum(len(e["message"].encode()) + 26 for e in batch["logEvents"])
        nxt = len(after["logEvents"][0]["message"].encode()) + 26
        if len(batch["logEvents"]) < 10_000 and size + nxt <= 1_048_576:
            return False
    return True


def test_a_burst_goes_out_in_the_fewest_calls_the_limits_allow(cli_env, tmp_path, proxy):
    spool_events(tmp_path / "state", 25_000, size=0)  # small events: the count limit binds
    run_until_shipped(cli_env, tmp_path, proxy, 25_000)
    # 25,000 and the daemon's own few: 3 calls, the first two of 10,000
    assert [len(p["logEvents"]) for p in proxy.puts][:2] == [10_000, 10_000]
    assert len(proxy.puts) == 3 and full(proxy.puts) and proxy.refused == []


def test_big_events_fill_batches_by_bytes(cli_env, tmp_path, proxy):
    spool_events(tmp_path / "state", 300, size=20_000)  # about 20 KB each: bytes bind
    run_until_shipped(cli_env, tmp_path, proxy, 300)
    assert proxy.refused == []
    assert full(proxy.puts) and len(proxy.puts) == 6  # 300 x ~20 KB: about 6 MB


def test_kill_9_mid_ship_loses_nothing(cli_env, tmp_path, proxy):
    """The agent dies while CloudWatch holds a batch; after a restart every event arrives,
    duplicates at most that one batch."""
    state = tmp_path / "state"
    spool_events(state, 30_000)
    proxy.faults.append("hold:2")
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    env = cli_env | aws_env(proxy.url)
    proc = start(env, "--config", str(cfg))
    wait_for(proxy.inflight.is_set, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(2.5)  # the held batch reaches moto after its sender died
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: len(seqs(proxy)) == 30_000, 60)
    finally:
        stop(proc)
    counts = seqs(proxy)
    assert set(counts) == set(range(30_000))
    assert sum(n - 1 for n in counts.values()) <= 10_000  # at most one batch twice


def test_events_cloudwatch_rejects_as_too_old_are_counted_not_retried(cli_env, tmp_path, proxy):
    state = tmp_path / "state"
    spool_events(state, 10)
    old = {"level": "info", "ts": "2020-01-01T00:00:00Z", "msg": "from long ago", "seq": 10}
    with (state / "spool" / "0000000001.jsonl").open("r+") as f:
        lines = f.readlines()
        f.seek(0)
        f.writelines([json.dumps(old) + "\n", *lines])
    run_until_shipped(cli_env, tmp_path, proxy, 10)
    assert 10 not in seqs(proxy)  # CloudWatch left it out; the rest arrived
    assert len(proxy.puts) == 1  # and the batch was not sent again


def test_access_denied_is_said_once_and_retried(cli_env, tmp_path, proxy):
    spool_events(tmp_path / "state", 5)
    proxy.faults.extend(["denied"] * 3)
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    proc = start(cli_env | aws_env(proxy.url), "--config", str(cfg))
    try:
        wait_for(lambda: len(seqs(proxy)) == 5, 60)
    finally:
        stop(proc)
    errors = [line for line in proc.stderr.read().splitlines() if "cloudwatch_ship_failed" in line]
    assert len(errors) == 1 and "AccessDeniedException" in errors[0]
    assert "logs:PutLogEvents permission" in errors[0]


def test_an_outage_shows_in_the_backlog_metrics(cli_env, tmp_path, proxy):
    """Every PutLogEvents refused (503): the spool depth and the lag grow from the start,
    as alerts on them need; once CloudWatch is back, both come down to 0."""
    from tests.test_daemon import _answers, free_port, get

    state = tmp_path / "state"
    spool = state / "spool"
    spool.mkdir(parents=True)
    ten_minutes_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 600))
    event = {"level": "info", "ts": ten_minutes_ago, "msg": "from before the outage", "seq": 0}
    (spool / "0000000001.jsonl").write_text(json.dumps(event) + "\n")
    proxy.faults.extend(["503"] * 4)
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    port = free_port()
    env = cli_env | aws_env(proxy.url) | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}

    def metric(name: str) -> float:
        body = get(f"http://127.0.0.1:{port}/metrics")[1]
        return next(float(x.split()[-1]) for x in body.splitlines() if x.startswith(name + " "))

    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: _answers(port))
        wait_for(lambda: metric("node_health_cloudwatch_retries_total") >= 1, 30)
        during = (
            metric("node_health_cloudwatch_spool_depth_bytes"),
            metric("node_health_cloudwatch_lag_seconds"),
            metric('node_health_sink_errors_total{sink="cloudwatch"}'),
        )
        wait_for(lambda: 0 in seqs(proxy), 60)
        wait_for(lambda: metric("node_health_cloudwatch_spool_depth_bytes") == 0)
        after = metric("node_health_cloudwatch_lag_seconds")
    finally:
        stop(proc)
    depth, lag, errors = during
    assert depth > 0 and lag >= 600 and errors >= 1
    assert after == 0


def test_too_old_events_are_counted_one_each(cli_env, tmp_path, proxy):
    """CloudWatch's tooOldLogEventEndIndex is exclusive (the API reference): two events too
    old in a batch are two rejected, not one or three."""
    from tests.test_daemon import _answers, free_port, get

    state = tmp_path / "state"
    spool_events(state, 5)
    old = [
        {"level": "info", "ts": f"2020-01-01T00:00:0{i}Z", "msg": "old", "seq": 10 + i}
        for i in range(2)
    ]
    with (state / "spool" / "0000000001.jsonl").open("r+") as f:
        lines = f.readlines()
        f.seek(0)
        f.writelines([json.dumps(e) + "\n" for e in old] + lines)
    port = free_port()
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    env = cli_env | aws_env(proxy.url) | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: len(seqs(proxy)) == 5, 60)
        wait_for(lambda: _answers(port))
        body = get(f"http://127.0.0.1:{port}/metrics")[1]
    finally:
        stop(proc)
    line = next(x for x in body.splitlines() if x.startswith("node_health_cloudwatch_rejected"))
    assert float(line.split()[-1]) == 2


def test_an_oversized_event_arrives_cut_and_still_json_with_hyperpods_keys(
    cli_env, tmp_path, proxy
):
    """A 600 KB detection event: CloudWatch takes it cut to its size limit, still an object
    that Logs Insights and JSON filter patterns find by its keys."""
    from tests.test_events import huge_detection

    state = tmp_path / "state"
    spool_events(state, 1)
    event = huge_detection("NVRM: Xid (PCI:0000:b9:00): 79, " + "x" * 200_000)
    event |= {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seq": 1}
    with (state / "spool" / "0000000001.jsonl").open("a") as f:
        f.write(json.dumps(event, separators=(",", ":")) + "\n")
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text(QUIET)
    proc = start(cli_env | aws_env(proxy.url), "--config", str(cfg))
    try:
        wait_for(lambda: any("): 79, xxx" in e["message"] for e in proxy.events()), 30)
    finally:
        stop(proc)
    [big] = [e["message"] for e in proxy.events() if "): 79, xxx" in e["message"]]
    assert len(big.encode()) <= 262_144 - 26 and proxy.refused == []
    got = json.loads(big)
    assert got["HealthMonitoringAgentDetectionEvent"] == "HealthEvent"
    assert (got["node"], got["check"], got["seq"]) == ("node-a", "kernel-log", 1)
    assert got["message"].startswith("NVRM: Xid (PCI:0000:b9:00): 79, ")
    assert "message" in got["truncated"]
