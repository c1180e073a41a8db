"""Saved `nvidia-smi` outputs, for `scan`.

- `nvidia-smi -q` (or `-a`): the states NVIDIA's memory-error guide acts on, per GPU
  (`SMI_Q_RULES`): a row remap or page retirement pending, or a reset asked for, means a
  reboot; a row remapping failure means replace; volatile uncorrectable ECC, a reboot.
- `nvidia-smi nvlink -e`: the counters only ever grow (until the driver reloads) and a
  snapshot has no time, so non-zero counts are reported, per link, as an event that asks
  nothing of the node: the live rates are the NVML check's to judge.
- `nvidia-smi` (the default table) and what it prints instead of one: `ERR!` in a GPU's
  cells (a query of that GPU failed: reboot), `WARNING: infoROM is corrupted at gpu ...`
  (replace), `Unable to determine the device handle for GPU ...` (the GPU cannot be reached:
  reboot), `No devices were found` (a fault only where the instance type has GPUs).
- `nvidia-smi nvlink -s`: a link `<inactive>`, or all of a GPU's links inactive, where the
  node's GPUs have NVLink (reboot); a GPU missing between two listed ones (reboot).
"""

from __future__ import annotations

import re

from checks.api import Action, Finding, Status
from checks.instance_types import Expected
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
    # The same field before drivers named it "Pending Page Blacklist" (nvidia-smi(1), Page
    # Retirement: "Pending: Checks if any GPU device memory pages are pending blacklist on the
    # next reboot").
    ("Retired Pages/Pending", "Yes", "PageRetirementPending", Action.REBOOT),
    ("GPU Reset Status/Reset Required", "Yes", "GpuResetRequired", Action.REBOOT),
    ("GPU Reset Status/Drain and Reset Recommended", "Yes", "GpuResetRequired", Action.REBOOT),
    ("ECC Errors/Volatile/DRAM Uncorrectable", ">0", "VolatileUncorrectableEcc", Action.REBOOT),
    ("ECC Errors/Volatile/Double Bit/Total", ">0", "VolatileUncorrectableEcc", Action.REBOOT),
    # On-chip SRAM (register file, caches): one count before Ampere's drivers split it into
    # parity and SEC-DED. Uncorrectable since the driver loaded: XID 48/94/95 territory, which
    # NVIDIA's memory error guide clears with a GPU reset.
    ("ECC Errors/Volatile/SRAM Uncorrectable", ">0", "VolatileUncorrectableEcc", Action.REBOOT),
    (
        "ECC Errors/Volatile/SRAM Uncorrectable Parity",
        ">0",
        "VolatileUncorrectableEcc",
        Action.REBOOT,
    ),
    (
        "ECC Errors/Volatile/SRAM Uncorrectable SEC-DED",
        ">0",
        "VolatileUncorrectableEcc",
        Action.REBOOT,
    ),
]
_SECTIONS = ("Remapped Rows", "Retired Pages", "GPU Reset Status", "ECC Errors")
# Some drivers (and pastes) write "Retired pages": the section names are matched without case.
_SECTION_LINE = re.compile(r"^\s+(?i:" + "|".join(_SECTIONS) + r")\s*$", re.M)
_GPU_Q = re.compile(r"^GPU ([0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s*$")


# Where a saved `nvidia-smi -q` begins (for `scan`): its banner, a GPU's header, or one of
# the sections judged, in a paste that has only that.
SMI_Q_MARKER = re.compile(
    rb"^=+NVSMI LOG=+$|^GPU [0-9A-Fa-f]{8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d\s*$|"
    + _SECTION_LINE.pattern.encode(),
    re.M,
)
SMI_Q_MARKER_WORDS = (b"NVSMI LOG", b"GPU ", *(s.encode() for s in _SECTIONS), b"Retired pages")


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
                if path.lower().endswith(suffix.lower()) and _matches(value, bad):
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
        elif any(p.lower().endswith(r[0].lower()) for p in values for r in SMI_Q_RULES):
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


