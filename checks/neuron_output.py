"""What Neuron tools print, read and judged: `neuron-ls` (devices, processes), the
`neuron-monitor` reports and `nccom-test`. Shared by the Neuron checks, `deep-check` and
`scan`; kept free of the checks' imports so that `scan` starts fast."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from checks.api import Action, Finding, Status

_DEVICE_ROW = re.compile(r"^\|\s*([0-9]{1,9})\s*\|")
UNCORRECTED = ("mem_ecc_uncorrected", "sram_ecc_uncorrected")
CORRECTED = ("mem_ecc_corrected", "sram_ecc_corrected")


def parse_neuron_ls(text: str) -> list[int] | None:
    """The Neuron device ids in a `neuron-ls` table; None when there is no table at all.
    Rows that only continue a device (more processes) have an empty first column."""
    if not re.search(r"^\|\s*NEURON\s*\|", text, re.M):
        return None
    return [int(m.group(1)) for ln in text.splitlines() if (m := _DEVICE_ROW.match(ln))]


def count_finding(count: int, want: int | None, seen: str = "neuron-ls lists") -> Finding:
    """The Neuron device count a tool shows against the instance type's."""
    evidence = {"devices": count, "expected": want}
    if want is not None and count < want:
        message = f"{seen} {count} Neuron devices, {want} expected"
        return Finding(
            "neuron",
            "NeuronDeviceCount",
            Status.FAULT,
            "NeuronDeviceCountMismatch",
            message,
            Action.REBOOT,
            evidence,
        )
    message = f"{count} Neuron devices" + (f" of {want}" if want else "")
    return Finding(
        "neuron", "NeuronDeviceCount", Status.OK, "NeuronDevicesPresent", message, evidence=evidence
    )


