"""Kernel-log line formats: where a record's time is, and how a saved log is laid out.

Rules match anywhere in a line, so a prefix never hides a fault; the formats matter for the
record's time (de-duplication and rate windows), for the layouts that need decoding (raw
`/dev/kmsg` records and `journalctl -o json`), and for telling the kernel's records from user
space's: only those are judged by kernel rules (a `logger` line, or an sshd line whose client
chose a user name that quotes a kernel fault, must not take a node out).
"""

from __future__ import annotations

import calendar
import json
import re
import time
from dataclasses import dataclass

# /dev/kmsg: "<prio>,<seq>,<usec since boot>,<flags>[,...];<message>" (Documentation/ABI/
# testing/dev-kmsg). Non-printable bytes in the message, newlines included, come as \xNN.
KMSG = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;")
_DMESG = re.compile(r"\[\s*(\d+\.\d+)\]")  # [ 1843.308145], also after a syslog prefix
_DMESG_T = re.compile(r"^\[(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\]")
_ISO = re.compile(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(?:[.,]\d+)?(Z|[+-]\d\d:?\d\d)?")
_SYSLOG = re.compile(r"^(\w{3} [ \d]\d \d\d:\d\d:\d\d) ")
# A syslog file's header and its program's tag: RFC 3164 as rsyslog's traditional file format
# writes it ("Jun 11 09:44:44 host kernel: ..."), and RFC 3339 time as its high-precision
# RSYSLOG_FileFormat and `journalctl -o short-iso[-precise]` do ("2026-06-01T15:55:06.218036
# +03:00 host kernel: ..."). The tag ends at "[pid]" or ":" (RFC 3164 4.1.3). dmesg's own ISO
# time has a comma ("2024-08-21T23:05:29,123456+00:00 NVRM: ..."), and no host or tag.
_SYSLOG_TAG = re.compile(
    r"^(?:\w{3} [ \d]\d \d\d:\d\d:\d\d"
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d))"
    r" \S+ ([^\s\[:]+)(?:\[\d+\])?: "
)


@dataclass(frozen=True, slots=True)
class Stamp:
    """`ts`: seconds on the log's own clock (since boot, or wall time), for windows;
    `wall`: Unix time when the line says it."""

    ts: float | None = None
    wall: float | None = None


def stamp(line: str, boot_time: float | None = None) -> Stamp:
    """The time a line carries, in whichever of the known layouts it is."""
    head = line[:96]
    if m := KMSG.match(head):
        since_boot = int(m.group(3)) / 1e6
        return Stamp(since_boot, boot_time + since_boot if boot_time is not None else None)
    if m := _DMESG_T.match(head):
        wall = _utc(m.group(1), "%a %b %d %H:%M:%S %Y")
        return Stamp(wall, wall)
    if m := _ISO.match(head):
        wall = _utc(m.group(1).replace(" ", "T"), "%Y-%m-%dT%H:%M:%S", m.group(2))
        return Stamp(wall, wall)
    wall = None
    if m := _SYSLOG.match(head):  # syslog and journalctl short: no year, so this year's
        wall = _utc(f"{time.gmtime().tm_year} {m.group(1)}", "%Y %b %d %H:%M:%S")
    if m := _DMESG.search(head):
        since_boot = float(m.group(1))
        if wall is None and boot_time is not None:
            wall = boot_time + since_boot
        return Stamp(since_boot, wall)
    return Stamp(wall, wall)


def _utc(text: str, fmt: str, zone: str | None = None) -> float | None:
    try:
        t = calendar.timegm(time.strptime(text, fmt))
    except ValueError:
        return None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hh, mm = int(zone[1:3]), int(zone[-2:])
        t -= sign * (hh * 3600 + mm * 60)
    return float(t)


def syslog_tag(line: str) -> str | None:
    """The program a syslog line names (`kernel`, `sshd`, ...); None where it has no header."""
    m = _SYSLOG_TAG.match(line)
    return m.group(1) if m else None


def from_kernel(line: str) -> bool:
    """False for a syslog line that another program wrote; a line without a syslog header (a
    dmesg line, one of a layout we do not know) is not refused: a fault in it is not missed."""
    tag = syslog_tag(line)
    return tag is None or tag == "kernel"


def kmsg_from_kernel(prefix: str) -> bool:
    """A /dev/kmsg record's facility (prefix = facility * 8 + level) is 0 only for the kernel's:
    the kernel gives whatever user space writes there LOG_USER or the facility it named."""
    return int(prefix) >> 3 == 0


def unescape_kmsg(message: str) -> str:
    r"""Undo /dev/kmsg's \xNN escaping (a multi-line record arrives as one line)."""
    if "\\x" not in message:
        return message
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), message)


def journal_message(line: str) -> tuple[str, Stamp] | None:
    """MESSAGE and time of one `journalctl -o json` line; None when it is not one."""
    entry = journal_entry(line)
    return None if entry is None else (entry[0], entry[1])


def journal_entry(line: str) -> tuple[str, Stamp, str | None] | None:
    """MESSAGE, time and __CURSOR of one `journalctl -o json` line; None when it is not one,
    or when journald says it did not come from the kernel (`_TRANSPORT`)."""
    try:
        entry = json.loads(line)
        message = entry["MESSAGE"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if entry.get("_TRANSPORT", "kernel") != "kernel":  # journald's own, trusted field
        return None
    if isinstance(message, list):  # journald sends non-UTF-8 messages as byte arrays
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    if not isinstance(message, str):
        return None
    wall = _number(entry.get("__REALTIME_TIMESTAMP"))
    mono = _number(entry.get("__MONOTONIC_TIMESTAMP"))
    wall = wall / 1e6 if wall is not None else None
    cursor = entry.get("__CURSOR")
    return (
        message,
        Stamp(mono / 1e6 if mono is not None else wall, wall),
        cursor if isinstance(cursor, str) else None,
    )


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