# ---- `nvidia-smi`: the default table, and the lines it prints instead of one ----------------
# Its header row, and the messages nvidia-smi prints for a GPU it cannot show (NVIDIA GPU
# Operator, "Troubleshooting": "infoROM is corrupted (nvidia-smi return code 14)", Action:
# "Replace the faulty GPU"; nvidia-smi(1), return code 14 "infoROM is corrupted", 15 "The GPU
# has fallen off the bus or has otherwise become inaccessible", 6 "A query to find an object
# was unsuccessful").
_INFOROM = re.compile(r"^\s*WARNING: infoROM is corrupted at gpu (\S+)", re.M)
_NO_HANDLE = re.compile(r"^\s*Unable to determine the device handle for GPU ?(\S+?): (.+)$", re.M)
_NO_DEVICES = re.compile(r"^\s*No devices were found\s*$", re.M)
# A GPU's first row in the table: "|   0  NVIDIA A40   On   | 00000000:19:00.0 Off |".
_TABLE_GPU = re.compile(
    r"^\|\s+(\d+)\s+.*\|\s*([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s"
)
SMI_MARKER = re.compile(
    rb"^\s*\| NVIDIA-SMI \d|^\s*WARNING: infoROM is corrupted at gpu |"
    rb"^\s*Unable to determine the device handle for GPU|^\s*No devices were found\s*$",
    re.M,
)
SMI_MARKER_WORDS = (b"NVIDIA-SMI ", b"infoROM is corrupted", b"device handle", b"No devices were")


def judge_smi(text: str, want: Expected) -> list[Finding]:
    """The default table: `ERR!` in a GPU's rows is a query of that GPU that failed (the
    driver lost it: reboot); a corrupted infoROM, replace; a GPU nvidia-smi cannot get a
    handle for, reboot; no GPU at all, a fault only where the instance type has GPUs."""
    found = []
    for m in _INFOROM.finditer(text):
        found.append(
            _gpu_fault(
                m.group(1),
                "InfoROMCorrupted",
                f"nvidia-smi: infoROM is corrupted at GPU {m.group(1)}",
                Action.REPLACE,
            )
        )
    for m in _NO_HANDLE.finditer(text):
        found.append(
            _gpu_fault(
                m.group(1),
                "GpuUnreachable",
                f"nvidia-smi cannot reach GPU {m.group(1)}: {m.group(2).strip()}",
                Action.REBOOT,
            )
        )
    gpus, err = _table_gpus(text)
    for index, bdf in err:
        found.append(
            _gpu_fault(
                bdf, "GpuQueryFailed", f"nvidia-smi: GPU {index} ({bdf}) shows ERR!", Action.REBOOT
            )
        )
    if _NO_DEVICES.search(text) and not gpus:
        if want.gpus:
            found.append(
                _gpu_fault(
                    "",
                    "NoGpusFound",
                    f"nvidia-smi found no GPU; this instance type has {want.gpus}",
                    Action.REBOOT,
                )
            )
        else:
            message = "nvidia-smi found no GPU (give --instance-type to say the node has GPUs)"
            found.append(
                Finding("gpu", "NvidiaGPUUnhealthy", Status.UNKNOWN, "NoGpusFound", message)
            )
    if found:
        return found
    if gpus:
        message = f"nvidia-smi: {len(gpus)} GPUs, no ERR! and no warning"
        return [Finding("gpu", "NvidiaGPUUnhealthy", Status.OK, "GpuHealthy", message)]
    return [
        Finding(
            "gpu",
            "NvidiaGPUUnhealthy",
            Status.UNKNOWN,
            "SmiTableUnread",
            "nvidia-smi output without a GPU row",
        )
    ]


