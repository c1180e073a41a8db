"""AWS Trainium and Inferentia (Neuron): are all the devices there, and is any of them failing?

- `neuron` (polling): `neuron-ls` lists the instance type's number of Neuron devices. A short
  count asks for a reboot, as HyperPod does.
- `neuron_monitor` (streaming): the JSON reports `neuron-monitor` writes to stdout. In
  `neuron_hw_counters`, uncorrected ECC errors in a device's DRAM or SRAM mean replace (as a
  `NEURON_HW_ERR` line in the kernel log does); corrected ones are judged by rate, never by
  being non-zero. `neuron_hardware_info.neuron_device_count` short of the type's asks for a
  reboot. A report's own `error` strings make the reading unknown, never a fault.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from checks.api import Action, CheckContext, Finding, PollingCheck, Status, StreamingCheck
from checks.instance_types import expected
from checks.proc import reap, run_command

_DEVICE_ROW = re.compile(r"^\|\s*(\d+)\s*\|")
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
        return _f(
            "neuron",
            "NeuronDeviceCount",
            Status.FAULT,
            "NeuronDeviceCountMismatch",
            message,
            Action.REBOOT,
            evidence,
        )
    message = f"{count} Neuron devices" + (f" of {want}" if want else "")
    return _f(
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
        if len(cells) > column and cells[column].isdigit():
            pids.add(int(cells[column]))
    return sorted(pids)


class NeuronOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    neuron_ls: str = "neuron-ls"
    devices: int | None = Field(None, description="expected devices; default: the type's")


class NeuronCheck(PollingCheck):
    name = "neuron"
    description = "Neuron devices listed by neuron-ls against the instance type's count"
    interval = 60.0
    timeout = 30.0
    needs_executables = ("neuron-ls",)
    Options = NeuronOptions

    async def poll(self) -> list[Finding]:
        opts: NeuronOptions = self.options  # type: ignore[assignment]
        want = opts.devices or expected(self.ctx.instance_type).neuron_devices
        r = await run_command([opts.neuron_ls], self.timeout - 5)
        devices = parse_neuron_ls(r.stdout) if r.ok else None
        if devices is None:
            why = "timed out" if r.timed_out else f"exited {r.returncode}: {r.stderr.strip()[:200]}"
            if r.ok:
                why = "printed no device table"
            message = f"neuron-ls {why}"
            return [_f("neuron", "NeuronDeviceCount", Status.UNKNOWN, "NeuronLsFailed", message)]
        return [count_finding(len(devices), want)]


class NeuronMonitorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    neuron_monitor: str = "neuron-monitor"
    devices: int | None = Field(None, description="expected devices; default: the type's")
    corrected_per_minute: float = Field(
        10.0, gt=0, description="corrected ECC errors per minute per device before an event"
    )


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
        counters = (report.get("system_data") or {}).get("neuron_hw_counters")
        if isinstance(counters, dict):
            found += self._counters(counters)
        return found

    def _hardware(self, info: dict[str, Any]) -> list[Finding]:
        count = info.get("neuron_device_count")
        if info.get("error") or not isinstance(count, int):
            why = info.get("error") or "no neuron_device_count"
            return [_f("neuron", "NeuronDeviceCount", Status.UNKNOWN, "NeuronMonitorError", why)]
        if self.want is not None and count < self.want:
            return [count_finding(count, self.want, "neuron-monitor reports")]
        return []

    def _counters(self, counters: dict[str, Any]) -> list[Finding]:
        if counters.get("error"):
            message = f"neuron_hw_counters: {counters['error']}"
            return [_f("neuron", "NeuronEcc", Status.UNKNOWN, "NeuronMonitorError", message)]
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
                    _f(
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
                    _f(component, "NeuronEcc", Status.OK, "NeuronEccOk", message, evidence=values)
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
                    _f(
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


def _f(
    component: str,
    condition: str,
    status: Status,
    reason: str,
    message: str,
    action: Action = Action.NONE,
    evidence: dict[str, Any] | None = None,
    temporary: bool = False,
) -> Finding:
    return Finding(component, condition, status, reason, message, action, evidence or {}, temporary)


def reports(buffer: str) -> tuple[list[dict[str, Any]], str]:
    """The complete JSON reports in `buffer` and what is left of it (a report not finished
    yet). Anything that is not a report (garbage, a cut-off line) is skipped to its line end."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while (start := buffer.find("{", pos)) >= 0:
        try:
            doc, pos = decoder.raw_decode(buffer, start)
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


class NeuronMonitorCheck(StreamingCheck):
    name = "neuron_monitor"
    description = "neuron-monitor reports: Neuron device count, ECC errors (uncorrected, bursts)"
    needs_executables = ("neuron-monitor",)
    Options = NeuronMonitorOptions

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        super().__init__(ctx, options)
        opts: NeuronMonitorOptions = self.options  # type: ignore[assignment]
        want = opts.devices or expected(ctx.instance_type).neuron_devices
        self.judge = ReportJudge(want, opts.corrected_per_minute)

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        opts: NeuronMonitorOptions = self.options  # type: ignore[assignment]
        proc = await asyncio.create_subprocess_exec(
            opts.neuron_monitor,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            limit=1 << 22,
        )
        assert proc.stdout is not None
        buffer = ""
        try:
            while chunk := await proc.stdout.read(65536):
                buffer += chunk.decode("utf-8", "replace")
                docs, buffer = reports(buffer)
                for doc in docs:
                    for f in self.judge.judge(doc):
                        yield f
                if docs and not follow:
                    return
                if len(buffer) > 1 << 22:  # no report ends: not neuron-monitor's output
                    buffer = ""
            code = await proc.wait()
            raise OSError(f"{opts.neuron_monitor} exited {code}")
        finally:
            await reap(proc)


_NCCOM_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+\w+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\b")
_NCCOM_AVG = re.compile(r"Avg bus bandwidth:\s*([\d.]+)\s*GB/s")
_NCCOM_FAILED = re.compile(r"^\s*\d+ errors? found - test failed", re.M)


def looks_like_nccom(text: str) -> bool:
    return ("size(B)" in text and "busbw(GB/s)" in text) or "Neuron DKMS Driver" in text


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
        return _f(
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
        return _f(
            "neuron", "NeuronCollectives", Status.OK, "NccomTestPassed", message, evidence=evidence
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no output")
    message = f"nccom-test could not run: {first[:200]}"
    return _f(
        "neuron", "NeuronCollectives", Status.UNKNOWN, "NccomTestError", message, evidence=evidence
    )
