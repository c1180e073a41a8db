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

from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from checks.api import CheckContext, Finding, PollingCheck, Status, StreamingCheck
from checks.instance_types import expected
from checks.neuron_output import ReportJudge, count_finding, parse_neuron_ls, reports
from checks.proc import reap, run_command, spawn


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
        if devices is None:  # only a finished run's device table is evidence
            message = r.failure or f"neuron-ls exited {r.returncode}: {r.stderr.strip()[:200]}"
            if r.ok:
                message = "neuron-ls printed no device table"
            return [
                Finding("neuron", "NeuronDeviceCount", Status.UNKNOWN, "NeuronLsFailed", message)
            ]
        return [count_finding(len(devices), want)]


class NeuronMonitorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    neuron_monitor: str = "neuron-monitor"
    devices: int | None = Field(None, description="expected devices; default: the type's")
    corrected_per_minute: float = Field(
        10.0, gt=0, description="corrected ECC errors per minute per device before an event"
    )


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
        proc = await spawn([opts.neuron_monitor], limit=1 << 22)
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
