"""NCCL `all_reduce_perf` (nccl-tests) output: the result table read, then judged.

What a run says, in the order it matters:
- NCCL's own warning that a CUDA call failed while it set the GPUs up (`NCCL WARN Cuda
  failure ...` from its NVLS / multicast transport or its communicator init) is the node's
  GPU or NVLink fabric state, not the application: reboot. An error that says the
  environment failed instead (the device busy, out of memory, a driver that does not match
  the runtime) stays a test that could not run;
- a test that failed (`Test NCCL failure`, `Test CUDA failure`, `NCCL failure`) or stopped
  before its summary proves nothing about the hardware: unknown, never a fault;
- wrong results (`#wrong` above zero in any row, `Out of bounds values : N FAILED`) mean the
  GPUs or the links between them corrupt data: replace;
- the bus bandwidth at the message size the threshold is set for, below the instance type's
  minimum, is a slow fabric: replace, reported as HyperPod words it ("Bandwidth has less than
  threshold: Expected minimum threshold :80,NCCL Test output Bw: 30").
The table is read by its header's column names, so the old layout (`error` columns, no
`root`), the per-iteration one and output tagged by `mpirun --tag-output` or `srun --label`
all parse the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from checks.api import Action, Finding, Status

CHECK = "nccl"
COMPONENT = "nccl:all_reduce"
# mpirun --tag-output ("[1,0]<stdout>:") and srun --label ("0: ") put a tag before each line.
_TAG = re.compile(r"^(?:\[\d+,\d+\]<std(?:out|err)>:|\d+: )")
_SUMMARY = re.compile(r"^#?\s*(Out of bounds values|Avg bus bandwidth)\s*:\s*(\S+)")
_FAILURE = re.compile(r"(?:Test (?:NCCL|CUDA) failure|NCCL failure|Test failure) \S+")
_WARN = re.compile(r"\bNCCL WARN\b")
# NCCL's WARN line (src/debug.cc: "[%d] %s:%d NCCL WARN %s", newer builds add " (%s)", the
# function) for a failed CUDA call: CUDACHECK's "Cuda failure '%s'" (src/include/checks.h) and
# CUCHECK's "Cuda failure %d '%s'" (src/include/cudawrap.h), NVIDIA/nccl @ 5067397.
_CUDA_WARN = re.compile(r"(\S+\.cc):\d+(?: \([^)]*\))? NCCL WARN Cuda failure (?:\d+ )?'(.*)'")
# Where those mean the node: the NVLS (NVLink SHARP, multicast) transport's setup and the
# communicator's init. Elsewhere (enqueue.cc: a kernel the build lacks) it is the program's.
_SETUP_FILES = ("transport/nvls.cc", "/src/init.cc")
# CUDA's error strings (cudaGetErrorString / cuGetErrorString) that say the environment, not
# the GPU, failed: another process holds the GPU or its memory, or the driver and runtime
# do not match.
_ENVIRONMENT = (
    "busy or unavailable",
    "out of memory",
    "driver version is insufficient",
    "unsupported display driver",
    "forward compatibility was attempted",
)
WRONG_COLUMNS = ("#wrong", "wrong")
# nccl-tests' own layout, for a pasted piece of table that lost its header line.
DEFAULT_COLUMNS = ["size", "count", "type", "redop", "root"] + 2 * [
    "time",
    "algbw",
    "busbw",
    "#wrong",
]


@dataclass(frozen=True)
class Row:
    """One message size: bus bandwidth (GB/s) and wrong values, out-of-place and in-place."""

    size: int
    busbw: tuple[float | None, float | None]
    wrong: tuple[int | None, int | None]  # None: not reported (N/A) or an old layout


@dataclass
class NcclRun:
    rows: list[Row] = field(default_factory=list)
    out_of_bounds: int | None = None
    avg_busbw: float | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def setup_failures(self) -> list[str]:
        """NCCL's warnings that a CUDA call failed in its NVLS or init setup for a reason of
        the GPU's state (not the environment's)."""
        out = []
        for line in self.warnings:
            m = _CUDA_WARN.search(line)
            if not m or not _setup_file(m.group(1)):
                continue
            if not any(e in m.group(2).lower() for e in _ENVIRONMENT):
                out.append(line)
        return out

    @property
    def complete(self) -> bool:
        """The run printed its summary: it got to the end."""
        return self.avg_busbw is not None

    def at(self, size: int) -> Row | None:
        return next((r for r in reversed(self.rows) if r.size == size), None)

    @property
    def wrong(self) -> int:
        return sum(w for r in self.rows for w in r.wrong if w)


def _setup_file(path: str) -> bool:
    return path == "init.cc" or path.endswith(_SETUP_FILES)


@dataclass(frozen=True)
class BusBandwidth:
    """The minimum bus bandwidth (GB/s) a healthy node reaches at one message size (bytes)."""

    size: int
    minimum: float


# Where a saved output of an nccl-tests binary begins (for `scan`, which is handed anything):
# its banner, its table's header (the old layout's "bytes N type ... res" too), a failure, or
# the summary of a paste that lost the rest.
MARKER = re.compile(
    rb"^\S*\s*# nThread \d|^\S*\s*#?\s+(?:size\s+count|bytes\s+N)\s+type\b[^\n]*\bbusbw\b|"
    rb"Out of bounds values\s*:|Avg bus bandwidth\s*:|Test (?:NCCL|CUDA) failure \S|"
    rb"^\S*\s*NCCL failure \S+:\d+|\.cc:\d+(?: \([^)\n]*\))? NCCL WARN Cuda failure ",
    re.M,
)
MARKER_WORDS = (
    b"nThread",
    b"busbw",
    b"Out of bounds",
    b"Avg bus",
    b"NCCL failure",
    b"CUDA failure",
    b"NCCL WARN",
)


def parse(text: str) -> NcclRun:
    """Read every result row, the summary, and the failure and warning lines. Lines that are
    none of these (NCCL INFO, MPI banners, garbage) are passed over."""
    run = NcclRun()
    columns: list[str] | None = None
    for raw in text.splitlines():
        line = _TAG.sub("", raw, count=1).rstrip()
        if not line.strip():
            continue
        if m := _SUMMARY.match(line.strip()):
            _summary(run, m.group(1), m.group(2))
            continue
        if _FAILURE.search(line):
            run.failures.append(line.strip())
            continue
        if _WARN.search(line):
            run.warnings.append(line.strip())
            continue
        tokens = line.lstrip("#").split()
        if tokens[:2] == ["size", "count"] and "busbw" in tokens:
            columns = tokens
            continue
        layout = columns or DEFAULT_COLUMNS
        if len(tokens) == len(layout) and (row := _row(layout, tokens)):
            run.rows.append(row)
    return run


def _summary(run: NcclRun, key: str, value: str) -> None:
    # A truncated or garbled value (a cut line, NaN, a negative count): as if it were not there.
    if key == "Out of bounds values":
        run.out_of_bounds = _int(value)
    else:
        run.avg_busbw = _float(value)


def _row(columns: list[str], tokens: list[str]) -> Row | None:
    """One result row; None when a number in it is not one a run prints (a cut or garbled
    line is no measurement)."""
    size = _int(tokens[0])
    cells = list(zip(columns, tokens, strict=True))
    busbw = [_float(t) for c, t in cells if c == "busbw"]
    wrong_cells = [t for c, t in cells if c in WRONG_COLUMNS]
    wrong = [None if t == "N/A" else _int(t) for t in wrong_cells]
    if size is None or not busbw or None in busbw:
        return None
    if any(w is None and t != "N/A" for w, t in zip(wrong, wrong_cells, strict=True)):
        return None
    pair_bw = (busbw[0], busbw[1] if len(busbw) > 1 else None)
    pair_wrong = (wrong[0] if wrong else None, wrong[1] if len(wrong) > 1 else None)
    return Row(size, pair_bw, pair_wrong)


_NUMBER = re.compile(r"\d{1,30}(?:\.\d{0,30})?(?:[eE][+-]?\d{1,3})?")


def _float(token: str) -> float | None:
    """A finite, non-negative measurement; None for N/A, NaN, inf, a sign or anything else."""
    if not _NUMBER.fullmatch(token):
        return None
    value = float(token)
    return value if math.isfinite(value) else None


def _int(token: str) -> int | None:
    """A count ("0", also "0e+00" or "1e+00" where a build prints it so); None otherwise."""
    value = _float(token)
    return int(value) if value is not None and value == int(value) else None


def judge(
    run: NcclRun, threshold: BusBandwidth | None, exit_code: int | None = None
) -> list[Finding]:
    """One finding that says what the run shows about the node."""
    evidence: dict[str, object] = {
        "rows": len(run.rows),
        "complete": run.complete,
        "avg_busbw": run.avg_busbw,
    }
    if run.warnings:
        evidence["nccl_warnings"] = run.warnings[:5]
    if run.out_of_bounds or run.wrong:
        count = max(run.out_of_bounds or 0, run.wrong)
        return [
            _finding(
                Status.FAULT,
                "NcclWrongResults",
                f"the NCCL test returned wrong results: {count} values out of bounds",
                Action.REPLACE,
                evidence | {"wrong": count},
            )
        ]
    if setup := run.setup_failures:
        return [
            _finding(
                Status.FAULT,
                "NcclCudaSetupFailure",
                f"NCCL could not set up the node's GPUs: {setup[0]}",
                Action.REBOOT,
                evidence | {"failures": (setup + run.failures)[:5]},
            )
        ]
    # A pasted table may lack its summary and still be judged; a run of ours must finish.
    if run.failures or exit_code not in (None, 0) or (exit_code == 0 and not run.complete):
        why = (
            run.failures[0]
            if run.failures
            else f"exited with status {exit_code}"
            if exit_code not in (None, 0)
            else "the output ends before the test's summary"
        )
        return [
            _finding(
                Status.UNKNOWN,
                "NcclTestError",
                f"the NCCL test could not run: {why}",
                Action.NONE,
                evidence | {"failures": run.failures[:5]},
            )
        ]
    if not run.rows:
        return [
            _finding(
                Status.UNKNOWN,
                "NcclTestError",
                "the NCCL test output has no result table",
                Action.NONE,
                evidence,
            )
        ]
    if threshold is None:
        return _passed(run, evidence) or [
            _finding(
                Status.OK,
                "NcclTestPassed",
                "the NCCL test passed its correctness checks; no minimum bus bandwidth is "
                "set for this instance type, so the bandwidth was not judged",
                Action.NONE,
                evidence,
            )
        ]
    row = run.at(threshold.size)
    if row is None:
        return [
            _finding(
                Status.UNKNOWN,
                "NcclTestError",
                f"the NCCL test has no result at {threshold.size} bytes, the size the bandwidth "
                "threshold is set for",
                Action.NONE,
                evidence,
            )
        ]
    measured = max(b for b in row.busbw if b is not None)
    evidence |= {"size": threshold.size, "busbw": measured, "minimum": threshold.minimum}
    if measured < threshold.minimum:
        return [
            _finding(
                Status.FAULT,
                "NcclLowBandwidth",
                "Bandwidth has less than threshold: Expected minimum threshold "
                f":{threshold.minimum:g},NCCL Test output Bw: {measured:g}",
                Action.REPLACE,
                evidence,
            )
        ]
    return _passed(run, evidence) or [
        _finding(
            Status.OK,
            "NcclTestPassed",
            f"NCCL test: {measured:g} GB/s bus bandwidth at {threshold.size} bytes "
            f"(minimum {threshold.minimum:g})",
            Action.NONE,
            evidence,
        )
    ]


def _passed(run: NcclRun, evidence: dict[str, object]) -> list[Finding]:
    """Nothing when the run may pass; else why not: a pasted table cut before its summary
    showed no fault so far, which is no pass either."""
    if run.complete:
        return []
    message = "the NCCL test output ends before the test's summary"
    return [_finding(Status.UNKNOWN, "NcclTestError", message, Action.NONE, evidence)]


def _finding(
    status: Status, reason: str, message: str, action: Action, evidence: dict[str, object]
) -> Finding:
    return Finding(
        component=COMPONENT,
        condition="NcclAllReduce",
        status=status,
        reason=reason,
        message=message,
        action=action,
        evidence=evidence,
        check=CHECK,
    )


def threshold_for(instance_type: str | None) -> BusBandwidth | None:
    """The instance type's minimum from checks/instance_types.yaml, if it has one."""
    from checks.instance_types import expected

    want = expected(instance_type)
    if want.allreduce_busbw is None:
        return None
    return BusBandwidth(want.allreduce_bytes, want.allreduce_busbw)
