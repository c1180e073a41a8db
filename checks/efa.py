"""EFA: are all the instance's Elastic Fabric Adapters there, up, and not failing in bursts?

- `fi_info -p efa -t FI_EP_RDM` must work and list the instance type's number of EFA devices
  (one `<device>-rdm` domain each: 32 on a p5.48xlarge);
- each EFA port under /sys/class/infiniband must be ACTIVE;
- the EFA error counters (`ports/N/hw_counters`) are judged by rate over a poll, never by
  being non-zero: they only ever grow, and a long-lived node has some of each.
A device missing or a port down asks for a reboot; a burst of errors is an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status
from checks.instance_types import expected
from checks.proc import run_command

AMAZON_VENDOR = "0x1d0f"  # PCI vendor id of Amazon's devices (EFA among them)


def _default_rates() -> dict[str, float]:
    # Starting points, per minute per device: work-request errors and unresponsive remotes
    # should not happen at all; drops and SRD path changes happen under load.
    return {
        "rdma_read_wr_err": 1,
        "rdma_write_wr_err": 1,
        "unresponsive_remote_events": 1,
        "impaired_remote_conn_events": 10,
        "retrans_timeout_events": 10,
        "rx_drops": 100,
    }


class EfaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    fi_info: str = "fi_info"
    fi_info_paths: list[str] = Field(default_factory=lambda: ["/opt/amazon/efa/bin/fi_info"])
    devices: int | None = Field(None, description="expected EFA devices; default: the type's")
    rate_limits: dict[str, float] = Field(
        default_factory=_default_rates, description="counter -> increase per minute allowed"
    )
    burst_action: Action = Action.NONE


def parse_fi_info(text: str) -> list[str]:
    """The EFA devices `fi_info -p efa` lists: the `-rdm` domains (one per device)."""
    devices = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "domain" and value.endswith("-rdm") and value[:-4] not in devices:
            devices.append(value[:-4])
    return devices


def looks_like(text: str) -> bool:
    """Is this `fi_info` output? (For `scan`.)"""
    return bool(re.search(r"^\s*provider: efa\b|^fi_getinfo: -?\d+", text, re.M))


def judge_fi_info(
    stdout: str, want: int | None, returncode: int | None = 0, timed_out: bool = False
) -> Finding:
    """What `fi_info -p efa` says of the node: its EFA devices against the `want`ed count."""
    devices = parse_fi_info(stdout)
    evidence = {"devices": devices, "expected": want, "exit": returncode}
    if timed_out:
        return Finding(
            "node",
            "EfaDevices",
            Status.UNKNOWN,
            "FiInfoTimeout",
            "fi_info did not answer in time",
            evidence=evidence,
        )
    if not devices and want is None:  # no EFA expected here: nothing to judge
        return Finding(
            "node",
            "EfaDevices",
            Status.UNKNOWN,
            "NoEfaProvider",
            f"fi_info -p efa found no EFA ({stdout.strip()[:100]})",
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


class EfaCheck(PollingCheck):
    name = "efa"
    description = "EFA devices (fi_info) against the instance type, port state, error bursts"
    interval = 60.0
    timeout = 30.0
    Options: ClassVar[type[BaseModel]] = EfaOptions

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # (dev, counter) -> (t, value)
        self.clock = time.monotonic

    def _fi_info(self) -> str | None:
        opts: EfaOptions = self.options  # type: ignore[assignment]
        return shutil.which(opts.fi_info) or next(
            (p for p in opts.fi_info_paths if Path(p).is_file()), None
        )

    def missing(self) -> list[str]:
        if self._fi_info() is None and not self.ctx.path("/sys/class/infiniband").is_dir():
            return ["no EFA here (fi_info not found, /sys/class/infiniband absent)"]
        return []

    async def poll(self) -> list[Finding]:
        opts: EfaOptions = self.options  # type: ignore[assignment]
        found = []
        if (exe := self._fi_info()) is not None:
            found.append(await self._devices(exe, opts))
        found += await asyncio.to_thread(self._sysfs, opts)
        return found

    async def _devices(self, exe: str, opts: EfaOptions) -> Finding:
        want = opts.devices or expected(self.ctx.instance_type).efa_devices
        result = await run_command([exe, "-p", "efa", "-t", "FI_EP_RDM"], timeout=20)
        return judge_fi_info(result.stdout, want, result.returncode, result.timed_out)

    def _sysfs(self, opts: EfaOptions) -> list[Finding]:
        root = self.ctx.path("/sys/class/infiniband")
        if not root.is_dir():
            return []
        now = self.clock()
        found = []
        for dev in sorted(p for p in root.iterdir() if _is_efa(p)):
            for port in sorted((dev / "ports").glob("*")):
                found.append(self._port(dev.name, port))
                found.append(self._bursts(dev.name, port, now, opts))
        return found

    @staticmethod
    def _port(dev: str, port: Path) -> Finding:
        comp = f"efa:{dev}/{port.name}"
        try:
            state = (port / "state").read_text().strip()  # e.g. "4: ACTIVE"
        except OSError as exc:
            return Finding(
                comp,
                "EfaPort",
                Status.UNKNOWN,
                "PortStateUnreadable",
                f"{dev} port {port.name}: {exc.strerror}",
            )
        name = state.partition(":")[2].strip() or state
        if name != "ACTIVE":
            return Finding(
                comp,
                "EfaPort",
                Status.FAULT,
                "EfaPortDown",
                f"{dev} port {port.name} is {name}",
                Action.REBOOT,
                {"state": state},
            )
        return Finding(
            comp,
            "EfaPort",
            Status.OK,
            "EfaPortActive",
            f"{dev} port {port.name} is ACTIVE",
            evidence={"state": state},
        )

    def _bursts(self, dev: str, port: Path, now: float, opts: EfaOptions) -> Finding:
        comp = f"efa:{dev}"
        rates, over = {}, []
        for counter, limit in opts.rate_limits.items():
            try:
                value = int((port / "hw_counters" / counter).read_text())
            except (OSError, ValueError):
                continue  # not this device generation's counter
            key = (f"{dev}/{port.name}", counter)
            before = self._last.get(key)
            self._last[key] = (now, value)
            if before is None or value < before[1] or now <= before[0]:
                continue  # first look, or the counter was reset (driver reload)
            per_minute = (value - before[1]) * 60.0 / (now - before[0])
            rates[counter] = round(per_minute, 2)
            if per_minute > limit:
                over.append(counter)
        evidence = {"per_minute": rates, "limits": opts.rate_limits}
        if over:
            return Finding(
                comp,
                "EfaErrors",
                Status.FAULT,
                "EfaErrorBurst",
                f"{dev}: {', '.join(f'{c} {rates[c]:g}/min' for c in over)}",
                opts.burst_action,
                evidence,
            )
        return Finding(
            comp,
            "EfaErrors",
            Status.OK,
            "EfaErrorsWithinLimits",
            f"{dev}: error counters within limits",
            evidence=evidence,
        )


def _is_efa(dev: Path) -> bool:
    """An Amazon device (EFA) in /sys/class/infiniband; by name where no vendor file exists."""
    try:
        return (dev / "device" / "vendor").read_text().strip() == AMAZON_VENDOR
    except OSError:
        return dev.name.startswith(("rdmap", "efa_"))


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_PINGPONG_ROW = re.compile(
    r"^\s*(\d+)([kmg]?)\s+\d+\s+=?\d+\s+\S+\s+\S+s\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s*$"
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


def judge_loopback(device: str, stdout: str, returncode: int | None, timed_out: bool) -> Finding:
    """One device's `fi_pingpong` loopback, reported as HyperPod's deep check words it."""
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
    if timed_out or returncode == 0:
        why = "timed out" if timed_out else "printed no result table"
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


async def loopback(fi_pingpong: str, device: str, timeout: float) -> Finding:
    """fi_pingpong server and client on this node over one EFA device."""
    base = [fi_pingpong, "-e", "rdm", "-p", "efa", "-d", f"{device}-rdm"]
    server = asyncio.ensure_future(run_command(base, timeout))
    try:
        await asyncio.sleep(0.5)  # the server listens before the client connects
        client = await run_command([*base, "localhost"], timeout)
    finally:
        if not server.done():
            server.cancel()  # run_command kills the server's process group
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await server
    return judge_loopback(device, client.stdout, client.returncode, client.timed_out)
