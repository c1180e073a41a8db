"""The on-node record of deep health checks: `<state_dir>/deep-health-check/<run id>.jsonl`.

Each run's file begins with an InProgress line (with the process running it), then has each
test's line and the run's result line. The record is how a daemon on the node learns of a run
it did not start (`node-health deep-check` in its pod, or in a Job's pod on the node): it keeps
that run's labels and feeds a failed run to its policy. Light on purpose: the daemon imports it
at start.

A run is going while its process holds a lock (flock) on its record: the kernel lets go of it
when the process ends, however it ends, and a lock is seen from any pod on the node, where a
PID from another pod's PID namespace means nothing (a Job's `node-health` is PID 1 there).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.events import dumps, rfc3339
from agent.identity import Identity
from checks.api import Action, Finding, Status

DIRECTORY = "deep-health-check"  # under the state dir
FAILED = "failed"  # a test's result word (deepcheck.Outcome.FAILED)
_held: dict[Path, int] = {}  # the records of the runs of this process, locked while they go


def start_record(directory: Path, run_id: str, identity: Identity) -> Path:
    """The run's on-node log, `<state_dir>/deep-health-check/<run id>.jsonl`, begun with an
    InProgress line: a daemon on the node keeps the labels of a run it did not start."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run_id}.jsonl"
    line = {
        "ts": rfc3339(time.time()),
        "node": identity.node_name,
        "deep_health_check_id": run_id,
        "deep_health_check_status": "InProgress",
        "pid": os.getpid(),
    }
    path.write_text(dumps(line) + "\n")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the result is written or the process ends
    _held[path] = fd
    return path


def stopped_line(
    identity: Identity, run_id: str, why: str = "Deep health check stopped before the end."
) -> dict[str, Any]:
    """The last line of a run stopped before its end: it judged nothing."""
    return {
        "level": "warn",
        "ts": rfc3339(time.time()),
        "msg": why,
        "node": identity.node_name,
        "deep_health_check_id": run_id,
        "deep_health_check_status": "Unknown",
    }


def write_results(directory: Path, run_id: str, lines: list[dict[str, Any]]) -> Path:
    """Each test's line and the run's result, after the run's InProgress line."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run_id}.jsonl"
    with path.open("a") as out:
        out.write("".join(dumps(line) + "\n" for line in lines))
    if (fd := _held.pop(path, None)) is not None:
        os.close(fd)  # the run is over: its lock goes with it
    return path


@dataclass(frozen=True)
class Record:
    """The newest deep check on record that says something about the node."""

    run_id: str
    status: str  # InProgress (a run still going), Passed or Failed
    tests: list[dict[str, Any]]


def _newest_first(directory: Path) -> Iterator[tuple[Path, list[Any], dict[str, Any]]]:
    """Each readable record, newest first: its file, its lines and its last line (a dict, or
    {} when it has none)."""
    for path in sorted(directory.glob("*.jsonl"), reverse=True):
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        except (OSError, ValueError):
            continue
        yield path, lines, lines[-1] if lines and isinstance(lines[-1], dict) else {}


def latest_record(directory: Path) -> Record | None:
    """The newest run that is still going or ended Passed or Failed. A run that could not
    judge says nothing; nor does a dry run, or an InProgress one whose process is gone (its
    lock let go: killed, OOM, the node rebooted)."""
    for path, lines, last in _newest_first(directory):
        status = last.get("deep_health_check_status")
        if last.get("dry_run"):  # a dry run changes nothing, now or later
            continue
        if status == "InProgress" and not _going(path):
            continue
        if status in ("InProgress", "Passed", "Failed"):
            tests = [t for t in lines if isinstance(t, dict) and "test" in t]
            return Record(path.stem, status, tests)
    return None


def latest_figures(directory: Path) -> dict[str, Any] | None:
    """The newest finished run's performance figures (tests' `figures`, merged), as the node
    annotation the controller compares across the fleet: {run, at, figures}."""
    for path, lines, last in _newest_first(directory):
        if last.get("dry_run") or last.get("deep_health_check_status") not in ("Passed", "Failed"):
            continue
        figures = {
            k: v
            for t in lines
            if isinstance(t, dict) and isinstance(t.get("figures"), dict)
            for k, v in t["figures"].items()
            if isinstance(v, int | float)
        }
        if figures:
            return {"run": path.stem, "at": last.get("ts"), "figures": figures}
    return None


def record_findings(record: Record) -> list[Finding]:
    """A failed run's tests as findings, for a policy that did not see the run itself."""
    return [
        Finding(
            f"deep_check:{t['test']}",
            "DeepHealthCheck",
            Status.FAULT,
            "DeepHealthCheckFailed",
            f"deep health check {record.run_id}: {t['test']} failed: {t.get('message', '')}",
            Action.REBOOT if t.get("action") == "reboot" else Action.REPLACE,
            {"deep_health_check_id": record.run_id},
            check="deep_check",
        )
        for t in record.tests
        if t.get("result") == FAILED
    ]


def _going(path: Path) -> bool:
    """The run's process holds the record's lock (a lock of this process's own counts too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
