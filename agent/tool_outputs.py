"""Saved outputs of node tools, found in `scan`'s input and judged by the checks' own parsers.

Operators paste these from broken nodes into `node-health scan`, alone or inside a bigger file
(a dmesg with a tool's output after it, an nvidia-bug-report). Each kind has a marker, a line
only its output has, where its section of the input begins; the section ends where a kernel
log line or another kind's output begins. A judge turns a section into findings with the same
thresholds the agent uses on a node (picked by `--instance-type`). A saved output that is cut
off is judged on what it proves: a pass needs the whole output, and a short device list,
which a cut cannot be told from, is no fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from checks import efa_output as efa
from checks import neuron_output as neuron
from checks.api import Finding, Status
from checks.instance_types import expected
from checks.kernel_log.engine import locate
from checks.nvidia import dcgm, nccl, smi


@dataclass(frozen=True)
class ToolOutput:
    name: str
    marker: re.Pattern[bytes]
    words: tuple[bytes, ...]  # one of them is in every match of `marker`
    judge: Callable[[str, str | None], list[Finding]]
    within: tuple[str, ...] = ()  # kinds whose output shows this one's marker too


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


def _short(found: Finding, what: str) -> Finding:
    """A saved list with fewer devices than the type has proves nothing: a list cut where an
    entry ends looks like a whole one. Said, with the count, and left to the checks that run
    the tool themselves."""
    return Finding(
        found.component,
        found.condition,
        Status.UNKNOWN,
        "SavedListShort",
        f"{found.message} (a saved {what} may be cut off: run the check on the node)",
        evidence=found.evidence,
    )


def _neuron_ls(text: str, itype: str | None) -> list[Finding]:
    devices = neuron.parse_neuron_ls(text) or []
    found = neuron.count_finding(len(devices), expected(itype).neuron_devices)
    return [found if found.status is Status.OK else _short(found, "neuron-ls table")]


def _fi_info(text: str, itype: str | None) -> list[Finding]:
    found = efa.judge_fi_info(text, expected(itype).efa_devices)
    return [_short(found, "fi_info list") if found.status is Status.FAULT else found]


KINDS = [
    ToolOutput(
        "dcgmi diag",
        dcgm.MARKER,
        dcgm.MARKER_WORDS,
        lambda text, _: dcgm.judge(dcgm.parse(text)),
    ),
    ToolOutput(
        "nccom-test",
        neuron.NCCOM_MARKER,
        neuron.NCCOM_MARKER_WORDS,
        lambda text, _: [neuron.judge_nccom(text)],
    ),
    ToolOutput(
        "all_reduce_perf",
        nccl.MARKER,
        nccl.MARKER_WORDS,
        lambda text, itype: nccl.judge(nccl.parse(text), nccl.threshold_for(itype)),
        within=("nccom-test",),  # nccom-test prints "Avg bus bandwidth:" as nccl-tests do
    ),
    ToolOutput(
        "neuron-monitor", neuron.MONITOR_MARKER, neuron.MONITOR_MARKER_WORDS, _neuron_monitor
    ),
    ToolOutput("neuron-ls", neuron.LS_MARKER, neuron.LS_MARKER_WORDS, _neuron_ls),
    ToolOutput("fi_info", efa.MARKER, efa.MARKER_WORDS, _fi_info),
    ToolOutput(
        "nvidia-smi -q",
        smi.SMI_Q_MARKER,
        smi.SMI_Q_MARKER_WORDS,
        lambda text, _: smi.judge_smi_q(text),
    ),
    ToolOutput(
        "nvidia-smi nvlink -e",
        smi.NVLINK_MARKER,
        smi.NVLINK_MARKER_WORDS,
        lambda text, _: smi.judge_nvlink_errors(text),
    ),
    ToolOutput(
        "nvidia-smi nvlink -s",
        smi.NVLINK_STATUS_MARKER,
        smi.NVLINK_STATUS_MARKER_WORDS,
        lambda text, itype: smi.judge_nvlink_status(text, expected(itype)),
    ),
    ToolOutput(
        "nvidia-smi",
        smi.SMI_MARKER,
        smi.SMI_MARKER_WORDS,
        lambda text, itype: smi.judge_smi(text, expected(itype)),
    ),
]


def _markers(buf: bytes) -> list[tuple[int, int, int]]:
    """(start, end, kind) of every marker in `buf`, in order. The markers are line regexes;
    each is tried only on the lines that hold one of its words, found in bulk (hyperscan: one
    pass for every word; else a memchr-fast `find` pass a word): a kernel log of a million
    lines costs a pass or a few, not a regex over every line."""
    size = len(buf)
    lines: list[dict[int, int]] = [{0: _line_end(buf, 0)} for _ in KINDS]  # kind: start, stop
    # the first line: no b"\n..." word finds it
    for end, w in _word_ends(buf):
        start = buf.rfind(b"\n", 0, max(end - 1, 0)) + 1  # the line of the word's last byte
        for i in _WORD_KINDS[w]:
            lines[i].setdefault(start, _line_end(buf, end))
    hits: dict[int, tuple[int, int]] = {}
    for i, kind in enumerate(KINDS):
        for start, stop in lines[i].items():
            after = buf.find(b"\n", stop + 1)  # markers may span to the next line
            m = kind.marker.search(buf, start, size if after < 0 else after + 1)
            if m and m.start() not in hits:
                hits[m.start()] = (m.end(), i)
    return sorted((start, end, i) for start, (end, i) in hits.items())


def _line_end(buf: bytes, at: int) -> int:
    stop = buf.find(b"\n", at)
    return len(buf) if stop < 0 else stop


_WORDS = sorted({w for kind in KINDS for w in kind.words})
_WORD_KINDS = [[i for i, kind in enumerate(KINDS) if w in kind.words] for w in _WORDS]
_LOCATE = locate(_WORDS)


def _word_ends(buf: bytes) -> list[tuple[int, int]]:
    """(end, index in _WORDS) of every occurrence of every word."""
    if _LOCATE is not None:
        return _LOCATE(buf)
    hits = []
    for w, word in enumerate(_WORDS):
        p = buf.find(word)
        while p >= 0:
            hits.append((p + len(word), w))
            stop = buf.find(b"\n", p + len(word))
            if stop < 0:
                break
            p = buf.find(word, stop)  # one a line is enough (a b"\n..." word: the next line)
    return hits


@dataclass
class Section:
    kind: ToolOutput
    start: int
    end: int


def sections(buf: bytes, kernel_line: re.Pattern[bytes]) -> list[Section]:
    """The tool outputs in `buf`, in order: each from the line its marker is on (or the `{`
    its JSON document opens with) to the next kernel log line (`kernel_line`) or the next
    output of another kind."""
    found: list[Section] = []
    for at, end, i in _markers(buf):
        kind = KINDS[i]
        start = buf.rfind(b"\n", 0, at) + 1
        if buf[start:at].strip() == b"" and buf[at : at + 1] == b'"':
            before = buf.rfind(b"\n", 0, max(start - 1, 0)) + 1  # `{` alone on the line above
            if start and buf[before : start - 1].strip() == b"{":
                start = before
        last = found[-1] if found else None
        if last is not None and start < last.end:
            if kind is last.kind or last.kind.name in kind.within:
                continue  # more of the same output
            last.end = max(start, last.start)
        nxt = kernel_line.search(buf, buf.find(b"\n", end) + 1 or len(buf))
        found.append(Section(kind, start, nxt.start() if nxt else len(buf)))
    return [s for s in found if s.end > s.start]


def recognise(text: str) -> ToolOutput | None:
    """The kind of the first tool output in `text`, if there is one."""
    found = _markers(text.encode("utf-8", "replace"))
    return KINDS[found[0][2]] if found else None
