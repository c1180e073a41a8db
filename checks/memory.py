"""Memory exhaustion: available memory under a threshold, or tasks stalled waiting for memory
(pressure stall information, the "full" line of /proc/pressure/memory where the kernel has
it), for several polls in a row.

Reads `/proc/meminfo` under the host root through psutil. Exhaustion is usually a workload's
doing, not the hardware's, so the default action asks for the application to be restarted and
leaves the node schedulable; change `action` to make it count against the node.
"""

from __future__ import annotations

from typing import ClassVar

import psutil
from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, Finding, PollingCheck, Status

CONDITION = "MemoryExhaustion"


class MemoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    available_min_percent: float = Field(5.0, ge=0, le=100)
    polls: int = Field(3, ge=1, description="consecutive polls under the threshold to report")
    action: Action = Action.RESTART_APP
    psi_full_avg60_percent: float = Field(
        25.0, ge=0, le=100, description="share of the last minute all tasks stalled on memory"
    )


class MemoryCheck(PollingCheck):
    name = "memory"
    description = "available memory against a threshold (psutil, /proc/meminfo)"
    interval = 30.0
    timeout = 10.0
    needs_paths = ("/proc/meminfo",)
    Options: ClassVar[type[BaseModel]] = MemoryOptions

    _low_polls = 0

    def collect(self) -> list[Finding]:
        opts: MemoryOptions = self.options  # type: ignore[assignment]
        psutil.PROCFS_PATH = str(self.ctx.path("/proc"))
        vm = psutil.virtual_memory()
        available_pct = 100.0 * vm.available / vm.total if vm.total else 0.0
        evidence = {
            "total_bytes": vm.total,
            "available_bytes": vm.available,
            "available_percent": round(available_pct, 2),
            "threshold_percent": opts.available_min_percent,
        }
        stall = self._psi_full_avg60()
        if stall is not None:
            evidence["psi_full_avg60"] = stall
        low = available_pct < opts.available_min_percent
        stalled = stall is not None and stall >= opts.psi_full_avg60_percent
        self._low_polls = self._low_polls + 1 if low or stalled else 0
        if self._low_polls >= opts.polls:
            if low:
                reason = "MemoryExhausted"
                message = (
                    f"available memory {available_pct:.1f}% is under "
                    f"{opts.available_min_percent}% for {self._low_polls} polls"
                )
            else:
                reason = "MemoryPressureStall"
                message = (
                    f"all tasks stalled on memory {stall:.1f}% of the last minute "
                    f"(threshold {opts.psi_full_avg60_percent}%) for {self._low_polls} "
                    "polls"
                )
            return [
                Finding(
                    component="memory",
                    condition=CONDITION,
                    status=Status.FAULT,
                    reason=reason,
                    message=message,
                    action=opts.action,
                    evidence=evidence | {"polls_under_threshold": self._low_polls},
                )
            ]
        return [
            Finding(
                component="memory",
                condition=CONDITION,
                status=Status.OK,
                reason="MemoryAvailable",
                message=f"available memory {available_pct:.1f}%",
                evidence=evidence,
            )
        ]

    def _psi_full_avg60(self) -> float | None:
        """avg60 of the "full" line of /proc/pressure/memory (Documentation/accounting/psi.rst);
        None where the kernel has no PSI."""
        try:
            text = self.ctx.path("/proc/pressure/memory").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            kind, *fields = line.split()
            if kind == "full":
                values = dict(f.split("=", 1) for f in fields if "=" in f)
                try:
                    return float(values["avg60"])
                except (KeyError, ValueError):
                    return None
        return None
