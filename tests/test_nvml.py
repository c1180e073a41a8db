"""The NVML check on a fake NVML: every finding it can make, and what it leaves alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from checks.api import Action, CheckContext, Status
from checks.nvidia import nvml
from checks.nvidia.check import NvmlCheck, NvmlOptions
from checks.nvidia.nvml import GpuReading, NvmlError, Snapshot, pci_of


class FakeNvml:
    """What NVML would answer, or the error it would raise; given a list of snapshots, one
    per poll (error counters and clock reasons as sequences), the last one repeating."""

    def __init__(
        self, snapshot: Snapshot | list[Snapshot] | None = None, error: NvmlError | None = None
    ) -> None:
        self.snaps = list(snapshot) if isinstance(snapshot, list) else [snapshot]
        self.error = error

    def snapshot(self) -> Snapshot:
        if self.error is not None:
            raise self.error
        snap = self.snaps.pop(0) if len(self.snaps) > 1 else self.snaps[0]
        assert snap is not None
        return snap


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
                utilization=97,
                temperature=52,
                slowdown_temperature=87,
                pcie_replays=0,
                nvlink_errors={link: {"replay": 0, "recovery": 0, "crc": 0} for link in range(18)},
            )
            for i in range(n)
        ],
        driver="550.90.07",
    )


def check(
    snap: Snapshot | list[Snapshot] | None = None,
    error: NvmlError | None = None,
    instance_type: str | None = "p5.48xlarge",
    ctx: CheckContext | None = None,
    times: list[float] | None = None,
    **options,
) -> NvmlCheck:
    ctx = ctx or CheckContext(instance_type=instance_type)
    c = NvmlCheck(ctx, NvmlOptions(**options), backend=FakeNvml(snap, error))
    if times is not None:
        clock = iter(times)
        c.clock = lambda: next(clock)
    return c


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
        "GpuDegraded",
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
        ("gpu:0000:54:00", "GpuDegraded", "PowerBrakeSlowdown", Action.NONE)
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


def test_a_slowdown_counts_only_while_the_gpu_is_busy() -> None:
    slow = nvml.HW_THERMAL_SLOWDOWN
    seq = [
        with_gpu(healthy_p5(), 4, clock_event_reasons=slow),  # busy: 1
        with_gpu(healthy_p5(), 4, clock_event_reasons=slow, utilization=3),  # idle: holds
        with_gpu(healthy_p5(), 4, clock_event_reasons=slow),  # busy: 2
        healthy_p5(),  # busy, full clocks: resets
        with_gpu(healthy_p5(), 4, clock_event_reasons=slow),  # busy: 1
    ]
    c = check(seq, slowdown_polls=2)
    assert faults(c.collect()) == []
    assert faults(c.collect()) == []
    assert faults(c.collect()) == [
        ("gpu:0000:57:00", "GpuDegraded", "ThermalSlowdown", Action.NONE)
    ]
    assert faults(c.collect()) == []
    assert faults(c.collect()) == []


def test_an_idle_gpu_and_the_software_power_cap_are_never_a_slowdown() -> None:
    idle = with_gpu(healthy_p5(), 0, clock_event_reasons=nvml.HW_SLOWDOWN, utilization=0)
    power_cap = with_gpu(healthy_p5(), 0, clock_event_reasons=0x04)  # SW power cap, busy
    for snap in (idle, power_cap):
        c = check(snap, slowdown_polls=1)
        assert faults(c.collect() + c.collect()) == []


def test_a_busy_gpu_close_to_its_slowdown_temperature_is_degraded() -> None:
    hot = with_gpu(healthy_p5(), 6, temperature=84, slowdown_temperature=87)
    c = check(hot, slowdown_polls=2)
    c.collect()
    (f,) = [f for f in c.collect() if f.status is Status.FAULT]
    assert (f.component, f.condition, f.reason) == (
        "gpu:0000:59:00",
        "GpuDegraded",
        "ThermalMarginLow",
    )
    assert "3 C below the slowdown threshold" in f.message
    assert faults(check(hot, slowdown_polls=1, thermal_margin=2).collect()) == []


def nvlink(snap: Snapshot, gpu: int, link: int, **counts: int) -> Snapshot:
    errors = {n: dict(c) for n, c in snap.gpus[gpu].nvlink_errors.items()}
    errors[link].update(counts)
    return with_gpu(snap, gpu, nvlink_errors=errors)


def test_nvlink_error_counters_by_rate_not_by_total() -> None:
    old = nvlink(healthy_p5(), 2, 7, replay=120_000, recovery=505, crc=9_000_000)
    seq = [
        old,
        nvlink(old, 2, 7, replay=120_001, crc=9_005_000),  # within 1/min and 100/s
        nvlink(old, 2, 7, replay=120_001, recovery=508, crc=9_005_000),
    ]
    c = check(seq, times=[0.0, 60.0, 120.0])
    assert faults(c.collect()) == []
    assert faults(c.collect()) == []
    found = c.collect()
    assert faults(found) == [
        ("gpu:0000:55:00/nvlink", "GpuDegraded", "NvLinkRecoveryRate", Action.NONE)
    ]
    (f,) = [f for f in found if f.status is Status.FAULT]
    assert "nvlink7 nvlink_recovery 3/min (limit >1/min)" in f.message


def test_nvlink_recovery_bursts_strike_out_and_hold_until_a_reboot(tmp_path) -> None:
    host = tmp_path / "host"
    (host / "proc/sys/kernel/random").mkdir(parents=True)
    (host / "proc/sys/kernel/random/boot_id").write_text("boot-a\n")
    ctx = CheckContext(host_root=host, instance_type="p5.48xlarge", state_dir=tmp_path / "s")
    snaps, value = [healthy_p5()], 0
    for _ in range(3):  # three bursts, each followed by a quiet minute
        value += 4
        snaps += [nvlink(healthy_p5(), 0, 1, recovery=value)] * 2
    times = [i * 60.0 for i in range(len(snaps))]
    c = check(snaps, ctx=ctx, times=times)
    reasons = [[r for _, _, r, _ in faults(c.collect())] for _ in snaps]
    assert reasons == [
        [],
        ["NvLinkRecoveryRate"],
        [],
        ["NvLinkRecoveryRate"],
        [],
        ["NvLinkRecoveryRatePersistent"],
        ["NvLinkRecoveryRatePersistent"],
    ]
    # an agent restart in the same boot remembers the strikes ...
    again = check(snaps[-1], ctx=ctx, times=[1000.0])
    assert faults(again.collect()) == [
        ("gpu:0000:53:00/nvlink", "GpuDegraded", "NvLinkRecoveryRatePersistent", Action.NONE)
    ]
    # ... and a reboot (a new boot id) starts from new counters
    (host / "proc/sys/kernel/random/boot_id").write_text("boot-b\n")
    assert faults(check(healthy_p5(), ctx=ctx, times=[5.0]).collect()) == []


def test_nvlink_counters_reset_by_a_gpu_reset_are_a_new_baseline() -> None:
    old = nvlink(healthy_p5(), 3, 0, replay=800)
    seq = [old, healthy_p5(), nvlink(healthy_p5(), 3, 0, replay=1)]
    c = check(seq, times=[0.0, 60.0, 120.0])
    assert [faults(c.collect()) for _ in seq] == [[], [], []]


def test_pcie_replays_over_the_dcgm_rate() -> None:
    seq = [healthy_p5(), with_gpu(healthy_p5(), 5, pcie_replays=9)]
    c = check(seq, times=[0.0, 60.0])
    c.collect()
    assert faults(c.collect()) == [
        ("gpu:0000:58:00/pcie", "GpuDegraded", "PcieReplayRate", Action.NONE)
    ]


def test_gpus_without_error_counters_report_none_of_them() -> None:
    bare = healthy_p5()
    bare = replace(bare, gpus=[replace(g, nvlink_errors={}, pcie_replays=None) for g in bare.gpus])
    found = check(bare).collect()
    assert not [f for f in found if f.component.endswith(("/nvlink", "/pcie"))]


def field_values(counts: dict[tuple[int, int], int], fails: set[int] = frozenset()):
    """What nvmlDeviceGetFieldValues fills in for (field id, link) requests (pynvml's structs)."""
    import pynvml

    def get(handle, ids):
        out = (pynvml.c_nvmlFieldValue_t * len(ids))()
        for v, (fid, link) in zip(out, ids, strict=True):
            v.fieldId, v.scopeId = fid, link
            v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED if link in fails else 0
            v.value.ullVal = counts.get((fid, link), 0)
        return out

    return get


def test_hopper_nvlink_error_counters_are_read_as_field_values_per_link(monkeypatch) -> None:
    import pynvml

    replay, crc = pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC
    counts = {(replay, 0): 7, (crc, 1): 12}
    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", field_values(counts, fails={2}))
    assert nvml._nvlink_errors(pynvml, object(), 3) == {
        0: {"replay": 7, "recovery": 0, "crc": 0},
        1: {"replay": 0, "recovery": 0, "crc": 12},
    }


def test_older_gpus_answer_the_per_link_counter_call_and_blackwell_neither(monkeypatch) -> None:
    import pynvml

    def unsupported(*args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", unsupported)
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetNvLinkErrorCounter", lambda h, link, counter: 10 * link + counter
    )
    assert nvml._nvlink_errors(pynvml, object(), 2) == {
        0: {"replay": 0, "recovery": 1, "crc": 2},
        1: {"replay": 10, "recovery": 11, "crc": 12},
    }
    monkeypatch.setattr(pynvml, "nvmlDeviceGetNvLinkErrorCounter", unsupported)
    assert nvml._nvlink_errors(pynvml, object(), 2) == {}
