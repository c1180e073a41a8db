"""`dcgmi diag` results (JSON of DCGM 2.x/3.x/4.x, or the text table) read, then judged.

- "Skip" and "Not Run" are not "Fail": a test that did not run proves nothing either way.
- A failed test is a faulty instance (replace), unless its warnings carry DCGM error codes that
  say otherwise (checks/nvidia/dcgm_errors.yaml: DCGM's own severity and category per code):
  a pending row remap asks for a reboot; a busy GPU, a setting or a library problem make the
  test inconclusive (unknown), never a fault. So does a warning in the words of a CUDA or NVML
  error that says the environment failed the test (the device busy or unavailable, a driver
  and runtime that do not match, permissions, a missing library): re-run it on an idle GPU.
- A diagnostic that crashed, printed an error instead of results, or was cut off is unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from checks.api import Action, Finding, Status, load_yaml

CHECK = "dcgm"
STATUSES = {"pass": "pass", "fail": "fail", "warn": "warn", "skip": "skip", "not run": "skip"}
_ENTITY = re.compile(r"^(?:GPU|gpu)\s*(\d+)\s*:\s*(Pass|Fail|Warn|Skip|Not Run)\b", re.I)
_GPU_LIST = re.compile(r"GPUs?:\s*([\d,\s]+)")
_RESULT_ROW = re.compile(r"^\|[^|]+\|\s*(?:Pass|Fail|Warn|Skip)(?: - (?:All|GPUs?:)|\s+\|)", re.M)
_CATEGORY = re.compile(r"^[|+]-+\s+(\w[\w ]*?)\s+-+\+")
_CLOSING = re.compile(r"^\+-+\+-+\+$")  # the table's last line; also between categories


@dataclass
class DiagWarning:
    message: str
    error_id: int | None = None


@dataclass
class DiagTest:
    category: str
    name: str
    status: str  # pass, fail, warn, skip, or the word DCGM printed when it is none of these
    gpus: list[str] = field(default_factory=list)  # the GPUs this status is for; [] = all
    warnings: list[DiagWarning] = field(default_factory=list)
    info: list[str] = field(default_factory=list)  # the JSON's `info` messages (figures)


@dataclass
class DiagRun:
    tests: list[DiagTest] = field(default_factory=list)
    version: str | None = None
    errors: list[str] = field(default_factory=list)  # what dcgmi printed instead of results
    layout: str = "text"
    cut: bool = False  # a text table that does not end with its closing border


@dataclass(frozen=True)
class ErrorCode:
    name: str
    severity: str
    category: str


@dataclass(frozen=True)
class Table:
    errors: dict[int, ErrorCode]
    actions: dict[str, dict[str, str]]
    overrides: dict[int, str]
    phrases: dict[str, int]
    environment: tuple[str, ...]

    def action(self, error_id: int | None) -> str | None:
        """replace, reboot, none, unknown; None for a code this table does not know."""
        if error_id is None:
            return None
        if error_id in self.overrides:
            return self.overrides[error_id]
        code = self.errors.get(error_id)
        if code is None:
            return None
        kind = "hardware" if code.category.startswith(("HARDWARE", "PERF")) else "software"
        return self.actions[code.severity][kind]

    def code_of(self, message: str) -> int | None:
        flat = _flat(message)
        return next((i for p, i in self.phrases.items() if _flat(p) in flat), None)

    def test_action(self, warning: DiagWarning) -> str | None:
        """What one warning of a failed test asks of the node. A CUDA or NVML error that says
        the environment failed the test, or a software code whose severity asks nothing
        (a CUDA API call that failed), makes it inconclusive: replace only on hardware."""
        flat = _flat(warning.message)
        if any(_flat(p) in flat for p in self.environment):
            return "unknown"
        eid = warning.error_id if warning.error_id is not None else self.code_of(warning.message)
        action = self.action(eid)
        code = self.errors.get(eid) if eid is not None else None
        if action == "none" and code and not code.category.startswith(("HARDWARE", "PERF")):
            return "unknown"
        return action


def _flat(text: str) -> str:
    """Without case or spaces: the text table wraps messages anywhere."""
    return re.sub(r"\s+", "", text).lower()


@cache
def table() -> Table:
    raw = load_yaml(resources.files("checks.nvidia").joinpath("dcgm_errors.yaml").read_text())
    return Table(
        errors={int(k): ErrorCode(*v) for k, v in raw["errors"].items()},
        actions=raw["actions"],
        overrides={int(k): v for k, v in raw["overrides"].items()},
        phrases=raw["phrases"],
        environment=tuple(raw["environment"]),
    )


# Where a saved output begins (for `scan`): the table's header row, the JSON document's key,
# or, in a paste that lost its header, a result row.
MARKER = re.compile(
    rb'^\|\s*Diagnostic\s+\|\s*Result\s+\||"DCGM (?:GPU )?Diagnostic"\s*:|'
    + _RESULT_ROW.pattern.encode(),
    re.M,
)
MARKER_WORDS = (b"Diagnostic", b"\n|")  # one of these is in every match: a fast prefilter


def parse(text: str) -> DiagRun:
    """JSON when the output holds a JSON document, else the text table."""
    start = text.find("{")
    if start >= 0:
        try:
            doc, _ = json.JSONDecoder().raw_decode(text[start:])
        except (ValueError, RecursionError):  # not JSON, or nested deeper than any report
            doc = None
        if isinstance(doc, dict):
            return _from_json(doc, text[:start])
    return _from_text(text)


def _from_json(doc: dict[str, Any], before: str) -> DiagRun:
    run = DiagRun(layout="json")
    root = doc.get("DCGM GPU Diagnostic") or doc.get("DCGM Diagnostic") or doc
    if not isinstance(root, dict):
        run.errors.append("no diagnostic results in the JSON document")
        return run
    version = root.get("version") or _dict(doc.get("metadata")).get("version")
    run.version = str(version) if version is not None else None
    for key in ("runtime_error", "warning", "error"):
        if isinstance(root.get(key), str):
            run.errors.append(root[key])
    if before.strip().lower().startswith("error"):
        run.errors.append(before.strip())
    for cat in _list(root.get("test_categories")):
        for t in _list(_dict(cat).get("tests")):
            if isinstance(t, dict):
                run.tests += _json_test(str(cat.get("category", "")), t)
    return run


def _dict(value: Any) -> dict[str, Any]:
    """A JSON object where one is expected; anything else reads as an empty one (its tests
    then are missing, and the run is unknown)."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _json_test(category: str, t: dict[str, Any]) -> list[DiagTest]:
    out = []
    for r in _list(t.get("results")):
        if not isinstance(r, dict):
            continue
        gpus = r.get("gpu_ids", r.get("gpu_id", r.get("entity_id")))
        if r.get("entity_group") not in (None, "GPU"):
            continue  # CPU and switch entities: not this check's
        ids = [g.strip() for g in str(gpus).split(",") if g.strip()] if gpus is not None else []
        warnings = [_json_warning(w) for w in _list(r.get("warnings"))]
        info = r.get("info")
        info = [str(i) for i in _list(info)] if not isinstance(info, str) else [info]
        name = str(t.get("name", ""))
        out.append(DiagTest(category, name, _status(r.get("status")), ids, warnings, info))
    return out


