"""Saved `nvidia-smi` outputs, for `scan`: `nvidia-smi nvlink -e` (NVLink error counters).

The counters only ever grow (until the driver reloads) and a snapshot has no time, so
non-zero counts are reported, per link, as an event that asks nothing of the node: the
live rates are the NVML check's to judge.
"""

from __future__ import annotations

import re

from checks.api import Finding, Status

_GPU = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?$")
_LINK = re.compile(r"^\s*Link (\d+): ([A-Za-z ]+? Errors): (\d+|N/A)\s*$")


def looks_like_nvlink_errors(text: str) -> bool:
    return bool(re.search(r"^\s*Link \d+: [A-Za-z ]+ Errors: ", text, re.M))


def parse_nvlink_errors(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """{"GPU 0": {"Link 1": {"CRC Errors": 3, ...}}}; N/A counters are left out."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    gpu = None
    for line in text.splitlines():
        if m := _GPU.match(line.strip()):
            gpu = f"GPU {m.group(1)}"
            out.setdefault(gpu, {})
        elif gpu is not None and (m := _LINK.match(line)) and m.group(3).isdigit():
            out[gpu].setdefault(f"Link {m.group(1)}", {})[m.group(2)] = int(m.group(3))
    return out


def judge_nvlink_errors(text: str) -> list[Finding]:
    gpus = parse_nvlink_errors(text)
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
