"""The NVML check on a fake NVML: every finding it can make, and what it leaves alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from checks.api import Action, CheckContext, Status
from checks.nvidia import nvml
from checks.nvidia.check import NvmlCheck, NvmlOptions
from checks.nvidia.nvml import GpuReading, NvmlError, Snapshot, pci_of


class FakeNvml:
    """What NVML would answer, or the error it would raise."""

    def __init__(self, snapshot: Snapshot | None = None, error: NvmlError | None = None) -> None:
        self.snap = snapshot
        self.error = error

    def snapshot(self) -> Snapshot:
        if self.error is not None:
            raise self.error
        assert self.snap is not None
        return self.snap


def healthy_p5(n: int = 8) -> Snapshot:
    return Snapshot(
        n,
        [
            GpuReading(
                index=i,
                pci=f"0000:{0x53 + i:02x}:00",
                name="NVIDIA H100 80GB HBM3",
                ecc_volatile_uncorrected=0,
                ecc_aggregate_uncorrected=0,
                sram_volatile_uncorrected=0,
                retired_pages=0,
                retirement_pending=False,
                remapped_rows_uncorrectable=0,
                remap_pending=False,
                remap_failure=False,
                nvlinks_active=18,
                pcie_width=16,
                pcie_max_gen=5,
                clock_event_reasons=0,
            )
            for i in range(n)
        ],
        driver="550.90.07",
    )


def check(
    snap: Snapshot | None = None,
    error: NvmlError | None = None,
    instance_type: str | None = "p5.48xlarge",
    **options,
) -> NvmlCheck:
    ctx = CheckContext(instance_type=instance_type)
    return NvmlCheck(ctx, NvmlOptions(**options), backend=FakeNvml(snap, error))


def faults(findings):
    return [
        (f.component, f.condition, f.reason, f.action) for f in findings if f.status is Status.FAULT
    ]


def with_gpu(snap: Snapshot, index: int, **changes) -> Snapshot:
    gpus = list(snap.gpus)
    gpus[index] = replace(gpus[index], **changes)
    return replace(snap, gpus=gpus)


def test_healthy_node_reports_every_condition_ok() -> None:
    found = check(healthy_p5()).collect()
    assert faults(found) == []
    assert {f.condition for f in found} == {
        "NvidiaGPUCount",
        "NvidiaGPUUnhealthy",
        "GpuMemoryErrors",
        "GpuNvLink",
        "GpuPcieLink",
        "GpuThrottling",
    }
    assert len([f for f in found if f.condition == "GpuNvLink"]) == 8


def test_a_gpu_gone_from_the_bus_without_any_xid_is_a_short_count() -> None:
    snap = healthy_p5(7)
    assert faults(check(snap).collect()) == [
        ("node", "NvidiaGPUCount", "GpuCountMismatch", Action.REBOOT)
    ]
    assert faults(check(snap, gpus=7).collect()) == []  # a setting can lower the expectation
    assert faults(check(snap, instance_type=None).collect()) == []  # nothing known, no verdict


@pytest.mark.parametrize(
    ("code", "reason", "action"),
    [
        (nvml.GPU_IS_LOST, "GpuIsLost", Action.REPLACE),
        (nvml.UNKNOWN, "NvmlError", Action.REBOOT),
    ],
)
def test_nvml_errors_on_a_gpu_are_findings(code: int, reason: str, action: Action) -> None:
    snap = with_gpu(healthy_p5(), 3, error=NvmlError(code, "boom"))
    assert faults(check(snap).collect()) == [
        ("gpu:0000:56:00", "NvidiaGPUUnhealthy", reason, action)
    ]


@pytest.mark.parametrize(
    ("changes", "reason", "action"),
    [
        ({"remap_failure": True, "remap_pending": True}, "RowRemapFailure", Action.REPLACE),
        ({"retired_pages": 60}, "RetiredPagesLimit", Action.REPLACE),
        ({"remap_pending": True}, "RowRemapPending", Action.REBOOT),
        ({"retirement_pending": True}, "PageRetirementPending", Action.REBOOT),
        ({"ecc_volatile_uncorrected": 2}, "EccUncorrectable", Action.REBOOT),
        ({"sram_volatile_uncorrected": 1}, "SramUncorrectable", Action.REBOOT),
    ],
)
def test_memory_errors_worst_first(changes: dict, reason: str, action: Action) -> None:
    found = check(with_gpu(healthy_p5(), 0, **changes)).collect()
    assert faults(found) == [("gpu:0000:53:00", "GpuMemoryErrors", reason, action)]


def test_aggregate_errors_alone_are_history_not_a_fault() -> None:
    assert faults(check(with_gpu(healthy_p5(), 0, ecc_aggregate_uncorrected=4)).collect()) == []


def test_inactive_nvlink() -> None:
    snap = with_gpu(healthy_p5(), 5, nvlinks_active=17, nvlinks_inactive=[11])
    (f,) = [f for f in check(snap).collect() if f.status is Status.FAULT]
    assert (f.condition, f.reason, f.action) == ("GpuNvLink", "NvLinkDown", Action.REBOOT)
    assert "17 NVLinks active of 18; inactive: [11]" in f.message


def test_pcie_width_and_trained_generation() -> None:
    narrow = with_gpu(healthy_p5(), 2, pcie_width=8)
    assert faults(check(narrow).collect()) == [
        ("gpu:0000:55:00", "GpuPcieLink", "PcieLinkDegraded", Action.REBOOT)
    ]
    gen4 = with_gpu(healthy_p5(), 2, pcie_max_gen=4)
    assert faults(check(gen4).collect())[0][2] == "PcieLinkDegraded"


def test_persistent_hardware_slowdown_is_an_event_after_n_polls() -> None:
    snap = with_gpu(healthy_p5(), 1, clock_event_reasons=nvml.HW_POWER_BRAKE_SLOWDOWN)
    c = check(snap, slowdown_polls=2)
    assert faults(c.collect()) == []
    assert faults(c.collect()) == [
        ("gpu:0000:54:00", "GpuThrottling", "PowerBrakeSlowdown", Action.NONE)
    ]
    c.backend = FakeNvml(healthy_p5())
    assert faults(c.collect()) == []


def test_no_driver_means_skipped_not_faulty() -> None:
    c = check(error=NvmlError(nvml.LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"))
    assert c.missing() == ["no NVIDIA driver (NVML Shared Library Not Found)"]
    c = check(error=NvmlError(nvml.DRIVER_NOT_LOADED, "Driver Not Loaded"))
    assert c.missing() == ["no NVIDIA driver (Driver Not Loaded)"]


def test_nvml_failing_mid_poll_raises_so_the_runner_reports_unknown() -> None:
    with pytest.raises(NvmlError):
        check(error=NvmlError(nvml.UNKNOWN, "Unknown Error")).collect()


def test_bus_ids_read_as_the_kernel_log_writes_them() -> None:
    assert pci_of("00000000:B9:00.0") == "0000:b9:00"
    assert pci_of("00000008:01:00.0") == "0008:01:00"
    assert pci_of("garbage") == "garbage"
