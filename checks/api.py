"""The check plugin API: what a check declares about itself and what it reports.

Checks only detect. They know nothing of Kubernetes, CloudWatch or the node verdict: they yield
`Finding`s, and the agent's policy decides what those mean for the node.
"""

from __future__ import annotations

import enum
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pydantic stays out of what `node-health scan` imports
    from pydantic import BaseModel

# The one duration grammar of settings, rules and the command line: a number, a decimal
# fraction allowed, and one unit (aws logs tail's s, m, h, d, w, and ms); no unit: seconds.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> Any:
    """'10m' -> 600.0; numbers are seconds; anything else is left for pydantic to reject."""
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    return value


def has_unit(value: str) -> bool:
    """Whether a duration names its unit: `--since 600` is a time (epoch seconds), `10m` ago."""
    m = _DURATION.match(value)
    return bool(m and m.group(2))


def seconds(value: Any, what: str) -> float:
    """A positive duration ('10m', '1.5h', '2w', 5) in seconds, or a ValueError naming `what`."""
    parsed = parse_duration(value)
    if isinstance(parsed, bool) or not isinstance(parsed, int | float) or parsed <= 0:
        raise ValueError(
            f"{what}: {value!r} is not a duration (like 30s, 10m, 1.5h, 2d, 1w, or seconds)"
        )
    return float(parsed)


def load_yaml(text: str) -> Any:
    """YAML through libyaml when PyYAML has it (seven times faster than the pure parser)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def move_aside(path: Path) -> Path | None:
    """Keep an unreadable state file (or a directory where it should be) for a person to look
    at, out of the way of the next write: `<name>.corrupt`, or, where that is taken,
    `<name>.corrupt.<ns>`. None when it cannot be moved (a read-only directory)."""
    for target in (path.with_suffix(".corrupt"), path.with_suffix(f".corrupt.{time.time_ns()}")):
        try:
            path.replace(target)
            return target
        except OSError:
            continue
    return None


class Status(enum.StrEnum):
    """What a check saw for one condition on one component."""

    OK = "ok"
    FAULT = "fault"
    UNKNOWN = "unknown"  # the check could not decide: never treated as a fault


class Action(enum.StrEnum):
    """Recommended remediation, after NVIDIA's XID catalog and NVSentinel's RecommendedAction."""

    NONE = "none"
    RESTART_APP = "restart_app"
    REBOOT = "reboot"
    REPLACE = "replace"

    @property
    def rank(self) -> int:
        return _ACTION_RANK[self]


_ACTION_RANK = {Action.NONE: 0, Action.RESTART_APP: 1, Action.REBOOT: 2, Action.REPLACE: 3}


@dataclass(frozen=True, slots=True)
class Finding:
    """One observation: `condition` on `component` is `status`, and what to do about it.

    `temporary` findings are events (a log line that happened); the others describe a state that
    holds until a later finding says otherwise.
    """

    component: str
    condition: str
    status: Status
    reason: str
    message: str
    action: Action = Action.NONE
    evidence: Mapping[str, Any] = field(default_factory=dict)
    temporary: bool = False
    check: str = ""
    ts: float = field(default_factory=time.time)
    clock: float | None = None  # the source's own time (a log's, since boot), for windows
    severity: str | None = None  # info, warn or error; None: from status and action
    # A streaming check's: where in its source the finding's record ends (StreamingCheck.commit)
    position: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What the agent hands every check: where the host is, and what node this is."""

    host_root: Path = Path("/")
    instance_type: str | None = None
    state_dir: Path | None = None  # where a check may keep a small state file of its own

    def path(self, path: str) -> Path:
        """An absolute host path (`/proc/meminfo`) as seen under the host root."""
        return self.host_root / path.lstrip("/")


class Check:
    """Base of every check. Subclass `PollingCheck` or `StreamingCheck`, not this."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    timeout: ClassVar[float] = 30.0
    enabled_by_default: ClassVar[bool] = True
    needs_executables: ClassVar[tuple[str, ...]] = ()
    needs_paths: ClassVar[tuple[str, ...]] = ()  # host paths, read under the host root
    Options: ClassVar[type[BaseModel] | None] = None  # a pydantic model; None: no options

    def __init__(self, ctx: CheckContext, options: BaseModel | None = None) -> None:
        self.ctx = ctx
        if options is None and self.Options is not None:
            options = self.Options()
        self.options = options

    def missing(self) -> list[str]:
        """What this check needs and the host lacks, in words (`dcgmi not found`)."""
        gone = [f"{exe} not found" for exe in self.needs_executables if shutil.which(exe) is None]
        gone += [f"{p} not found" for p in self.needs_paths if not self.ctx.path(p).exists()]
        return gone


class PollingCheck(Check):
    """A check run every `interval` seconds.

    Implement `collect` (blocking, run in a worker thread so it never stalls the event loop) or
    override `poll` (async).
    """

    interval: ClassVar[float] = 60.0

    _busy: bool = False

    async def poll(self) -> list[Finding]:
        # A timed-out thread cannot be killed; refuse to pile a second one on top of it.
        if self._busy:
            raise CheckBusyError("the previous run has not returned yet")
        self._busy = True
        import asyncio  # here, so that importing the API stays cheap for `node-health scan`

        return await asyncio.to_thread(self._collect_and_release)

    def _collect_and_release(self) -> list[Finding]:
        try:
            return self.collect()
        finally:
            self._busy = False

    def collect(self) -> list[Finding]:
        raise NotImplementedError(f"{type(self).__name__} implements neither collect nor poll")


class StreamingCheck(Check):
    """A check that follows a source (a log, an event API) and yields findings as they come."""

    def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        """Yield findings from the source; with `follow=False`, only what it holds now."""
        raise NotImplementedError

    def checkpoint(self, position: Mapping[str, Any]) -> dict[str, Any] | None:
        """What to remember to resume after `position` (a finding's). The agent writes it in
        one write with the events of the findings up to there, and hands the last one back with
        `resume` at its next start, so that a crash neither loses nor repeats an event. None:
        the check keeps its place itself."""
        return None

    def resume(self, state: Mapping[str, Any] | None) -> None:
        """The agent commits this check's place from now on; `state`: the last checkpoint it
        committed (None: none was found)."""

    def committed(self, state: Mapping[str, Any]) -> None:
        """A checkpoint is on disk with its events: the check may keep a copy of its own.
        OSError: that copy could not be written (the agent counts and says it; the spool's
        checkpoint stays the one a restart resumes from)."""


class CheckBusyError(RuntimeError):
    """A polling check was due while its previous run was still going."""


def graded(
    component: str,
    condition: str,
    what: str,
    percent: float,
    warn: float,
    fail: float,
    fail_action: Action,
    message: str,
    evidence: Mapping[str, Any],
) -> Finding:
    """A usage figure against two thresholds: `<what>OK`; `<what>Low` at `warn` (a fault that
    asks nothing of the node); `<what>Critical` at `fail` (with `fail_action`)."""
    facts = {**evidence, "percent": round(percent, 2)}
    if percent >= fail:
        return Finding(
            component,
            condition,
            Status.FAULT,
            f"{what}Critical",
            message,
            fail_action,
            facts | {"threshold_percent": fail},
        )
    if percent >= warn:
        return Finding(
            component,
            condition,
            Status.FAULT,
            f"{what}Low",
            message,
            Action.NONE,
            facts | {"threshold_percent": warn},
        )
    return Finding(component, condition, Status.OK, f"{what}OK", message, evidence=facts)