def _json_warning(w: Any) -> DiagWarning:
    if isinstance(w, dict):
        eid = w.get("error_id")
        known = isinstance(eid, int) and not isinstance(eid, bool)
        return DiagWarning(str(w.get("warning", "")), eid if known else None)
    return DiagWarning(str(w))


def _status(word: Any) -> str:
    text = str(word or "").strip().lower()
    return STATUSES.get(text, text or "missing")


def _from_text(text: str) -> DiagRun:
    """The table dcgmi prints: `| name | value |` rows, category rows between them, messages
    wrapped over several rows with an empty name."""
    run = DiagRun()
    category, test, note = "", None, None
    last = ""  # the last line of the table seen
    for line in text.splitlines():
        line = line.rstrip()
        if line.startswith(("|", "+")):
            last = line
        if m := _CATEGORY.match(line):
            category, test, note = m.group(1).strip(), None, None
            continue
        if not line.startswith("|") or line.count("|") < 2:  # a paste may lose the last "|"
            if line.strip().lower().startswith("error"):
                run.errors.append(line.strip())
            continue
        name, _, value = line[1:].partition("|")
        name, cell = name.strip(), value.removeprefix(" ").rstrip(" |")
        if category == "Metadata":
            if name == "DCGM Version":
                run.version = cell.strip()
            continue
        if name in ("Diagnostic", "") and cell.strip() == "Result":
            continue
        if name.startswith(("Warning", "Error")):
            note = DiagWarning(cell.strip())
            if name.startswith("Error"):
                test = DiagTest(category, category or "Error", "fail", _gpus(cell))
                run.tests.append(test)
            if test is not None:
                test.warnings.append(note)
            continue
        if name.startswith("Info"):
            note = None
            continue
        if not name:
            if m := _ENTITY.match(cell.strip()):  # 4.x: "GPU0: Fail" under its test
                if test is not None:
                    run.tests.append(
                        DiagTest(category, test.name, _status(m.group(2)), [m.group(1)])
                    )
                note = None
            elif (s := _status(cell.split(" - ")[0])) in ("pass", "fail", "warn", "skip"):
                if test is not None:  # 3.x: "Fail - GPU: 0" under "Pass - GPUs: 1, 2"
                    test = DiagTest(category, test.name, s, _gpus(cell))
                    run.tests.append(test)
                note = None
            elif note is not None:
                note.message = (note.message + cell).rstrip()
            continue
        note = None
        test = DiagTest(category, name, _status(cell.split(" - ")[0]), _gpus(cell))
        run.tests.append(test)
    for t in run.tests:
        for w in t.warnings:
            w.message = re.sub(r" {2,}", " ", w.message)
    run.cut = bool(run.tests) and not (_CLOSING.match(last) and text.endswith("\n"))
    return run


