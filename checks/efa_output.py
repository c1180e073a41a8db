"""What EFA tools print, read and judged: `fi_info -p efa` (the devices) and `fi_pingpong`
(a loopback). Shared by the EFA check, `deep-check` and `scan`; kept free of the check's
imports so that `scan` starts fast."""

from __future__ import annotations

import re

from checks.api import Action, Finding, Status


def parse_fi_info(text: str) -> list[str]:
    """The EFA devices `fi_info -p efa` lists: the `-rdm` domains (one per device)."""
    devices = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "domain" and value.endswith("-rdm") and value[:-4] not in devices:
            devices.append(value[:-4])
    return devices


# Where a saved `fi_info` output begins (for `scan`).
MARKER = re.compile(rb"^\s*provider: efa\b|^fi_getinfo: -?\d+", re.M)
MARKER_WORDS = (b"provider: efa", b"fi_getinfo: ")  # one is in every match: a fast prefilter


# fi_getinfo's FI_ENODATA (-61): no provider and device match. An answer, unlike a crash.
_NO_DATA = re.compile(r"^fi_getinfo: -61\b", re.M)


def judge_fi_info(
    output: str, want: int | None, returncode: int | None = 0, failure: str | None = None
) -> Finding:
    """What `fi_info -p efa` (its stdout and stderr) says of the node: its EFA devices against
    the `want`ed count. Only a run that finished and printed either a device list or the "no
    data" answer is evidence; a `failure` (timed out, killed) or output we cannot read is
    unknown."""
    devices = parse_fi_info(output)
    evidence = {"devices": devices, "expected": want, "exit": returncode}
    no_data = not devices and _NO_DATA.search(output) is not None
    why = failure
    if why is None and not devices and not no_data:
        shown = output.strip()[:100].encode("ascii", "backslashreplace").decode()
        why = f"fi_info printed no device list (exit {returncode}" + (
            f": {shown})" if shown else ")"
        )
    elif why is None and devices and returncode != 0:
        why = f"fi_info listed devices but exited {returncode}"
    if why is not None:
        return Finding("node", "EfaDevices", Status.UNKNOWN, "FiInfoFailed", why, evidence=evidence)
    if not devices and want is None:  # no EFA expected here: nothing to judge
        return Finding(
            "node",
            "EfaDevices",
            Status.UNKNOWN,
            "NoEfaProvider",
            "fi_info -p efa found no EFA",
            evidence=evidence,
        )
    if want is not None and len(devices) < want:
        return Finding(
            "node",
            "EfaDevices",
            Status.FAULT,
            "EfaDeviceCountMismatch",
            f"fi_info lists {len(devices)} of {want} EFA devices",
            Action.REBOOT,
            evidence,
        )
    return Finding(
        "node",
        "EfaDevices",
        Status.OK,
        "EfaDevicesPresent",
        f"{len(devices)} EFA devices" + (f" of {want}" if want else ""),
        evidence=evidence,
    )


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_FLOAT = r"[0-9]{1,20}(?:\.[0-9]{1,20})?"
_PINGPONG_ROW = re.compile(
    rf"^\s*([0-9]{{1,20}})([kmg]?)\s+\d+\s+=?\d+\s+\S+\s+\S+s\s+({_FLOAT})\s+({_FLOAT})\s+[\d.]+\s*$"
)


def parse_pingpong(text: str) -> list[tuple[int, float, float]]:
    """fabtests' table (`bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec`) as
    (message bytes, MB/s, microseconds per transfer) rows."""
    rows = []
    for line in text.splitlines():
        if m := _PINGPONG_ROW.match(line):
            size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
            rows.append((size, float(m.group(3)), float(m.group(4))))
    return rows


def judge_loopback(
    device: str, stdout: str, returncode: int | None, failure: str | None = None
) -> Finding:
    """One device's `fi_pingpong` loopback, reported as HyperPod's deep check words it. A run
    that did not finish (`failure`: timed out, killed) is unknown, never a failure."""
    rows = parse_pingpong(stdout)
    component = f"efa:{device}"
    if rows:
        bw = [r[1] for r in rows]
        lat = [r[2] for r in rows]
        summary = (
            f"MaxBw: {max(bw):.6f}, AvgBw: {sum(bw) / len(bw):.6f}, "
            f"MaxLat: {max(lat):.6f}, AvgLat: {sum(lat) / len(lat):.6f}, MinLat: {min(lat):.6f}"
        )
        return Finding(
            component,
            "EfaLoopback",
            Status.OK,
            "EfaLoopbackPassed",
            f"EFA Loopback check passed for device: {device} . Output summary is {summary}",
            evidence={"rows": len(rows), "max_mb_s": max(bw), "min_usec": min(lat)},
        )
    if failure is not None or returncode == 0:
        why = f"did not finish: {failure}" if failure else "printed no result table"
        return Finding(
            component,
            "EfaLoopback",
            Status.UNKNOWN,
            "EfaLoopbackUnknown",
            f"EFA Loopback check for device: {device} {why}",
        )
    return Finding(
        component,
        "EfaLoopback",
        Status.FAULT,
        "EfaLoopbackFailed",
        f"EFA Loopback check failed for device: {device} (exit status {returncode}): "
        f"{stdout.strip()[-200:]}",
        Action.REBOOT,
        {"exit": returncode},
    )
