"""Saved `nvidia-smi` outputs, for `scan`.

- `nvidia-smi -q` (or `-a`): the states NVIDIA's memory-error guide acts on, per GPU
  (`SMI_Q_RULES`): a row remap or page retirement pending, or a reset asked for, means a
  reboot; a row remapping failure means replace; volatile uncorrectable ECC, a reboot.
- `nvidia-smi nvlink -e`: the counters only ever grow (until the driver reloads) and a
  snapshot has no time, so non-zero counts are reported, per link, as an event that asks
  nothing of the node: the live rates are the NVML check's to judge.
"""

from __future__ import annotations

import re

from checks.api import Action, Finding, Status
from checks.nvidia.nvml import pci_of

_GPU = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?$")
# Counters as the driver prints them: ASCII digits, at most 64 bits' worth.
_LINK = re.compile(r"^\s*Link (\d+): ([A-Za-z ]+? Errors): ([0-9]{1,20}|N/A)\s*$")


# Where a saved `nvidia-smi nvlink -e` begins (for `scan`): a GPU's line, or its first counter.
NVLINK_MARKER = re.compile(
    rb"^GPU \d+: [^\n]*\n\s*Link \d+: [A-Za-z ]+ Errors: |^\s*Link \d+: [A-Za-z ]+ Errors: ", re.M
)
NVLINK_MARKER_WORDS = (b"GPU ", b" Errors: ")  # one is in every match: a fast prefilter


def parse_nvlink_errors(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """{"GPU 0": {"Link 1": {"CRC Errors": 3, ...}}}; N/A counters are left out."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    gpu = None
    for line in text.splitlines():
        if m := _GPU.match(line.strip()):
            gpu = f"GPU {m.group(1)}"
            out.setdefault(gpu, {})
        elif gpu is not None and (m := _LINK.match(line)) and m.group(3) != "N/A":
            out[gpu].setdefault(f"Link {m.group(1)}", {})[m.group(2)] = int(m.group(3))
    return out


def judge_nvlink_errors(text: str) -> list[Finding]:
    # A GPU whose counters could not be read (none, or all garbled) says nothing either way.
    gpus = {gpu: links for gpu, links in parse_nvlink_errors(text).items() if links}
    if not gpus:
        return [
            Finding(
                "nvlink",
                "NvlinkErrors",
                Status.UNKNOWN,
                "NvlinkCountersUnreadable",
                "no GPU's NVLink counters in the output",
            )
        ]
    found = []
    for gpu, links in gpus.items():
        counted = {f"{link} {name}": n for link, c in links.items() for name, n in c.items() if n}
        component = f"gpu:{gpu.split()[1]}:nvlink"
        if counted:
            what = ", ".join(f"{k}: {v}" for k, v in counted.items())
            found.append(
                Finding(
                    component,
                    "NvlinkErrors",
                    Status.FAULT,
                    "NvlinkErrorCounters",
                    f"{gpu} NVLink error counters: {what}",
                    evidence=counted,
                )
            )
        else:
            message = f"{gpu}: no NVLink errors on {len(links)} links"
            found.append(Finding(component, "NvlinkErrors", Status.OK, "NvlinkClean", message))
    return found


# (the end of a section/key path, the value that is a fault, reason, action)
SMI_Q_RULES: list[tuple[str, str, str, Action]] = [
    ("Remapped Rows/Remapping Failure Occurred", "Yes", "RowRemapFailure", Action.REPLACE),
    ("Remapped Rows/Pending", "Yes", "RowRemapPending", Action.REBOOT),
    ("Retired Pages/Pending Page Blacklist", "Yes", "PageRetirementPending", Action.REBOOT),
    ("Retired Pages/Pending Page Retirement", "Yes", "PageRetirementPending", Action.REBOOT),
    ("GPU Reset Status/Reset Required", "Yes", "GpuResetRequired", Action.REBOOT),
    ("GPU Reset Status/Drain and Reset Recommended", "Yes", "GpuResetRequired", Action.REBOOT),
    ("ECC Errors/Volatile/DRAM Uncorrectable", ">0", "VolatileUncorrectableEcc", Action.REBOOT),
    ("ECC Errors/Volatile/Double Bit/Total", ">0", "VolatileUncorrectableEcc", Action.REBOOT),
]
_SECTIONS = ("Remapped Rows", "Retired Pages", "GPU Reset Status", "ECC Errors")
_SECTION_LINE = re.compile(r"^\s+(?:" + "|".join(_SECTIONS) + r")\s*$", re.M)
_GPU_Q = re.compile(r"^GPU ([0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s*$")


# Where a saved `nvidia-smi -q` begins (for `scan`): its banner, a GPU's header, or one of
# the sections judged, in a paste that has only that.
SMI_Q_MARKER = re.compile(
    rb"^=+NVSMI LOG=+$|^GPU [0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d\s*$|"
    + _SECTION_LINE.pattern.encode(),
    re.M,
)
SMI_Q_MARKER_WORDS = (b"NVSMI LOG", b"GPU ", *(s.encode() for s in _SECTIONS))


def parse_smi_q(text: str) -> dict[str, dict[str, str]]:
    """{"0000:b9:00" (or "" before any GPU header): {"Remapped Rows/Pending": "Yes", ...}}."""
    gpus: dict[str, dict[str, str]] = {}
    gpu, stack = "", []  # stack: (indent, section name)
    for line in text.splitlines():
        if not line.strip():
            continue
        if m := _GPU_Q.match(line):
            gpu, stack = pci_of(m.group(1)), []
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, sep, value = line.strip().partition(" : ")
        if not sep:
            if not line.strip().endswith(":"):  # a section header
                stack.append((indent, line.strip()))
            continue
        path = "/".join([*(name for _, name in stack), key.strip()])
        gpus.setdefault(gpu, {})[path] = value.strip()
    return gpus


def judge_smi_q(text: str) -> list[Finding]:
    found = []
    for gpu, values in parse_smi_q(text).items():
        component = f"gpu:{gpu}" if gpu else "gpu"
        hits = []
        for path, value in values.items():
            for suffix, bad, reason, action in SMI_Q_RULES:
                if path.endswith(suffix) and _matches(value, bad):
                    hits.append((action, reason, f"{path}: {value}"))
        if hits:
            action, reason, _ = max(hits, key=lambda h: h[0].rank)
            what = "; ".join(h[2] for h in hits)
            found.append(
                Finding(
                    component,
                    "NvidiaGPUUnhealthy",
                    Status.FAULT,
                    reason,
                    f"nvidia-smi -q {component}: {what}",
                    action,
                    {h[2].split(": ")[0]: h[2].split(": ")[1] for h in hits},
                )
            )
        elif any(p.endswith(r[0]) for p in values for r in SMI_Q_RULES):
            message = f"nvidia-smi -q {component}: no pending remap, retirement or reset"
            found.append(Finding(component, "NvidiaGPUUnhealthy", Status.OK, "GpuHealthy", message))
    return found or [
        Finding(
            "gpu",
            "NvidiaGPUUnhealthy",
            Status.UNKNOWN,
            "SmiQueryUnjudged",
            "nvidia-smi -q output without remapped rows, retired pages, ECC or reset status",
        )
    ]


def _matches(value: str, bad: str) -> bool:
    if bad == ">0":
        return bool(re.fullmatch(r"[0-9]{1,20}", value)) and int(value) > 0
    return value == bad
