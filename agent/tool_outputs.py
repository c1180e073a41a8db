"""Saved outputs of node tools, recognised and judged by the checks' own parsers.

Operators paste these from broken nodes into `node-health scan`; each kind has a test that
recognises it from its text and a judge that turns it into findings with the same thresholds
the agent uses on a node (picked by `--instance-type`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from checks.api import Finding
from checks.nvidia import dcgm, nccl


@dataclass(frozen=True)
class ToolOutput:
    name: str
    recognise: Callable[[str], bool]
    judge: Callable[[str, str | None], list[Finding]]


KINDS = [
    ToolOutput("dcgmi diag", dcgm.looks_like, lambda text, _: dcgm.judge(dcgm.parse(text))),
    ToolOutput(
        "all_reduce_perf",
        nccl.looks_like,
        lambda text, itype: nccl.judge(nccl.parse(text), nccl.threshold_for(itype)),
    ),
]


def recognise(head: str) -> ToolOutput | None:
    """The kind of tool output `head` (the first part of the input) is, if any."""
    return next((k for k in KINDS if k.recognise(head)), None)
