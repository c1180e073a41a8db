"""The one seam between the agent and NVIDIA's management library (NVML, through pynvml).

`Nvml.snapshot()` returns plain readings; everything the check decides, it decides on those,
so tests give it a fake and a GPU machine gives it the real library. A metric the GPU does not
support reads None (not a fault); a device NVML reports lost, or that fails with NVML's
"unknown error", carries that error instead of readings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# NVML return codes (nvml.h), as pynvml's NVMLError.value carries them.
NOT_SUPPORTED = 3
INVALID_ARGUMENT = 2
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
UNKNOWN = 999
_ABSENT = {NOT_SUPPORTED, FUNCTION_NOT_FOUND, INVALID_ARGUMENT}

# Clock event reasons (nvml.h, nvmlClocksEventReason*): the hardware-driven slowdowns.
HW_SLOWDOWN = 0x08
SW_THERMAL_SLOWDOWN = 0x20
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE_SLOWDOWN = 0x80


class NvmlError(Exception):
    """An NVML call failed; `code` is NVML's return code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass
class GpuReading:
    index: int
    pci: str = ""  # dddd:bb:dd, as kernel-log XIDs name the GPU
    name: str = ""
    error: NvmlError | None = None  # the device could not be read at all
    ecc_volatile_uncorrected: int | None = None
    ecc_aggregate_uncorrected: int | None = None
    sram_volatile_uncorrected: int | None = None
    retired_pages: int | None = None
    retirement_pending: bool | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    nvlinks_active: int | None = None
    nvlinks_inactive: list[int] = field(default_factory=list)
    pcie_width: int | None = None
    pcie_max_gen: int | None = None
    clock_event_reasons: int | None = None
    compute_processes: int | None = None  # processes using the GPU now (deep-check waits)
    utilization: int | None = None  # percent of the last sample period a kernel ran
    temperature: int | None = None  # GPU core, degrees C
    slowdown_temperature: int | None = None  # where the hardware starts to slow down
    thermal_margin: int | None = None  # NVML's own margin to the nearest slowdown threshold
    pcie_replays: int | None = None  # PCIe replay counter (since the driver loaded)
    # link -> {"replay", "recovery", "crc"} -> count: NVLink data-link error counters
    nvlink_errors: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass
class Snapshot:
    count: int
    gpus: list[GpuReading]
    driver: str = ""


class Nvml(Protocol):
    def snapshot(self) -> Snapshot:
        """One reading of every GPU. Raises NvmlError when NVML itself cannot start."""
        ...


def missing_driver(probe: Callable[[], Any]) -> list[str]:
    """What a check that needs NVML lacks here, in words: run `probe`, which touches NVML."""
    try:
        probe()
    except ImportError:
        return ["pynvml not installed"]
    except NvmlError as exc:
        if exc.code in (LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED):
            return [f"no NVIDIA driver ({exc})"]
    return []


def pci_of(bus_id: str) -> str:
    """NVML's `00000000:B9:00.0` as `0000:b9:00`."""
    parts = bus_id.lower().split(":")
    if len(parts) != 3:
        return bus_id.lower()
    domain, bus, device = parts
    return f"{domain[-4:]:0>4}:{bus}:{device.split('.')[0]}"


