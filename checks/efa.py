"""EFA: are all the instance's Elastic Fabric Adapters there, up, and not failing in bursts?

- `fi_info -p efa -t FI_EP_RDM` must work and list the instance type's number of EFA devices
  (one `<device>-rdm` domain each: 32 on a p5.48xlarge);
- each EFA port under /sys/class/infiniband must be ACTIVE;
- the EFA error counters (`ports/N/hw_counters`) are judged by their increase within a
  minute (checks.counters, the counter velocity the other error counters use too), never by
  being non-zero: they only ever grow, and a long-lived node has some of each.
fi_info's count is evidence only where this process can open the devices: in a pod given
none (no /dev/infiniband/uverbs* of the devices /sys shows) it is unknown, never a reboot.
A device missing or a port down asks for a reboot; a burst of errors is a degradation
(NetworkDegraded), which leaves the node Schedulable unless the policy says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status
from checks.counters import Limit, Velocity, boot_id, read_counter, read_small
from checks.efa_output import judge_fi_info, judge_loopback
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


class EfaCheck(PollingCheck):
    name = "efa"
    description = "EFA devices (fi_info) against the instance type, port state, error bursts"
    interval = 60.0
    timeout = 30.0
    Options: ClassVar[type[BaseModel]] = EfaOptions

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        self._velocity: Velocity | None = None
        self._is_efa: dict[str, bool] = {}
        self._ports = Ports(str(self.ctx.path("/sys/class/infiniband")))
        self.clock = time.monotonic  # since boot: the counters' own lifetime
        # This process's RDMA device nodes, which fi_info opens: never under the host root.
        self.verbs_dir = Path("/dev/infiniband")

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
        output = result.stdout + result.stderr
        found = judge_fi_info(output, want, result.returncode, result.failure)
        if found.status is Status.FAULT and (hidden := await asyncio.to_thread(self._unreachable)):
            return Finding(
                "node",
                "EfaDevices",
                Status.UNKNOWN,
                "EfaDevicesUnreachable",
                f"{found.message}, but {len(hidden)} EFA devices have no verbs device node in "
                f"{self.verbs_dir} (a pod given no EFA devices): fi_info cannot count them here",
                evidence=found.evidence | {"unreachable": hidden},
            )
        return found

    def _unreachable(self) -> list[str]:
        """The host's EFA devices whose verbs node (`uverbsN`) this process has not: fi_info
        (libibverbs) cannot open them, whether they are fine or not, so its count proves
        nothing. A device that is gone is gone from /sys too, and still counts as missing."""
        root = self.ctx.path("/sys/class/infiniband")
        try:
            devices = sorted(root.iterdir())
        except OSError:
            return []
        hidden = []
        for dev in devices:
            try:
                nodes = os.listdir(dev / "device" / "infiniband_verbs")
            except OSError:
                continue
            if self._efa(dev) and any(not (self.verbs_dir / n).exists() for n in nodes):
                hidden.append(dev.name)
        return hidden

    def _sysfs(self, opts: EfaOptions) -> list[Finding]:
        ports = self._ports()
        if ports is None:
            return []
        now = self.clock()
        velocity = self._velocity_of(opts)
        found = []
        for dev, port, path in ports:
            if self._efa(dev):
                found.append(self._port(dev, port, path))
                found.append(self._bursts(dev, port, path, now, opts, velocity))
        velocity.save()
        return found

    def _efa(self, dev: str) -> bool:
        if (known := self._is_efa.get(dev)) is None:  # a device's vendor never changes
            known = self._is_efa[dev] = is_efa(Path(self._ports.root, dev))
        return known

    def _velocity_of(self, opts: EfaOptions) -> Velocity:
        if self._velocity is None:
            limits = [
                Limit(counter, 60.0, over=limit, reason="EfaErrorBurst")
                for counter, limit in opts.rate_limits.items()
            ]
            state = self.ctx.state_dir / "counters-efa.json" if self.ctx.state_dir else None
            self._velocity = Velocity(limits, state, boot_id(self.ctx.host_root))
        return self._velocity

    def _port(self, dev: str, port: str, path: str) -> Finding:
        comp = f"efa:{dev}/{port}"
        try:
            state = read_small(f"{path}/state").decode(errors="replace").strip()  # 4: ACTIVE
        except OSError as exc:
            self._ports.forget(dev)
            return Finding(
                comp,
                "EfaPort",
                Status.UNKNOWN,
                "PortStateUnreadable",
                f"{dev} port {port}: {exc.strerror}",
            )
        name = state.partition(":")[2].strip() or state
        if name != "ACTIVE":
            return Finding(
                comp,
                "EfaPort",
                Status.FAULT,
                "EfaPortDown",
                f"{dev} port {port} is {name}",
                Action.REBOOT,
                {"state": state},
            )
        return Finding(
            comp,
            "EfaPort",
            Status.OK,
            "EfaPortActive",
            f"{dev} port {port} is ACTIVE",
            evidence={"state": state},
        )

    def _bursts(
        self, dev: str, port: str, path: str, now: float, opts: EfaOptions, velocity: Velocity
    ) -> Finding:
        comp = f"efa:{dev}"
        breaches = []
        base = f"{path}/hw_counters/"
        for counter in opts.rate_limits:
            value = read_counter(base + counter)
            if value is None:
                continue  # not this device generation's counter
            breaches += velocity.observe(now, f"{dev}/{port}/{counter}", counter, value)
        evidence = {
            "over_limit": {b.counter: b.increase for b in breaches},
            "per_minute_limits": opts.rate_limits,
        }
        if breaches:
            return Finding(
                comp,
                "NetworkDegraded",
                Status.FAULT,
                "EfaErrorBurst",
                f"{dev}: {', '.join(b.describe() for b in breaches)}",
                opts.burst_action,
                evidence,
            )
        return Finding(
            comp,
            "NetworkDegraded",
            Status.OK,
            "EfaErrorsWithinLimits",
            f"{dev}: error counters within limits",
            evidence=evidence,
        )


class Ports:
    """The ports of the devices in /sys/class/infiniband, as (device, port, port directory).

    The class directory is listed every poll, so a device that comes or goes (a driver
    reload) is seen at once; a device's ports only when it is new to the listing, or after a
    read under it failed: the kernel creates every port of a device when it registers it
    (drivers/infiniband/core/sysfs.c, ib_setup_port_attrs), so they change only with the
    device. Listing 32 devices' ports every poll cost as much as reading their counters.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._ports: dict[str, list[tuple[str, str]]] = {}

    def __call__(self) -> list[tuple[str, str, str]] | None:
        """Every port, in name order; None where the directory is not there."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return None
        for gone in self._ports.keys() - set(names):
            del self._ports[gone]
        out = []
        for dev in names:
            ports = self._ports.get(dev)
            if ports is None:
                base = f"{self.root}/{dev}/ports"
                try:
                    listed = sorted(os.listdir(base))
                except OSError:
                    continue  # not listable now: no ports this poll, listed again the next
                ports = [(p, f"{base}/{p}") for p in listed]
                if ports:  # none yet: the device is registering (its ports come after)
                    self._ports[dev] = ports
            out += [(dev, port, path) for port, path in ports]
        return out

    def forget(self, dev: str) -> None:
        """List `dev`'s ports again at the next poll (a read under it failed)."""
        self._ports.pop(dev, None)


def is_efa(dev: Path) -> bool:
    """An Amazon device (EFA) in /sys/class/infiniband; by name where no vendor file exists."""
    try:
        return (dev / "device" / "vendor").read_text().strip() == AMAZON_VENDOR
    except OSError:
        return dev.name.startswith(("rdmap", "efa_"))


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
    return judge_loopback(device, client.stdout, client.returncode, client.failure)
