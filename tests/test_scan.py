"""`node-health scan` on saved logs as operators paste them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.scan import detect

KERNEL = Path(__file__).parent / "fixtures" / "kernel"
XID79 = "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."


def scan(cli_env: dict, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", "scan", *args],
        env=cli_env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def events(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("xid13-burst-gpud.log", "dmesg-T"),
        ("hung-task-logrotate.log", "dmesg-T"),
        ("nvme-removed-nvme-cli.log", "dmesg"),
        ("aer-fatal-returnn1500.log", "dmesg"),
        ("edac-ce-osm.log", "syslog"),
        ("io-ext4-sonic23146.log", "text"),
        ("xid71-nvlink-hyperpod-doc.log", "text"),
    ],
)
def test_layout_is_recognised(name: str, layout: str) -> None:
    assert detect((KERNEL / "faults" / name).read_bytes()) == layout


def test_iso_kmsg_and_journal_layouts() -> None:
    assert detect(b"2024-08-21T23:05:29,123456+00:00 " + XID79.encode() + b"\n") == "dmesg-iso"
    assert detect(b"3,812,1843308145,-;" + XID79.encode() + b"\n") == "kmsg"
    assert detect(json.dumps({"MESSAGE": XID79}).encode() + b"\n") == "journal-json"


def test_node_needing_out_exits_1_with_one_event_per_finding(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "faults" / "xid13-burst-gpud.log"), "--node", "gpu-7")
    assert out.returncode == 1
    got = events(out)
    assert [e["evidence"]["xid"] for e in got] == ["13", "109"]
    assert [(e["reason"], e["action"]) for e in got] == [
        ("XidUserAppError", "restart_app"),
        ("XidHardwareFailure", "reboot"),
    ]
    assert all(e["node"] == "gpu-7" and list(e)[:3] == ["level", "ts", "msg"] for e in got)
    err = out.stderr.decode()
    assert "(dmesg-T)" in err and "2 findings" in err
    assert "verdict: UnschedulablePendingReboot (needs the node out)" in err


def test_healthy_log_exits_0_and_prints_no_event(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "benign" / "gpu-node-journal-gpud1209.log"))
    assert out.returncode == 0 and out.stdout == b""
    assert "verdict: Schedulable (node fine)" in out.stderr.decode()


def test_events_only_are_no_reason_to_take_the_node_out(cli_env) -> None:
    out = scan(cli_env, str(KERNEL / "faults" / "conntrack-full-k8s71261.log"))
    assert out.returncode == 0 and len(events(out)) == 2


def test_standard_input_kmsg_and_journal(cli_env) -> None:
    raw = f"6,1,100,-;Linux version 6.8.0\n3,812,1843308145,-;{XID79}\n SUBSYSTEM=pci\n"
    out = scan(cli_env, "-", stdin=raw.encode())
    assert out.returncode == 1 and [(e["reason"], e["evidence"]["xid"]) for e in events(out)] == [
        ("XidHardwareFailure", "79")
    ]
    assert "(kmsg)" in out.stderr.decode()
    journal = json.dumps({"__REALTIME_TIMESTAMP": "1724281529000000", "MESSAGE": XID79}) + "\n"
    out = scan(cli_env, stdin=journal.encode())
    assert (
        out.returncode == 1 and events(out)[0]["details: "]["timestamp"] == "2024-08-21T23:05:29Z"
    )


def test_count_rules_run_on_the_logs_own_time(cli_env, tmp_path) -> None:
    # A site's count rule (three XID 13 on one GPU in ten minutes mean reboot): within ten
    # minutes of log time they count, spread out they do not.
    cfg = tmp_path / "count.yaml"
    cfg.write_text(
        "policy:\n  rules:\n    - {name: xid13-thrice, match: {xid: 13}, count: 3,"
        " window: 10m, action: reboot}\n"
    )
    line = "[{t:12.6f}] NVRM: Xid (PCI:0000:cb:00): 13, Graphics Exception\n"
    close = tmp_path / "close.log"
    close.write_text("".join(line.format(t=5 + 240 * i) for i in range(3)))
    apart = tmp_path / "apart.log"
    apart.write_text("".join(line.format(t=5 + 400 * i) for i in range(3)))
    assert scan(cli_env, str(close), "-c", str(cfg)).returncode == 1
    assert scan(cli_env, str(apart), "-c", str(cfg)).returncode == 0
    # The packaged table never reboots for application errors by their number.
    assert scan(cli_env, str(close)).returncode == 0


def test_settings_rules_apply_to_a_scan(cli_env, tmp_path) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "checks:\n  kernel_log:\n    disable_rules: [conntrack-full]\n"
        "policy:\n  rules:\n    - name: xid13-is-fatal-here\n"
        "      match: {xid: 13}\n      action: replace\n"
    )
    assert (
        events(
            scan(
                cli_env,
                str(KERNEL / "faults" / "conntrack-full-kube-aws.log"),
                "--config",
                str(cfg),
            )
        )
        == []
    )
    out = scan(cli_env, str(KERNEL / "faults" / "xid13-burst-gpud.log"), "-c", str(cfg))
    assert "UnschedulablePendingReplacement" in out.stderr.decode()


def test_bad_input_and_bad_settings_exit_2(cli_env, tmp_path) -> None:
    out = scan(cli_env, str(tmp_path / "nope.log"))
    assert out.returncode == 2 and "cannot read" in out.stderr.decode()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "checks:\n  kernel_log:\n    rules:\n      - {name: x, anchor: abc, "
        "pattern: '(', condition: C}\n"
    )
    out = scan(cli_env, str(KERNEL / "faults" / "xid43-dra-driver.log"), "-c", str(cfg))
    assert out.returncode == 2
    assert "configuration error" in out.stderr.decode() and "rule 'x'" in out.stderr.decode()


def test_garbage_input_is_not_a_crash(cli_env) -> None:
    out = scan(cli_env, stdin=bytes(range(256)) * 1000)
    assert out.returncode == 0 and out.stdout == b""
