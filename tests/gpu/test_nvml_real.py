"""The NVML check on a real GPU (run with `pytest -m gpu` on a GPU machine; skipped without)."""

from __future__ import annotations

import pytest

from checks.api import CheckContext, Status
from checks.nvidia import nvml
from checks.nvidia.check import NvmlCheck

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def snapshot() -> nvml.Snapshot:
    try:
        return nvml.PynvmlBackend().snapshot()
    except nvml.NvmlError as exc:
        pytest.skip(f"no NVIDIA GPU here: {exc}")


def test_real_snapshot_reads_every_gpu(snapshot: nvml.Snapshot) -> None:
    assert snapshot.count == len(snapshot.gpus) >= 1
    for gpu in snapshot.gpus:
        assert gpu.error is None, gpu.error
        assert gpu.pci.count(":") == 2 and gpu.name


def test_real_snapshot_reads_the_degradation_signals(snapshot: nvml.Snapshot) -> None:
    for gpu in snapshot.gpus:
        assert gpu.utilization is not None and 0 <= gpu.utilization <= 100
        assert gpu.temperature is not None and gpu.slowdown_temperature is not None
        assert gpu.slowdown_temperature > gpu.temperature
        assert gpu.pcie_replays is not None and gpu.pcie_replays >= 0
        if gpu.nvlinks_active and ("H100" in gpu.name or "H200" in gpu.name):
            # Hopper reports the data-link error counters per link as field values
            assert len(gpu.nvlink_errors) >= gpu.nvlinks_active
            assert all(set(c) == {"replay", "recovery", "crc"} for c in gpu.nvlink_errors.values())


def test_real_check_finds_a_healthy_gpu_healthy(snapshot: nvml.Snapshot) -> None:
    found = NvmlCheck(CheckContext()).collect()
    assert not [f for f in found if f.status is Status.FAULT and f.condition != "GpuDegraded"]


def test_real_xid_event_set_waits_and_closes(snapshot: nvml.Snapshot) -> None:
    events = nvml.PynvmlXidEvents()
    try:
        assert events.wait(0.2) is None  # a healthy GPU raises no critical XID in 0.2 s
    finally:
        events.close()
