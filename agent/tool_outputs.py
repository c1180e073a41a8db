"""Saved outputs of node tools, recognised and judged by the checks' own parsers.

Operators paste these from broken nodes into `node-health scan`; each kind has a test that
recognises it from its text and a judge that turns it into findings with the same thresholds
the agent uses on a node (picked by `--instance-type`). The first kind that recognises the
input wins, so the more specific come first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from checks import efa_output as efa
from checks import neuron_output as neuron
from checks.api import Finding, Status
from checks.instance_types import expected
from checks.nvidia import dcgm, nccl, smi


@dataclass(frozen=True)
class ToolOutput:
    name: str
    recognise: Callable[[str], bool]
    judge: Callable[[str, str | None], list[Finding]]


def _neuron_monitor(text: str, itype: str | None) -> list[Finding]:
    docs, _ = neuron.reports(text)
    judge = neuron.ReportJudge(expected(itype).neuron_devices, rate=float("inf"))
    found = [f for doc in docs for f in judge.judge(doc)]
    if not found:
        return [
            Finding(
                "neuron",
                "NeuronMonitor",
                Status.UNKNOWN,
                "NeuronMonitorUnreadable",
                "no neuron-monitor report with hardware counters or device info",
            )
        ]
    return found


def _neuron_ls(text: str, itype: str | None) -> list[Finding]:
    devices = neuron.parse_neuron_ls(text) or []
    return [neuron.count_finding(len(devices), expected(itype).neuron_devices)]


KINDS = [
    ToolOutput("dcgmi diag", dcgm.looks_like, lambda text, _: dcgm.judge(dcgm.parse(text))),
    # nccom-test prints "Avg bus bandwidth:" as nccl-tests do: it goes first.
    ToolOutput("nccom-test", neuron.looks_like_nccom, lambda text, _: [neuron.judge_nccom(text)]),
    ToolOutput(
        "all_reduce_perf",
        nccl.looks_like,
        lambda text, itype: nccl.judge(nccl.parse(text), nccl.threshold_for(itype)),
    ),
    ToolOutput(
        "neuron-monitor",
        lambda text: bool(re.search(r'"neuron_(hw_counters|hardware_info)"', text)),
        _neuron_monitor,
    ),
    ToolOutput("neuron-ls", lambda text: neuron.parse_neuron_ls(text) is not None, _neuron_ls),
    ToolOutput(
        "fi_info",
        efa.looks_like,
        lambda text, itype: [efa.judge_fi_info(text, expected(itype).efa_devices)],
    ),
    ToolOutput("nvidia-smi -q", smi.looks_like_smi_q, lambda text, _: smi.judge_smi_q(text)),
    ToolOutput(
        "nvidia-smi nvlink -e",
        smi.looks_like_nvlink_errors,
        lambda text, _: smi.judge_nvlink_errors(text),
    ),
]


def recognise(head: str) -> ToolOutput | None:
    """The kind of tool output `head` (the first part of the input) is, if any."""
    return next((k for k in KINDS if k.recognise(head)), None)