def _gpus(cell: str) -> list[str]:
    m = _GPU_LIST.search(cell)
    return [g.strip() for g in m.group(1).split(",") if g.strip()] if m else []


# Performance figures in the JSON's info messages, as DCGM's plugins write them (NVIDIA/DCGM
# nvvs/plugin_src): the PCIe test's (pcie/BusGrind.cpp, addBandwidthInfo: "GPU to Host
# bandwidth:\t\t%.2f GB/s", "GPU <n> " before it up to 3.x; its latency lines as the outputs
# show them, "GPU to Host latency:\t\t4.386 us"), the Diagnostic test's (diagnostic plugin:
# "GPU %u calculated at approximately %.2f gigaflops during this test"). Matched without case
# or spaces, as the warnings are.
_PCIE_FIGURE = re.compile(
    r"(gputohost|hosttogpu|bidirectional)(bandwidth|latency):(\d+(?:\.\d+)?)(gb/s|us)"
)
_GFLOPS = re.compile(r"calculatedatapproximately(\d+(?:\.\d+)?)gigaflops")
_DIRECTION = {"gputohost": "d2h", "hosttogpu": "h2d", "bidirectional": "bidir"}


def figures(run: DiagRun) -> dict[str, float]:
    """The node's worst GPU on each performance figure the passed tests report: PCIe
    bandwidth (GB/s, the lowest: `dcgm_pcie_<d2h|h2d|bidir>_gb_s`) and latency (microseconds,
    the highest: `..._usec`), the Diagnostic test's gigaflops (`dcgm_diagnostic_gflops`, the
    lowest). A GPU without the message (DCGM 4 keeps at most 16 info messages a run) is not
    in the figure; a test that did not pass gives none."""
    out: dict[str, float] = {}

    def worst(name: str, value: float, pick: Callable[[float, float], float]) -> None:
        out[name] = pick(out[name], value) if name in out else value

    for t in run.tests:
        if t.status != "pass":
            continue
        for message in t.info:
            flat = _flat(message)
            for way, kind, value, unit in _PCIE_FIGURE.findall(flat):
                if (kind, unit) == ("bandwidth", "gb/s"):
                    worst(f"dcgm_pcie_{_DIRECTION[way]}_gb_s", float(value), min)
                elif (kind, unit) == ("latency", "us"):
                    worst(f"dcgm_pcie_{_DIRECTION[way]}_usec", float(value), max)
            for value in _GFLOPS.findall(flat):
                worst("dcgm_diagnostic_gflops", float(value), min)
    return out


