"""The memory check on a host tree (the kernel documentation's /proc/meminfo example)."""

from __future__ import annotations

from pathlib import Path

from checks.api import Action, CheckContext, Status
from checks.memory import MemoryCheck, MemoryOptions


def test_reads_meminfo_under_the_host_root(host_root: Path) -> None:
    check = MemoryCheck(CheckContext(host_root=host_root))
    (finding,) = check.collect()
    assert finding.status is Status.OK
    assert finding.evidence["total_bytes"] == 32858820 * 1024
    assert finding.evidence["available_bytes"] == 27214312 * 1024
    assert finding.evidence["available_percent"] == 82.82


def test_fault_only_after_the_configured_number_of_low_polls(host_root: Path) -> None:
    opts = MemoryOptions(available_min_percent=90, polls=2, action=Action.REBOOT)
    check = MemoryCheck(CheckContext(host_root=host_root), opts)
    assert check.collect()[0].status is Status.OK
    (fault,) = check.collect()
    assert fault.status is Status.FAULT and fault.action is Action.REBOOT
    assert fault.reason == "MemoryExhausted" and "82.8% is under 90.0%" in fault.message


def test_recovers_as_soon_as_memory_is_back(host_root: Path) -> None:
    opts = MemoryOptions(available_min_percent=90, polls=1)
    check = MemoryCheck(CheckContext(host_root=host_root), opts)
    assert check.collect()[0].status is Status.FAULT
    check.options = MemoryOptions(available_min_percent=50, polls=1)
    assert check.collect()[0].status is Status.OK


def test_missing_meminfo_is_named(tmp_path: Path) -> None:
    check = MemoryCheck(CheckContext(host_root=tmp_path))
    assert check.missing() == ["/proc/meminfo not found"]