def neuron_ls_processes(text: str) -> list[int]:
    """The PIDs `neuron-ls` shows using Neuron devices (its PID column, where it has one)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = next((ln for ln in lines if re.search(r"\|\s*PID\s*\|", ln)), None)
    if header is None:
        return []
    column = [c.strip() for c in header.split("|")].index("PID")
    pids = set()
    for ln in lines:
        cells = [c.strip() for c in ln.split("|")]
        if len(cells) > column and re.fullmatch(r"[0-9]{1,9}", cells[column]):
            pids.add(int(cells[column]))
    return sorted(pids)


class ReportJudge:
    """Turns neuron-monitor reports into findings; remembers counters between reports."""

    def __init__(
        self, want: int | None, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.want, self.rate, self.clock = want, rate, clock
        self.last: dict[int, tuple[float, dict[str, int]]] = {}

    def judge(self, report: dict[str, Any]) -> list[Finding]:
        found: list[Finding] = []
        info = report.get("neuron_hardware_info")
        if isinstance(info, dict):
            found += self._hardware(info)
        system = report.get("system_data")
        counters = system.get("neuron_hw_counters") if isinstance(system, dict) else None
        if isinstance(counters, dict):
            found += self._counters(counters)
        return found

    def _hardware(self, info: dict[str, Any]) -> list[Finding]:
        count = info.get("neuron_device_count")
        if info.get("error") or not isinstance(count, int):
            why = info.get("error") or "no neuron_device_count"
            return [
                Finding("neuron", "NeuronDeviceCount", Status.UNKNOWN, "NeuronMonitorError", why)
            ]
        if self.want is not None and count < self.want:
            return [count_finding(count, self.want, "neuron-monitor reports")]
        return []

    def _counters(self, counters: dict[str, Any]) -> list[Finding]:
        if counters.get("error"):
            message = f"neuron_hw_counters: {counters['error']}"
            return [Finding("neuron", "NeuronEcc", Status.UNKNOWN, "NeuronMonitorError", message)]
        now, found = self.clock(), []
        for dev in counters.get("neuron_devices") or []:
            if not isinstance(dev, dict) or not isinstance(dev.get("neuron_device_index"), int):
                continue
            idx = dev["neuron_device_index"]
            values = {k: dev[k] for k in UNCORRECTED + CORRECTED if isinstance(dev.get(k), int)}
            component = f"neuron:{idx}"
            bad = {k: values[k] for k in UNCORRECTED if values.get(k)}
            if bad:
                what = ", ".join(f"{k}={v}" for k, v in bad.items())
                found.append(
                    Finding(
                        component,
                        "NeuronEcc",
                        Status.FAULT,
                        "NeuronUncorrectableEcc",
                        f"Neuron device {idx}: uncorrected ECC errors ({what})",
                        Action.REPLACE,
                        values,
                    )
                )
            else:
                message = f"Neuron device {idx}: no uncorrected ECC errors"
                found.append(
                    Finding(
                        component, "NeuronEcc", Status.OK, "NeuronEccOk", message, evidence=values
                    )
                )
            found += self._rate(idx, now, values)
            self.last[idx] = (now, values)
        return found

    def _rate(self, idx: int, now: float, values: dict[str, int]) -> list[Finding]:
        if idx not in self.last:
            return []
        then, before = self.last[idx]
        minutes = max(now - then, 1e-9) / 60
        out = []
        for key in CORRECTED:
            grew = values.get(key, 0) - before.get(key, 0)
            if grew > 0 and grew / minutes > self.rate:
                out.append(
                    Finding(
                        f"neuron:{idx}",
                        "NeuronCorrectedEcc",
                        Status.FAULT,
                        "NeuronCorrectedEccBurst",
                        f"Neuron device {idx}: {grew} {key} in {minutes * 60:.0f}s",
                        evidence={key: grew, "per_minute_limit": self.rate},
                        temporary=True,
                    )
                )
        return out


def reports(buffer: str) -> tuple[list[dict[str, Any]], str]:
    """The complete JSON reports in `buffer` and what is left of it (a report not finished
    yet). Anything that is not a report (garbage, a cut-off line) is skipped to its line end."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while (start := buffer.find("{", pos)) >= 0:
        try:
            doc, pos = decoder.raw_decode(buffer, start)
        except RecursionError:  # nested deeper than any report: skip it to its line end
            nl = buffer.find("\n", start)
            if nl < 0:
                return found, ""
            pos = nl + 1
            continue
        except json.JSONDecodeError as exc:
            if exc.pos >= len(buffer.rstrip()) - 1 or exc.msg.startswith("Unterminated"):
                return found, buffer[start:]  # the rest of it has not come yet
            nl = buffer.find("\n", start)
            if nl < 0:
                return found, buffer[start:]
            pos = nl + 1
            continue
        if isinstance(doc, dict):
            found.append(doc)
    return found, ""


_FLOAT = r"[0-9]{1,20}(?:\.[0-9]{1,20})?"
_NCCOM_ROW = re.compile(
    rf"^\s*([0-9]{{1,20}})\s+([0-9]{{1,20}})\s+\w+\s+{_FLOAT}\s+({_FLOAT})\s+({_FLOAT})\b"
)
_NCCOM_AVG = re.compile(rf"Avg bus bandwidth:\s*({_FLOAT})\s*GB/s")
_NCCOM_FAILED = re.compile(r"^\s*\d+ errors? found - test failed", re.M)


# Where saved outputs begin (for `scan`): nccom-test's table header or its driver error, the
# neuron-monitor report's keys, neuron-ls's header.
NCCOM_MARKER = re.compile(rb"^[^\n]*size\(B\)[^\n]*busbw\(GB/s\)|Neuron DKMS Driver", re.M)
MONITOR_MARKER = re.compile(rb'"neuron_(?:hw_counters|hardware_info)"\s*:')
LS_MARKER = re.compile(rb"^\|\s*NEURON\s*\|", re.M)
# One of these is in every match of the marker: a fast prefilter.
NCCOM_MARKER_WORDS = (b"size(B)", b"Neuron DKMS Driver")
MONITOR_MARKER_WORDS = (b'"neuron_h',)
LS_MARKER_WORDS = (b"NEURON",)


def judge_nccom(text: str, returncode: int | None = None) -> Finding:
    """`nccom-test` (Neuron collectives on this instance): its result rows, its own verdict."""
    rows = [
        (int(m.group(1)), float(m.group(4)))
        for ln in text.splitlines()
        if (m := _NCCOM_ROW.match(ln))
    ]
    avg = _NCCOM_AVG.search(text)
    evidence: dict[str, Any] = {
        "rows": len(rows),
        "avg_busbw": float(avg.group(1)) if avg else None,
    }
    failures = [ln.strip() for ln in text.splitlines() if "Failure running" in ln]
    if _NCCOM_FAILED.search(text):
        message = "nccom-test failed" + (f": {failures[0]}" if failures else "")
        return Finding(
            "neuron",
            "NeuronCollectives",
            Status.FAULT,
            "NccomTestFailed",
            message,
            Action.REPLACE,
            evidence,
        )
    if rows and avg and returncode in (None, 0):
        message = f"nccom-test passed: {avg.group(1)} GB/s average bus bandwidth"
        return Finding(
            "neuron", "NeuronCollectives", Status.OK, "NccomTestPassed", message, evidence=evidence
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no output")
    message = f"nccom-test could not run: {first[:200]}"
    return Finding(
        "neuron", "NeuronCollectives", Status.UNKNOWN, "NccomTestError", message, evidence=evidence
    )
