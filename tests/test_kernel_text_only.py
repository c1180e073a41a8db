"""Only the kernel's records are judged by kernel rules: user space quoting a fault in a log
file, in /dev/kmsg or in the journal must not take a node out, live or in `scan`.

The user-space lines are written by the tests in the shapes their writers give them: rsyslog's
RSYSLOG_TraditionalFileFormat ("%TIMESTAMP% %HOSTNAME% %syslogtag%%msg%") and RSYSLOG_FileFormat
(RFC 3339 time) from rsyslog's reserved-templates reference; util-linux `logger`, whose tag is
the caller's login name by default; OpenSSH's "Invalid user %.100s from %.100s port %d" with a
client-chosen user name; /dev/kmsg's "<facility*8+level>,<seq>,<usec>,<flags>;" prefix
(Documentation/ABI/testing/dev-kmsg; the kernel gives what user space writes LOG_USER); the
journal's trusted `_TRANSPORT` field (systemd.journal-fields(7)). The kernel's own lines are
tests/fixtures/kernel/syslog's, verbatim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checks.kernel_log.formats import from_kernel, journal_entry, syslog_tag
from tests.test_kernel_log_check import check, collect, host, kmsg_line

SYSLOG = Path(__file__).parent / "fixtures" / "kernel" / "syslog"
TRADITIONAL = (SYSLOG / "xid79-traditional-acer-po5-650.log").read_text()
ISO = (SYSLOG / "xid79-iso-acer-po5-650.log").read_text()
XID79 = "NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus."
USER_SPACE = [
    # `logger "NVRM: ..."` run by user isaac
    f"Jun 01 20:12:02 isaac-Predator-PO5-650 isaac: {XID79}",
    # sshd, a client that chose its user name
    "Jun 01 20:13:40 isaac-Predator-PO5-650 sshd[41877]: Invalid user kernel BUG at "
    "mm/slub.c:4100! from 203.0.113.7 port 52144",
    # an application quoting the driver's message, in the high-precision format
    "2026-06-01T15:55:07.000112+03:00 isaac-Predator-PO5-650 python3[30393]: RuntimeError: "
    + XID79,
]


def test_the_syslog_tag_of_both_rsyslog_formats() -> None:
    assert [syslog_tag(ln) for ln in TRADITIONAL.splitlines() + ISO.splitlines()] == ["kernel"] * 8
    assert [syslog_tag(ln) for ln in USER_SPACE] == ["isaac", "sshd", "python3"]
    assert not any(from_kernel(ln) for ln in USER_SPACE)
    # no syslog header: dmesg (its ISO time has a comma), a line of an unknown layout
    assert from_kernel(f"[ 1843.308145] {XID79}")
    assert from_kernel(f"2024-08-21T23:05:29,123456+00:00 nvme nvme0: {XID79}")
    assert from_kernel(XID79)


async def test_a_log_file_judges_only_the_kernels_lines(tmp_path) -> None:
    root = host(tmp_path)
    (root / "var/log").mkdir(parents=True)
    alone = root / "var/log/messages"
    alone.write_text(TRADITIONAL)
    kernel_only = [f.reason for f in await collect(check(root, tmp_path, source="file"))]
    assert "XidHardwareFailure" in kernel_only
    alone.write_text("\n".join(USER_SPACE) + "\n")
    assert await collect(check(root, tmp_path, source="file")) == []
    alone.write_text("\n".join([*USER_SPACE, *TRADITIONAL.splitlines()]) + "\n")
    mixed = await collect(check(root, tmp_path, source="file"))
    assert [f.reason for f in mixed] == kernel_only
    assert all("kernel:" in f.evidence["line"] for f in mixed)


async def test_kmsg_records_user_space_wrote_are_not_judged(tmp_path) -> None:
    root = host(tmp_path)
    kmsg = root / "dev/kmsg"
    # `echo ... > /dev/kmsg` (LOG_USER, level 6: 14) and systemd's (LOG_DAEMON, level 6: 30)
    user_space = f"14,1,10,-;{XID79}\n30,2,20,-;systemd[1]: {XID79}\n"
    kmsg.write_text(user_space)
    assert await collect(check(root, tmp_path, source="kmsg")) == []
    kmsg.write_text(user_space + kmsg_line(3, XID79, 30))  # the kernel's: facility 0
    found = await collect(check(root, tmp_path, source="kmsg"))
    assert [(f.reason, f.evidence["xid"], f.evidence["line"]) for f in found] == [
        ("XidHardwareFailure", "79", XID79)
    ]


def test_journal_entries_that_are_not_the_kernels_are_not_judged() -> None:
    entry = {"MESSAGE": XID79, "__REALTIME_TIMESTAMP": "1780318506218036"}
    assert journal_entry(json.dumps({**entry, "_TRANSPORT": "kernel"})) is not None
    for transport in ("syslog", "journal", "stdout"):
        assert journal_entry(json.dumps({**entry, "_TRANSPORT": transport})) is None


def found(out: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    events = [json.loads(ln) for ln in out.stdout.decode().splitlines()]
    return [(e["reason"], e["component"]) for e in events if "reason" in e]


@pytest.mark.parametrize("kernel", [TRADITIONAL, ISO], ids=["traditional", "iso"])
def test_scan_of_a_syslog_file_judges_only_the_kernels_lines(cli_env, kernel: str) -> None:
    def scan(text: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "agent", "scan", "-"],
            env=cli_env,
            input=text.encode(),
            capture_output=True,
            timeout=60,
        )

    users = scan("\n".join(USER_SPACE) + "\n")
    assert (users.returncode, users.stdout) == (0, b""), users.stderr
    mixed = scan("\n".join(USER_SPACE) + "\n" + kernel)
    assert mixed.returncode == 1, mixed.stderr
    assert found(scan(kernel)) == found(mixed) != []
    journal = "".join(
        json.dumps({"MESSAGE": ln.split(": ", 1)[1], "_TRANSPORT": "syslog"}) + "\n"
        for ln in USER_SPACE
    )
    assert scan(journal).returncode == 0
