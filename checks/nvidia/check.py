"""NVIDIA GPUs through NVML: are they all there, and is any of them failing?

Per poll: the GPU count against the instance type's (a GPU gone from the bus without an XID
line is caught here: HyperPod reboots on a short count); a GPU NVML reports lost (replace, as
XID 79) or that fails with NVML's unknown error (reboot); uncorrectable ECC, retired pages and
row remapping (NVIDIA's memory error management: pending means a reset remaps or retires,
failure means the GPU is out of spare rows); SRAM uncorrectable errors; inactive NVLinks;
a PCIe link narrower or slower than the instance type's.

Degradation (GpuDegraded, which asks nothing of the node: the policy decides): hardware
slowdowns (HW slowdown, HW thermal, HW power brake, SW thermal; never the software power cap
or idle) that persist over `slowdown_polls` polls while the GPU is busy; a thermal margin to
the slowdown threshold at or below `thermal_margin` while busy; NVLink replay, recovery and
CRC errors and PCIe replays growing faster than checks/counters.yaml allows (checks.counters).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status
from checks.counters import Breach, Velocity, boot_id, table
from checks.instance_types import expected
from checks.nvidia import nvml

SLOWDOWNS = {
    nvml.HW_SLOWDOWN: "HardwareSlowdown",
    nvml.HW_THERMAL_SLOWDOWN: "ThermalSlowdown",
    nvml.SW_THERMAL_SLOWDOWN: "ThermalSlowdown",
    nvml.HW_POWER_BRAKE_SLOWDOWN: "PowerBrakeSlowdown",
}


class NvmlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    gpus: int | None = Field(None, description="expected GPUs; default: the instance type's")
    nvlinks_per_gpu: int | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    retired_pages_limit: int = Field(60, ge=1, description="NVIDIA's RMA threshold")
    slowdown_polls: int = Field(
        3, ge=1, description="busy polls in a row with a slowdown before it counts"
    )
    busy_percent: int = Field(
        50, ge=0, le=100, description="GPU utilization at which slowdowns count"
    )
    thermal_margin: int = Field(
        5, ge=0, description="degrees C to the slowdown threshold that count as too hot"
    )


class NvmlCheck(PollingCheck):
    name = "nvml"
    description = "NVIDIA GPUs through NVML: count, lost GPUs, ECC, row remapping, NVLink, PCIe"
    interval = 30.0
    timeout = 20.0
    Options: ClassVar[type[BaseModel]] = NvmlOptions

    def __init__(
        self, ctx: CheckContext, options: BaseModel | None = None, backend: nvml.Nvml | None = None
    ) -> None:
        super().__init__(ctx, options)
        self.backend = backend or nvml.PynvmlBackend()
        self._slow: dict[str, int] = {}
        state = ctx.state_dir / "counters-nvml.json" if ctx.state_dir else None
        limits = [*table("nvlink"), *(lim for lim in table("pcie") if lim.matches("pcie_replay"))]
        self.velocity = Velocity(limits, state, boot_id(ctx.host_root))
        self.clock = time.monotonic  # since boot: the counters' own lifetime

    def missing(self) -> list[str]:
        return nvml.missing_driver(self.backend.snapshot)

    def collect(self) -> list[Finding]:
        opts: NvmlOptions = self.options  # type: ignore[assignment]
        want = expected(self.ctx.instance_type, opts.model_dump())
        snap = self.backend.snapshot()
        now = self.clock()
        found = [self._count(snap, want.gpus)]
        for gpu in snap.gpus:
            found += self._gpu(gpu, want, opts)
            if gpu.error is None:
                found += self._counters(gpu, now)
        self.velocity.save()
        return found

    @staticmethod
    def _count(snap: nvml.Snapshot, want: int | None) -> Finding:
        evidence = {"count": snap.count, "expected": want, "driver": snap.driver}
        if want is not None and snap.count < want:
            return Finding(
                "node",
                "NvidiaGPUCount",
                Status.FAULT,
                "GpuCountMismatch",
                f"{snap.count} of {want} GPUs visible to the driver",
                Action.REBOOT,
                evidence,
            )
        return Finding(
            "node",
            "NvidiaGPUCount",
            Status.OK,
            "GpuCountMatches",
            f"{snap.count} GPUs",
            evidence=evidence,
        )

    def _gpu(self, g: nvml.GpuReading, want: Any, opts: NvmlOptions) -> list[Finding]:
        comp = f"gpu:{g.pci}" if g.pci else f"gpu:index{g.index}"
        if g.error is not None:
            lost = g.error.code == nvml.GPU_IS_LOST
            return [
                Finding(
                    comp,
                    "NvidiaGPUUnhealthy",
                    Status.FAULT,
                    "GpuIsLost" if lost else "NvmlError",
                    f"NVML: {g.error}",
                    Action.REPLACE if lost else Action.REBOOT,
                    {"nvml_code": g.error.code, "index": g.index},
                )
            ]
        base = {"index": g.index, "name": g.name}
        return [
            Finding(
                comp,
                "NvidiaGPUUnhealthy",
                Status.OK,
                "GpuAnswers",
                f"{g.name} answers",
                evidence=base,
            ),
            self._memory(comp, g, opts, base),
            self._nvlink(comp, g, want.nvlinks_per_gpu, base),
            self._pcie(comp, g, want.pcie_gen, want.pcie_width, base),
            self._slowdown(comp, g, opts, base),
        ]

    @staticmethod
    def _memory(comp: str, g: nvml.GpuReading, opts: NvmlOptions, base: dict) -> Finding:
        """The worst of the memory error signs, per NVIDIA's memory error management."""
        evidence = base | {
            k: getattr(g, k)
            for k in (
                "ecc_volatile_uncorrected",
                "ecc_aggregate_uncorrected",
                "sram_volatile_uncorrected",
                "retired_pages",
                "retirement_pending",
                "remapped_rows_uncorrectable",
                "remap_pending",
                "remap_failure",
            )
        }
        signs = [
            (
                g.remap_failure,
                Action.REPLACE,
                "RowRemapFailure",
                "row remapping failed: no spare rows left",
            ),
            (
                (g.retired_pages or 0) >= opts.retired_pages_limit,
                Action.REPLACE,
                "RetiredPagesLimit",
                f"{g.retired_pages} retired pages (limit {opts.retired_pages_limit})",
            ),
            (
                g.remap_pending,
                Action.REBOOT,
                "RowRemapPending",
                "a row remapping is pending: a reset applies it",
            ),
            (
                g.retirement_pending,
                Action.REBOOT,
                "PageRetirementPending",
                "a page retirement is pending: a reset applies it",
            ),
            (
                (g.ecc_volatile_uncorrected or 0) > 0,
                Action.REBOOT,
                "EccUncorrectable",
                f"{g.ecc_volatile_uncorrected} uncorrectable ECC errors since the last reset",
            ),
            (
                (g.sram_volatile_uncorrected or 0) > 0,
                Action.REBOOT,
                "SramUncorrectable",
                f"{g.sram_volatile_uncorrected} uncorrectable SRAM errors since the last reset",
            ),
        ]
        for present, action, reason, message in signs:
            if present:
                return Finding(
                    comp, "GpuMemoryErrors", Status.FAULT, reason, message, action, evidence
                )
        return Finding(
            comp,
            "GpuMemoryErrors",
            Status.OK,
            "NoUncorrectableErrors",
            "no uncorrectable memory errors",
            evidence=evidence,
        )

    @staticmethod
    def _nvlink(comp: str, g: nvml.GpuReading, want: int | None, base: dict) -> Finding:
        evidence = base | {
            "active": g.nvlinks_active,
            "inactive": g.nvlinks_inactive,
            "expected": want,
        }
        short = want is not None and g.nvlinks_active is not None and g.nvlinks_active < want
        if g.nvlinks_inactive or short:
            return Finding(
                comp,
                "GpuNvLink",
                Status.FAULT,
                "NvLinkDown",
                f"{g.nvlinks_active} NVLinks active"
                + (f" of {want}" if want else "")
                + (f"; inactive: {g.nvlinks_inactive}" if g.nvlinks_inactive else ""),
                Action.REBOOT,
                evidence,
            )
        return Finding(
            comp,
            "GpuNvLink",
            Status.OK,
            "NvLinksUp",
            f"{g.nvlinks_active or 0} NVLinks active",
            evidence=evidence,
        )

    @staticmethod
    def _pcie(
        comp: str, g: nvml.GpuReading, gen: int | None, width: int | None, base: dict
    ) -> Finding:
        # The current generation drops when a GPU idles (power saving): judge the link's
        # trained maximum, and the width, which does not change with load.
        evidence = base | {
            "width": g.pcie_width,
            "max_gen": g.pcie_max_gen,
            "expected_width": width,
            "expected_gen": gen,
        }
        narrow = width is not None and g.pcie_width is not None and g.pcie_width < width
        slow = gen is not None and g.pcie_max_gen is not None and g.pcie_max_gen < gen
        if narrow or slow:
            return Finding(
                comp,
                "GpuPcieLink",
                Status.FAULT,
                "PcieLinkDegraded",
                f"PCIe link x{g.pcie_width} Gen{g.pcie_max_gen}, expected x{width} Gen{gen}",
                Action.REBOOT,
                evidence,
            )
        return Finding(
            comp,
            "GpuPcieLink",
            Status.OK,
            "PcieLinkAsExpected",
            f"PCIe link x{g.pcie_width} Gen{g.pcie_max_gen}",
            evidence=evidence,
        )

    def _slowdown(self, comp: str, g: nvml.GpuReading, opts: NvmlOptions, base: dict) -> Finding:
        """Slowdowns count only while the GPU is busy: an idle GPU's clocks say nothing, and
        an idle poll neither counts nor resets; a busy poll without one resets."""
        busy = g.utilization is not None and g.utilization >= opts.busy_percent
        reasons = sorted(
            {name for bit, name in SLOWDOWNS.items() if (g.clock_event_reasons or 0) & bit}
        )
        margin = g.thermal_margin
        if margin is None and g.slowdown_temperature is not None and g.temperature is not None:
            margin = g.slowdown_temperature - g.temperature
        if margin is not None and margin <= opts.thermal_margin:
            reasons.append("ThermalMarginLow")
        n = self._slow.get(comp, 0)
        if busy:
            n = self._slow[comp] = n + 1 if reasons else 0
        evidence = base | {
            "clock_event_reasons": g.clock_event_reasons,
            "utilization": g.utilization,
            "temperature": g.temperature,
            "slowdown_temperature": g.slowdown_temperature,
            "thermal_margin": margin,
            "busy_polls": n,
        }
        if n >= opts.slowdown_polls:
            return Finding(
                comp,
                "GpuDegraded",
                Status.FAULT,
                reasons[0] if reasons else "HardwareSlowdown",
                f"clocks held down by {', '.join(reasons)} for {n} busy polls"
                + (f"; {margin} C below the slowdown threshold" if margin is not None else ""),
                Action.NONE,
                evidence,
            )
        return Finding(
            comp,
            "GpuDegraded",
            Status.OK,
            "NoHardwareSlowdown",
            "no persistent hardware slowdown while busy",
            evidence=evidence,
        )

    def _counters(self, g: nvml.GpuReading, now: float) -> list[Finding]:
        """NVLink and PCIe error counters by rate (checks.counters), where NVML reports them."""
        comp = f"gpu:{g.pci}" if g.pci else f"gpu:index{g.index}"
        found = []
        if g.nvlink_errors:
            breaches = [
                b
                for link, counts in sorted(g.nvlink_errors.items())
                for name, value in counts.items()
                for b in self.velocity.observe(
                    now, f"{comp}/nvlink{link}/{name}", f"nvlink_{name}", value
                )
            ]
            found.append(_counter_finding(f"{comp}/nvlink", breaches, "NVLink error counters"))
        if g.pcie_replays is not None:
            breaches = self.velocity.observe(now, f"{comp}/pcie", "pcie_replay", g.pcie_replays)
            found.append(_counter_finding(f"{comp}/pcie", breaches, "PCIe replays"))
        return found


def _counter_finding(comp: str, breaches: list[Breach], what: str) -> Finding:
    if not breaches:
        return Finding(
            comp, "GpuDegraded", Status.OK, "ErrorCountersWithinLimits", f"{what} within limits"
        )
    lead = next((b for b in breaches if b.permanent), breaches[0])
    # keys end in .../nvlink<n>/<counter> or .../pcie: name the link where there is one
    where = [b.key.split("/")[-2] + " " if "/nvlink" in b.key else "" for b in breaches]
    return Finding(
        comp,
        "GpuDegraded",
        Status.FAULT,
        lead.limit.reason + ("Persistent" if lead.permanent else ""),
        f"{what}: " + "; ".join(w + b.describe() for w, b in zip(where, breaches, strict=True)),
        evidence={
            "breaches": [
                {
                    "key": b.key,
                    "increase": b.increase,
                    "limit": b.limit.describe(),
                    "permanent": b.permanent,
                }
                for b in breaches
            ]
        },
    )