def _table_gpus(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The GPUs of the table (their bus ids), and those whose rows show `ERR!`: a GPU's rows
    run from its first row to the next `+---` border."""
    gpus: list[str] = []
    err: list[tuple[str, str]] = []
    current: tuple[str, str] | None = None
    for line in text.splitlines():
        if m := _TABLE_GPU.match(line.strip()):
            current = (m.group(1), m.group(2))
            gpus.append(m.group(2))
        elif line.lstrip().startswith("+"):
            current = None
            continue
        if current is not None and "ERR!" in line and current not in err:
            err.append(current)
    return gpus, err


def _gpu_fault(bdf: str, reason: str, message: str, action: Action) -> Finding:
    component = f"gpu:{pci_of(bdf)}" if bdf else "gpu"
    return Finding(
        component,
        "NvidiaGPUUnhealthy",
        Status.FAULT,
        reason,
        message,
        action,
        {"gpu": bdf} if bdf else {},
    )


# ---- `nvidia-smi nvlink -s`: each GPU's links, at speed or `<inactive>` -------------------
_STATUS_LINK = re.compile(r"^\s*Link (\d+): (<inactive>|[0-9.]+ GB/s)\s*$")
_ALL_INACTIVE = "Unable to retrieve NVLink information as all links are inActive"
NVLINK_STATUS_MARKER = re.compile(
    rb"^GPU \d+: [^\n]*\n(?:\s*Link \d+: (?:<inactive>|[0-9.]+ GB/s)\s*$|[^\n]*"
    + re.escape(_ALL_INACTIVE.encode())
    + rb")|^\s*Link \d+: (?:<inactive>|[0-9.]+ GB/s)\s*$",
    re.M,
)
NVLINK_STATUS_MARKER_WORDS = (b"GPU ", b"Link ")  # one is in every match: a fast prefilter


def judge_nvlink_status(text: str, want: Expected) -> list[Finding]:
    """Inactive links are a fault where the node's GPUs have NVLink: the instance type says
    so, or another link in the output is up (a PCIe-only GPU lists none active). A GPU
    missing between two listed next to each other is one the driver lost."""
    gpus: dict[int, dict[str, object]] = {}
    order: list[int] = []
    adjacent: list[tuple[int, int]] = []  # GPU headers with only link lines between them
    current, clean = None, False
    for line in text.splitlines():
        if m := _GPU.match(line.strip()):
            index = int(m.group(1))
            if current is not None and clean:
                adjacent.append((current, index))
            current, clean = index, True
            gpus[index] = {"active": 0, "inactive": [], "none": False}
            order.append(index)
        elif current is not None and (m := _STATUS_LINK.match(line)):
            if m.group(2) == "<inactive>":
                gpus[current]["inactive"].append(int(m.group(1)))  # type: ignore[union-attr]
            else:
                gpus[current]["active"] += 1  # type: ignore[operator]
        elif current is not None and _ALL_INACTIVE in line:
            gpus[current]["none"] = True
        elif line.strip():
            clean = False
    if not gpus:
        return [
            Finding(
                "nvlink",
                "NvlinkStatus",
                Status.UNKNOWN,
                "NvlinkStatusUnreadable",
                "no GPU's NVLink status in the output",
            )
        ]
    has_nvlink = bool(want.nvlinks_per_gpu) or any(g["active"] for g in gpus.values())
    found = []
    for index in order:
        g = gpus[index]
        down = g["inactive"]
        component = f"gpu:{index}:nvlink"
        if (down or g["none"]) and has_nvlink:
            what = "all links inactive" if g["none"] else f"links {down} inactive"
            found.append(
                Finding(
                    component,
                    "NvlinkStatus",
                    Status.FAULT,
                    "NvlinkInactive",
                    f"GPU {index}: NVLink {what}",
                    Action.REBOOT,
                    {"inactive": down or "all"},
                )
            )
        elif down or g["none"]:
            message = (
                f"GPU {index}: NVLink inactive; give --instance-type to say whether it has NVLink"
            )
            found.append(
                Finding(component, "NvlinkStatus", Status.UNKNOWN, "NvlinkInactive", message)
            )
    for before, after in adjacent:
        for lost in range(before + 1, after):
            found.append(
                Finding(
                    f"gpu:{lost}",
                    "NvlinkStatus",
                    Status.FAULT,
                    "GpuMissing",
                    f"nvidia-smi nvlink -s lists GPU {before} and GPU {after} but not GPU {lost}",
                    Action.REBOOT,
                )
            )
    if found:
        return found
    if want.gpus and len(gpus) < want.gpus:
        message = f"nvidia-smi nvlink -s lists {len(gpus)} GPUs of {want.gpus}"
        return [
            Finding(
                "nvlink",
                "NvlinkStatus",
                Status.UNKNOWN,
                "SavedListShort",
                f"{message} (a saved list may be cut off: run the check on the node)",
            )
        ]
    message = f"NVLink: every listed link of {len(gpus)} GPUs active"
    return [Finding("nvlink", "NvlinkStatus", Status.OK, "NvlinkActive", message)]