class PynvmlBackend:
    """The real library. Each snapshot initialises NVML and shuts it down again."""

    def snapshot(self) -> Snapshot:
        import pynvml as nv

        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise NvmlError(exc.value, str(exc)) from None
        try:
            count = nv.nvmlDeviceGetCount()
            driver = _text(_optional(nv.nvmlSystemGetDriverVersion))
            return Snapshot(count, [self._gpu(nv, i) for i in range(count)], driver or "")
        except nv.NVMLError as exc:
            raise NvmlError(exc.value, str(exc)) from None
        finally:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlShutdown()

    def _gpu(self, nv: Any, index: int) -> GpuReading:
        r = GpuReading(index)
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            r.pci = pci_of(_text(nv.nvmlDeviceGetPciInfo(h).busId))
            r.name = _text(nv.nvmlDeviceGetName(h))
            unc = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
            r.ecc_volatile_uncorrected = _optional(
                nv.nvmlDeviceGetTotalEccErrors, h, unc, nv.NVML_VOLATILE_ECC
            )
            r.ecc_aggregate_uncorrected = _optional(
                nv.nvmlDeviceGetTotalEccErrors, h, unc, nv.NVML_AGGREGATE_ECC
            )
            r.sram_volatile_uncorrected = _optional(
                nv.nvmlDeviceGetMemoryErrorCounter,
                h,
                unc,
                nv.NVML_VOLATILE_ECC,
                nv.NVML_MEMORY_LOCATION_SRAM,
            )
            pages = [
                _optional(nv.nvmlDeviceGetRetiredPages, h, cause)
                for cause in (
                    nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                    nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
                )
            ]
            if all(p is not None for p in pages):
                r.retired_pages = sum(len(p) for p in pages)
            pending = _optional(nv.nvmlDeviceGetRetiredPagesPendingStatus, h)
            r.retirement_pending = None if pending is None else bool(pending)
            remap = _optional(nv.nvmlDeviceGetRemappedRows, h)
            if remap is not None:
                _, unc_rows, is_pending, failed = remap
                r.remapped_rows_uncorrectable = unc_rows
                r.remap_pending, r.remap_failure = bool(is_pending), bool(failed)
            self._nvlinks(nv, h, r)
            r.pcie_width = _optional(nv.nvmlDeviceGetCurrPcieLinkWidth, h)
            r.pcie_max_gen = _optional(nv.nvmlDeviceGetMaxPcieLinkGeneration, h)
            r.clock_event_reasons = _optional(nv.nvmlDeviceGetCurrentClocksEventReasons, h)
            procs = _optional(nv.nvmlDeviceGetComputeRunningProcesses, h)
            r.compute_processes = None if procs is None else len(procs)
            util = _optional(nv.nvmlDeviceGetUtilizationRates, h)
            r.utilization = None if util is None else int(util.gpu)
            r.temperature = _optional(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            r.slowdown_temperature = _optional(
                nv.nvmlDeviceGetTemperatureThreshold, h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
            )
            if (margin := getattr(nv, "nvmlDeviceGetMarginTemperature", None)) is not None:
                r.thermal_margin = _optional(margin, h)  # driver 555 and later
            r.pcie_replays = _optional(nv.nvmlDeviceGetPcieReplayCounter, h)
            if r.nvlinks_active:
                r.nvlink_errors = _nvlink_errors(nv, h, r.nvlinks_active + len(r.nvlinks_inactive))
        except nv.NVMLError as exc:
            r.error = NvmlError(exc.value, str(exc))
        return r

    @staticmethod
    def _nvlinks(nv: Any, h: Any, r: GpuReading) -> None:
        active, inactive = 0, []
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            state = _optional(nv.nvmlDeviceGetNvLinkState, h, link)
            if state is None:
                continue  # no such link on this GPU
            if state == nv.NVML_FEATURE_ENABLED:
                active += 1
            else:
                inactive.append(link)
        if active or inactive:
            r.nvlinks_active, r.nvlinks_inactive = active, inactive


# NVLink error counters by field value, scoped to a link: what Hopper reports (NVML's change
# log, r525: the per-link NVML_FI_DEV_NVLINK_*_ERROR_COUNT_L<n> fields were replaced by
# these "with scope as link ID"). Older GPUs answer nvmlDeviceGetNvLinkErrorCounter instead;
# Blackwell supports neither (r565 change log), and reads as not supported.
# (our name, the field value id, the nvmlNvLinkErrorCounter_t), as pynvml names them
NVLINK_COUNTERS = (
    ("replay", "NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY", "NVML_NVLINK_ERROR_DL_REPLAY"),
    ("recovery", "NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY", "NVML_NVLINK_ERROR_DL_RECOVERY"),
    ("crc", "NVML_FI_DEV_NVLINK_ERROR_DL_CRC", "NVML_NVLINK_ERROR_DL_CRC_FLIT"),
)


def _nvlink_errors(nv: Any, h: Any, links: int) -> dict[int, dict[str, int]]:
    names = {getattr(nv, field): name for name, field, _ in NVLINK_COUNTERS}
    ids = [(fid, link) for link in range(links) for fid in names]
    out: dict[int, dict[str, int]] = {}
    for v in _optional(nv.nvmlDeviceGetFieldValues, h, ids) or ():
        if v.nvmlReturn == 0:  # per field: a link or counter this GPU lacks fails alone
            out.setdefault(int(v.scopeId), {})[names[v.fieldId]] = int(v.value.ullVal)
    if out:
        return out
    for link in range(links):
        for name, _, counter in NVLINK_COUNTERS:
            value = _optional(nv.nvmlDeviceGetNvLinkErrorCounter, h, link, getattr(nv, counter))
            if value is not None:
                out.setdefault(link, {})[name] = int(value)
    return out


def _optional(fn: Any, *args: Any) -> Any:
    """A reading, or None where the GPU or driver does not support it."""
    import pynvml as nv

    try:
        return fn(*args)
    except nv.NVMLError as exc:
        if exc.value in _ABSENT:
            return None
        raise


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


TIMEOUT = 10  # NVML_ERROR_TIMEOUT: nvmlEventSetWait saw no event in time


@dataclass(frozen=True)
class XidEvent:
    pci: str
    xid: int


class XidEvents(Protocol):
    def wait(self, timeout: float) -> XidEvent | None:
        """The next critical XID on any GPU, or None after `timeout` seconds. Blocking."""
        ...

    def close(self) -> None: ...


class PynvmlXidEvents:
    """NVML's event API: one event set with every GPU registered for critical XIDs."""

    def __init__(self) -> None:
        import ctypes

        import pynvml as nv

        self._ctypes, self._nv = ctypes, nv
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise NvmlError(exc.value, str(exc)) from None
        self._pci: dict[int | None, str] = {}
        try:
            self._set = nv.nvmlEventSetCreate()
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                if (
                    _optional(
                        nv.nvmlDeviceRegisterEvents, h, nv.nvmlEventTypeXidCriticalError, self._set
                    )
                    is None
                ):
                    continue  # this GPU cannot report XIDs as events
                self._pci[self._address(h)] = pci_of(_text(nv.nvmlDeviceGetPciInfo(h).busId))
        except nv.NVMLError as exc:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlShutdown()
            raise NvmlError(exc.value, str(exc)) from None

    def _address(self, handle: Any) -> int | None:
        return self._ctypes.cast(handle, self._ctypes.c_void_p).value

    def wait(self, timeout: float) -> XidEvent | None:
        nv = self._nv
        try:
            data = nv.nvmlEventSetWait_v2(self._set, int(timeout * 1000))
        except nv.NVMLError as exc:
            if exc.value == TIMEOUT:
                return None
            raise NvmlError(exc.value, str(exc)) from None
        return XidEvent(self._pci.get(self._address(data.device), "unknown"), int(data.eventData))

    def close(self) -> None:
        nv = self._nv
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlEventSetFree(self._set)
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
