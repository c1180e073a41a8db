"""Link error counters by rate: InfiniBand ports and PCIe AER, the degradation before a failure.

- every InfiniBand port's standard counters (`/sys/class/infiniband/<dev>/ports/<n>/counters/`)
  and, on non-EFA devices, its driver's `hw_counters/` (the efa check judges EFA's own);
- every PCI device's correctable AER total (`TOTAL_ERR_COR` in
  `/sys/bus/pci/devices/<dev>/aer_dev_correctable`, Documentation/ABI/testing/
  sysfs-bus-pci-devices-aer_stats).
Each is judged by checks.counters against the limits of counters.yaml (or the settings').
A breach is a degradation, NetworkDegraded or PcieDegraded, that asks nothing of the node:
the policy table decides whether a degradation ever means more. A counter that is absent
is not this hardware's; a file we cannot read is no evidence either way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from checks.api import CheckContext, Finding, PollingCheck, Status
from checks.counters import Breach, Limit, Velocity, boot_id, read_counter, read_small, table
from checks.efa import Ports, is_efa

STATE_FILE = "counters-links.json"


class LinkCountersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    infiniband: list[dict[str, Any]] | None = Field(
        None, description="limits for InfiniBand port counters; default: counters.yaml's"
    )
    pcie: list[dict[str, Any]] | None = Field(
        None, description="limits for the AER correctable total; default: counters.yaml's"
    )
    aer: bool = Field(True, description="judge PCIe AER correctable counts")

    @field_validator("infiniband", "pcie")
    @classmethod
    def _rows(cls, rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for row in rows or ():
            Limit.of(row)  # a bad row is a configuration error, not a crash at the first poll
        return rows


class LinkCountersCheck(PollingCheck):
    name = "link_counters"
    description = "InfiniBand port error counters and PCIe AER correctable errors, by rate"
    interval = 60.0
    timeout = 20.0
    Options: ClassVar[type[BaseModel]] = LinkCountersOptions

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        opts: LinkCountersOptions = self.options  # type: ignore[assignment]
        ib = [Limit.of(r) for r in opts.infiniband] if opts.infiniband else table("infiniband")
        pcie = [Limit.of(r) for r in opts.pcie] if opts.pcie else table("pcie")
        self._ib_names = list(dict.fromkeys(lim.counter for lim in ib))  # in the table's order
        limits = [*ib, *(lim for lim in pcie if lim.matches("aer_correctable"))]
        state = ctx.state_dir / STATE_FILE if ctx.state_dir else None
        self.velocity = Velocity(limits, state, boot_id(ctx.host_root))
        self.clock = time.monotonic  # since boot: the counters' own lifetime
        self.files_read = 0  # for the benchmark
        self._aer_reported: set[str] = set()
        self._layout: dict[str, list[str]] = {}  # port -> its counter directories
        self._ports = Ports(str(ctx.path("/sys/class/infiniband")))
        self._pci_names: list[str] = []  # /sys/bus/pci/devices as last listed
        self._aer_paths: list[str] = []
        self._no_aer: set[str] = set()  # devices without AER statistics

    def missing(self) -> list[str]:
        aer = any(os.path.exists(p) for p in self._aer_files())
        if not self.ctx.path("/sys/class/infiniband").is_dir() and not aer:
            return ["no InfiniBand devices and no PCIe AER counters here"]
        return []

    def collect(self) -> list[Finding]:
        now = self.clock()
        self.files_read = 0
        found = self._infiniband(now)
        opts: LinkCountersOptions = self.options  # type: ignore[assignment]
        if opts.aer:
            found += self._aer(now)
        self.velocity.save()
        return found

    def _infiniband(self, now: float) -> list[Finding]:
        found = []
        for dev, port, path in self._ports() or ():
            breaches, seen = [], 0
            for base in self._dirs(dev, path):
                for counter in self._ib_names:
                    value = read_counter(f"{base}/{counter}")
                    self.files_read += 1
                    if value is None:
                        continue
                    seen += 1
                    key = f"{dev}/{port}/{counter}"
                    breaches += self.velocity.observe(now, key, counter, value)
            if seen:
                comp = f"ib:{dev}/{port}"
                found.append(_finding(comp, "NetworkDegraded", breaches, "port counters"))
        return found

    def _dirs(self, dev: str, port: str) -> list[str]:
        """The port's counter directories: EFA has no counters/, and its hw_counters are the
        efa check's. Kept once found: a driver keeps its layout; a port with none yet (the
        kernel adds the port, then its counters) is looked at again next poll, but an EFA
        port's, which never has counters/."""
        if (dirs := self._layout.get(port)) is None:
            efa = is_efa(Path(self._ports.root, dev))
            dirs = [f"{port}/counters"] + ([] if efa else [f"{port}/hw_counters"])
            dirs = [d for d in dirs if os.path.isdir(d)]
            if dirs or efa:
                self._layout[port] = dirs
        return dirs

    def _aer_files(self) -> list[str]:
        """The devices' AER files, but for those found without one: the kernel shows the file
        only on a device with AER statistics, decided when the device is added
        (drivers/pci/pcie/aer.c, aer_stats_attrs_are_visible), so a host's hundreds of other
        PCI devices cost one listing, not an open each, until the device list changes."""
        base = self.ctx.path("/sys/bus/pci/devices")
        try:
            names = os.listdir(base)
        except OSError:
            return []
        if names != self._pci_names:
            self._pci_names, self._no_aer = names, set()
            self._aer_paths = [f"{base}/{dev}/aer_dev_correctable" for dev in sorted(names)]
        return [p for p in self._aer_paths if p not in self._no_aer]

    def _aer(self, now: float) -> list[Finding]:
        found = []
        for path in self._aer_files():
            total = aer_total(path)
            if total is None:  # not AER capable (no such file), or not what the kernel writes
                if not os.path.exists(path) and os.path.isdir(os.path.dirname(path)):
                    self._no_aer.add(path)  # the device is there, without AER (not gone)
                continue
            self.files_read += 1
            dev = path.rsplit("/", 2)[1]
            breaches = self.velocity.observe(now, f"{dev}/aer", "aer_correctable", total)
            # A host has hundreds of PCI devices: report those that have been in breach only
            # (and keep reporting them, so that their condition can clear).
            if breaches:
                self._aer_reported.add(dev)
            if dev in self._aer_reported:
                found.append(_finding(f"pci:{dev}", "PcieDegraded", breaches, "AER"))
        return found


def aer_total(path: str | Path) -> int | None:
    """TOTAL_ERR_COR of an `aer_dev_correctable` file ("<name> <count>" lines), or None."""
    try:
        text = read_small(str(path))
    except OSError:
        return None
    at = text.rfind(b"\nTOTAL_ERR_COR ")
    if at < 0:
        return None
    try:
        return int(text[at + 15 :].split(b"\n", 1)[0])
    except ValueError:
        return None


def _finding(comp: str, condition: str, breaches: list[Breach], what: str) -> Finding:
    if not breaches:
        return Finding(
            comp, condition, Status.OK, "ErrorCountersWithinLimits", f"{what} within limits"
        )
    lead = next((b for b in breaches if b.permanent), breaches[0])
    reason = lead.limit.reason + ("Persistent" if lead.permanent else "")
    return Finding(
        comp,
        condition,
        Status.FAULT,
        reason,
        f"{comp.partition(':')[2]}: {'; '.join(b.describe() for b in breaches)}",
        evidence={
            "breaches": [
                {
                    "counter": b.counter,
                    "increase": b.increase,
                    "limit": b.limit.describe(),
                    "permanent": b.permanent,
                }
                for b in breaches
            ]
        },
    )