def judge(run: DiagRun, exit_code: int | None = None) -> list[Finding]:
    """One finding per test that failed, warned or could not be judged, else one that says
    the diagnostic passed. Results decide when there are any; the exit status only explains
    their absence (dcgmi exits non-zero for failed tests too)."""
    if run.errors or not run.tests:
        if run.errors:
            why = run.errors[0]
        elif exit_code:
            why = f"dcgmi exited with status {exit_code} and printed no results"
        else:
            why = "no test results in the output"
        return [
            _finding("DcgmDiag", Status.UNKNOWN, "DcgmDiagError", f"dcgmi diag did not run: {why}")
        ]
    findings = []
    by_name: dict[str, list[DiagTest]] = {}
    for t in run.tests:
        by_name.setdefault(t.name, []).append(t)
    # In a cut table the last test may lack rows (a "Fail - GPU: 0" under its "Pass", the
    # warning whose code decides the action): only what its rows so far prove is judged.
    tail = run.tests[-1].name if run.cut else None
    for name, results in by_name.items():
        statuses = {t.status for t in results}
        if name == tail and "fail" not in statuses:
            continue
        if "fail" in statuses:
            failed = [t for t in results if t.status == "fail"]
            findings.append(_judge_failed(name, failed, cut=name == tail))
        elif odd := statuses - set(STATUSES.values()):
            message = f"dcgmi diag test {name}: unrecognised status {sorted(odd)[0]!r}"
            findings.append(_finding(name, Status.UNKNOWN, "DcgmDiagError", message))
        elif "warn" in statuses:
            warned = [w.message for t in results for w in t.warnings]
            message = f"dcgmi diag test {name} passed with warnings" + (
                f": {warned[0]}" if warned else ""
            )
            findings.append(
                _finding(
                    name,
                    Status.FAULT,
                    "DcgmDiagWarning",
                    message,
                    evidence={"warnings": warned[:5]},
                )
            )
    if any(f.status is not Status.FAULT or f.action is not Action.NONE for f in findings):
        return findings
    if run.cut:
        message = "dcgmi diag output is cut off before the end of its table"
        return [*findings, _finding("DcgmDiag", Status.UNKNOWN, "DcgmDiagCut", message)]
    ran = sorted({t.name for t in run.tests if t.status in ("pass", "warn")})
    skipped = sorted({t.name for t in run.tests if t.status == "skip"} - set(ran))
    evidence = {"passed": ran, "skipped": skipped, "version": run.version}
    if not ran:
        return [
            _finding(
                "DcgmDiag",
                Status.UNKNOWN,
                "DcgmDiagError",
                "dcgmi diag ran no test: every test was skipped",
                evidence=evidence,
            )
        ]
    message = f"dcgmi diag passed {len(ran)} tests" + (
        f", skipped {len(skipped)}" if skipped else ""
    )
    return [
        *findings,
        _finding("DcgmDiag", Status.OK, "DcgmDiagPassed", message, evidence=evidence),
    ]


def _judge_failed(name: str, failed: list[DiagTest], cut: bool = False) -> Finding:
    codes = table()
    warnings = [w for t in failed for w in t.warnings]
    actions = [codes.test_action(w) for w in warnings]
    gpus = sorted({g for t in failed for g in t.gpus})
    evidence = {
        "gpus": gpus,
        "warnings": [w.message for w in warnings][:5],
        "error_ids": [w.error_id for w in warnings if w.error_id is not None],
    }
    where = f" on GPU {', '.join(gpus)}" if gpus else ""
    detail = f": {warnings[0].message}" if warnings else ""
    if "replace" in actions:
        action = Action.REPLACE
    elif "reboot" in actions:
        action = Action.REBOOT
    elif "unknown" in actions:
        return _finding(
            name,
            Status.UNKNOWN,
            "DcgmDiagInconclusive",
            f"dcgmi diag test {name} could not judge the hardware{where}{detail}",
            Action.NONE,
            evidence,
        )
    elif cut:  # the rows that would say otherwise may be the ones missing
        return _finding(
            name,
            Status.UNKNOWN,
            "DcgmDiagCut",
            f"dcgmi diag test {name} failed{where}{detail}, but the output is cut off "
            "before the test's last row",
            Action.NONE,
            evidence,
        )
    else:
        action = Action.REPLACE  # a failed test with no code that says otherwise: faulty instance
    return _finding(
        name,
        Status.FAULT,
        "DcgmDiagFailed",
        f"dcgmi diag test {name} failed{where}{detail}",
        action,
        evidence,
    )


def _finding(
    test: str,
    status: Status,
    reason: str,
    message: str,
    action: Action = Action.NONE,
    evidence: dict[str, Any] | None = None,
) -> Finding:
    return Finding(
        component=f"dcgm:{test.lower().replace(' ', '_')}",
        condition="DcgmDiagnostic",
        status=status,
        reason=reason,
        message=message,
        action=action,
        evidence=evidence or {},
        check=CHECK,
    )
