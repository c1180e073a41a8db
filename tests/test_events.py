"""Events in HyperPod's CloudWatch log-stream format, so existing queries keep working."""

from __future__ import annotations

import json
import re

from agent.events import EventBuilder, dumps
from agent.identity import Identity
from agent.policy import Policy, PolicySettings, rule_table
from checks.api import Action, Finding, Status

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
IDENT = Identity("node-a", "i-0123456789abcdef0", "p4d.24xlarge", "us-west-2", "c", "id", "g")


def render_all(findings: list[Finding], dry_run: bool = False) -> list[dict]:
    ps = PolicySettings()
    policy = Policy(rule_table(ps), ps)
    builder = EventBuilder(IDENT, dry_run=dry_run)
    return [json.loads(dumps(builder.render(c))) for c in policy.observe(findings)]


XID71 = Finding(
    "gpu:0000:b9:00",
    "NvidiaGPUUnhealthy",
    Status.FAULT,
    "XidHardwareFailure",
    "NVRM: Xid (PCI:0000:b9:00): 71, pid=<unknown>, name=<unknown>, NVLink: fatal "
    "error detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
    Action.REBOOT,
    {"xid": 71},
    check="kernel-log",
    ts=1724281529.0,
)


def huge_detection(text: str) -> dict:
    """A kernel-log detection event whose message (and so `msg`, `details: ` and the
    evidence's line) is `text`."""
    from dataclasses import replace

    return render_all([replace(XID71, message=text, evidence={"line": text})])[0]


def test_every_event_starts_with_level_ts_msg() -> None:
    for event in render_all([XID71]):
        assert list(event)[:3] == ["level", "ts", "msg"]
        assert TS.match(event["ts"])


def test_detection_event_keeps_hyperpods_shape() -> None:
    event = render_all([XID71])[0]
    assert event["HealthMonitoringAgentDetectionEvent"] == "HealthEvent"
    details = event["details: "]
    assert details == {
        "severity": "warn",
        "timestamp": "2024-08-21T23:05:29Z",
        "reason": "XidHardwareFailure",
        "message": "Node condition NvidiaGPUUnhealthy is now: True, reason: XidHardwareFailure, "
        'message: "NVRM: Xid (PCI:0000:b9:00): 71, pid=<unknown>, name=<unknown>, NVLink: '
        'fatal error detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)"',
    }
    assert event["msg"] == "NPD caught event: " + details["message"]
    assert (event["check"], event["component"], event["action"]) == (
        "kernel-log",
        "gpu:0000:b9:00",
        "reboot",
    )
    assert event["evidence"] == {"xid": 71} and event["level"] == "error"


def test_ts_is_when_it_was_seen_and_details_timestamp_when_it_happened() -> None:
    ps = PolicySettings()
    [change, *_] = Policy(rule_table(ps), ps).observe([XID71])
    event = EventBuilder(IDENT).render(change, now=XID71.ts + 3 * 3600)  # read from a backlog
    assert event["ts"] == "2024-08-22T02:05:29Z"
    assert event["details: "]["timestamp"] == "2024-08-21T23:05:29Z"


def test_verdict_event_reads_like_hyperpods_deep_check_result() -> None:
    replace = Finding(
        "gpu:3",
        "GpuBandwidth",
        Status.FAULT,
        "LowBandwidth",
        "Bandwidth has less than threshold: Expected minimum threshold :80,NCCL Test output Bw: 30",
        Action.REPLACE,
        check="nccl",
    )
    event = render_all([replace])[-1]
    assert event["level"] == "error"
    assert event["msg"] == (
        "Encountered FaultyInstance. Replace the Instance. Region: us-west-2, "
        "InstanceType: p4d.24xlarge. ERROR:GpuBandwidth on gpu:3: Bandwidth has less than "
        "threshold: Expected minimum threshold :80,NCCL Test output Bw: 30"
    )
    assert event["verdict"] == "UnschedulablePendingReplacement"
    assert event["previous_verdict"] == "Schedulable"
    assert event["cause"]["check"] == "nccl"


def test_healthy_condition_is_an_info_event_with_status_false() -> None:
    ok = Finding(
        "memory", "MemoryExhaustion", Status.OK, "MemoryAvailable", "82.8%", check="memory"
    )
    (event,) = render_all([ok])
    assert event["level"] == "info" and event["condition_status"] == "False"
    assert "is now: False" in event["msg"]


def test_dry_run_is_marked_on_every_event() -> None:
    assert all(e["dry_run"] for e in render_all([XID71], dry_run=True))


def test_one_line_per_event_even_with_newlines_in_the_message() -> None:
    multi = Finding(
        "cpu",
        "KernelDeadlock",
        Status.FAULT,
        "TaskHung",
        "INFO: task x blocked\nCall Trace:\n",
        check="kernel-log",
    )
    assert all("\n" not in dumps(e) for e in render_all([multi]))
