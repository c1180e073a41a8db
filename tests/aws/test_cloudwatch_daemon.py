"""The daemon ships its events to CloudWatch Logs (moto in server mode, real HTTP): HyperPod's
log group and streams, every spooled event there, deep-check results in their own stream."""

from __future__ import annotations

import json

from tests.aws.conftest import all_events, aws_env, logs_client
from tests.conftest import spooled, wait_for
from tests.test_daemon import faulty, start, stop

GROUP = "/aws/sagemaker/Clusters/train-1/abc123"
STREAM = "SagemakerHealthMonitoringAgent/gpu-workers/i-0123456789abcdef0"


def identity(config: str, more: str = "") -> str:
    with open(config, "a") as f:
        f.write(
            "cluster_name: train-1\ncluster_id: abc123\nnode_group: gpu-workers\n"
            "instance_id: i-0123456789abcdef0\ncloudwatch: {flush_interval: 0.2s}\n" + more
        )
    return config


def streams(url: str) -> list[str]:
    try:
        answer = logs_client(url).describe_log_streams(logGroupName=GROUP)
    except Exception:
        return []
    return [s["logStreamName"] for s in answer["logStreams"]]


def test_every_spooled_event_reaches_hyperpods_stream(cli_env, tmp_path, moto_url):
    env = cli_env | aws_env(moto_url)
    state = tmp_path / "state"
    proc = start(env, "--config", identity(faulty(tmp_path)))
    try:
        wait_for(lambda: any("verdict" in e for e in spooled(state)))
        wait_for(lambda: STREAM in streams(moto_url))
        wait_for(lambda: len(all_events(moto_url, GROUP, STREAM)) >= len(spooled(state)))
    finally:
        stop(proc)
    shipped = [json.loads(e["message"]) for e in all_events(moto_url, GROUP, STREAM)]
    assert shipped == spooled(state)  # the same events, in order, each once
    first = all_events(moto_url, GROUP, STREAM)[0]["message"]
    assert first.startswith('{"level":')  # HyperPod's shape: level, ts, msg first
    cursor = json.loads((state / "cloudwatch.cursor").read_text())
    assert cursor["offset"] > 0


def test_deep_check_results_go_to_their_own_stream(cli_env, tmp_path, moto_url):
    from tests.conftest import whole_table
    from tests.test_daemon import with_tools

    env = with_tools(cli_env, tmp_path) | aws_env(moto_url)
    env["FAKE_DCGMI_OUTPUT"] = str(whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt"))
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        "deep_check: {on_first_start: true, level: 1}\n"
    )
    proc = start(env, "--config", identity(str(cfg)))

    def shipped() -> bool:  # the result in its stream, not only the stream made
        found = [s for s in streams(moto_url) if s.startswith("DeepHealthCheckResults/")]
        return bool(found) and bool(all_events(moto_url, GROUP, found[0]))

    try:
        wait_for(shipped, 30)
    finally:
        stop(proc)
    [deep] = [s for s in streams(moto_url) if s.startswith("DeepHealthCheckResults/")]
    [result] = [json.loads(e["message"]) for e in all_events(moto_url, GROUP, deep)]
    assert result["deep_health_check_status"] == "Passed"
    assert deep == f"DeepHealthCheckResults/{result['deep_health_check_id']}"
    assert result["msg"].startswith("Deep health check passed.")


def test_shipping_shows_in_the_metrics(cli_env, tmp_path, moto_url):
    from tests.test_daemon import free_port, get

    port = free_port()
    env = cli_env | aws_env(moto_url) | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    state = tmp_path / "state"
    proc = start(env, "--config", identity(faulty(tmp_path)))
    try:
        wait_for(lambda: any("verdict" in e for e in spooled(state)))

        def metric(name: str) -> float:
            _, body = get(f"http://127.0.0.1:{port}/metrics")
            line = next(x for x in body.splitlines() if x.startswith(name + " "))
            return float(line.split()[-1])

        shipped = "node_health_cloudwatch_shipped_events_total"
        depth = "node_health_cloudwatch_spool_depth_bytes"
        wait_for(lambda: metric(shipped) >= len(spooled(state)) and metric(depth) == 0)
        rejected = metric("node_health_cloudwatch_rejected_events_total")
    finally:
        stop(proc)
    assert rejected == 0


def test_a_backlog_is_stamped_when_detected_and_keeps_when_it_happened(cli_env, tmp_path, moto_url):
    """A kernel record from three hours ago, read now: CloudWatch files the event now (so
    `logs tail --follow` prints it), and `details.timestamp` says when it happened."""
    import os
    import time

    from tests.test_kernel_log_e2e import XID79, gpu_host

    root = gpu_host(tmp_path)
    happened = int(time.time()) - 3 * 3600
    (root / "proc/stat").write_text(f"btime {happened - 1843}\n")  # the record: 1843 s in
    env = cli_env | aws_env(moto_url) | {"NODE_HEALTH_HOST_ROOT": str(root)}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    cfg = identity(str(cfg))
    started = time.time()
    proc = start(env, "--config", cfg)
    kmsg = os.open(root / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(kmsg, f"3,812,1843000000,-;{XID79}\n".encode())

        def xid() -> list[dict]:
            found = all_events(moto_url, GROUP, STREAM)
            return [e for e in found if json.loads(e["message"]).get("check") == "kernel_log"]

        wait_for(lambda: bool(STREAM in streams(moto_url) and xid()), 20)
    finally:
        os.close(kmsg)
        stop(proc)
    [shipped] = xid()
    event = json.loads(shipped["message"])
    assert shipped["timestamp"] >= int(started) * 1000  # filed when it was seen
    assert event["ts"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(started)))
    assert event["details: "]["timestamp"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(happened)
    )
