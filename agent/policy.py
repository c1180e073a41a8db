"""Decide what findings mean for the node: the verdict, with hysteresis, from a rule table.

Kept apart from detection (checks) and from reporting (events, sinks, node writers): it takes
findings and returns `Change`s. Rules:
- a fault counts once `count` occurrences fall within `window` (per check/condition/component);
  with `incident`, lines close in time or from a pid already counted are one occurrence;
- a rule with `deep_check` asks for a deep check of the node when it counts, instead of
  changing the verdict: recurring application-class errors are evidence to look at the
  hardware, and the deep check's own findings decide;
- reboot- and replace-class verdicts latch until the node reboots (a new boot id);
- the same reboot-class fault again after that reboot escalates to replace;
- a condition clears after `clean_polls` clean polls in a row, or `ttl` after its last fault;
- unknown is never a fault and never a clean poll;
- one fault event seen by two sources (an XID in the kernel log and through NVML's event API)
  within `DUPLICATE_WINDOW` seconds counts once: the first source's.
The state is persisted so that an agent restart neither forgets a fault nor reports it twice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import fnmatch
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checks.api import Action, Finding, Status, load_yaml, move_aside, seconds

if TYPE_CHECKING:
    from agent.hardware import History


class Verdict(enum.StrEnum):
    """The node-health-status label values."""

    SCHEDULABLE = "Schedulable"
    UNSCHEDULABLE = "Unschedulable"
    PENDING_REBOOT = "UnschedulablePendingReboot"
    PENDING_REPLACEMENT = "UnschedulablePendingReplacement"

    @property
    def rank(self) -> int:
        return _VERDICT_RANK[self]


_VERDICT_RANK = {v: i for i, v in enumerate(Verdict)}


VERDICT_OF_ACTION = {
    Action.NONE: Verdict.SCHEDULABLE,
    Action.RESTART_APP: Verdict.SCHEDULABLE,
    Action.REBOOT: Verdict.PENDING_REBOOT,
    Action.REPLACE: Verdict.PENDING_REPLACEMENT,
}


# The policy table's models: stdlib dataclasses, so that a scan never loads pydantic; pydantic
# validates them all the same where they come from the settings (agent.config).
_STRICT = {"extra": "forbid"}


@dataclass(frozen=True)
class RuleMatch:
    """Shell-style patterns (fnmatch) on a finding's fields; all given must match."""

    __pydantic_config__ = _STRICT

    check: str | None = None
    condition: str | None = None
    reason: str | None = None
    component: str | None = None
    action: Action | None = None
    xid: str | int | None = None  # evidence `xid`: reasons name a class (XidHardwareFailure)

    def __post_init__(self) -> None:
        if self.xid is not None:
            object.__setattr__(self, "xid", str(self.xid))
        if self.action is not None:
            object.__setattr__(self, "action", Action(self.action))

    def patterns(self) -> list[tuple[str, str]]:
        return [(f.name, str(v)) for f in fields(self) if (v := getattr(self, f.name)) is not None]


@dataclass(frozen=True)
class PolicyRule:
    """One line of the policy table: which findings, and what they mean for the node.

    `action` replaces the finding's recommended action; `count` occurrences within `window`
    are needed; `incident`: findings within this many seconds of an occurrence, or from a pid
    (evidence `pid`) one already had, are that occurrence (a burst of XIDs from one fault, a
    crash-looping job's restarts are not several faults); `deep_check`: reaching `count`
    asks for a deep check (`DeepCheckWanted`) and leaves the verdict to its findings; `latch`
    holds the verdict until a reboot (default: for reboot and replace); `clean_polls` clean
    polls in a row, or `ttl` after the last fault, clear it; `escalate`: back after the
    reboot it asked for means replace.
    """

    __pydantic_config__ = _STRICT

    name: str
    match: RuleMatch = field(default_factory=RuleMatch)
    action: Action | None = None
    count: int = 1
    window: float | str | None = None
    incident: float | str | None = None
    deep_check: bool = False
    latch: bool | None = None
    clean_polls: int = 3
    ttl: float | str | None = None
    escalate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.match, dict):
            object.__setattr__(self, "match", RuleMatch(**self.match))
        if self.action is not None:
            object.__setattr__(self, "action", Action(self.action))
        for name in ("window", "incident", "ttl"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, seconds(value, f"rule {self.name!r}: {name}"))
        if self.count < 1 or self.clean_polls < 1:
            raise ValueError(f"rule {self.name!r}: count and clean_polls must be at least 1")


# What deploy/config.example.yaml shows for `policy.rules`.
_EXAMPLE = [
    {
        "name": "memory-exhaustion-is-the-nodes-problem",
        "match": {"check": "memory", "condition": "MemoryExhaustion"},
        "count": 3,
        "window": "10m",
        "action": "reboot",
    }
]


@dataclass(frozen=True)
class HistoryRules:
    """`same_fault_reboots`: a reboot-class fault that already cost this GPU (this device)
    that many reboots means replace; `lemon_remediations` remediations of the node within
    `lemon_window` (the one now asked for counted) mean replace. 0 turns a rule off."""

    __pydantic_config__ = _STRICT

    same_fault_reboots: int = 2
    lemon_remediations: int = 5
    lemon_window: float | str = 7 * 86400.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lemon_window", seconds(self.lemon_window, "history.lemon_window"))
        if self.same_fault_reboots < 0 or self.lemon_remediations < 0:
            raise ValueError("history rules: counts must be 0 (off) or more")


def builtin_history_rules() -> HistoryRules:
    text = resources.files("agent").joinpath("policy.yaml").read_text()
    return HistoryRules(**(load_yaml(text).get("history") or {}))


@dataclass(frozen=True)
class PolicySettings:
    """`rules` are tried before the packaged table, first match wins; `replace_builtin` uses
    only them. `temporary_ttl`: how long an event-only fault counts; `escalation_window`: how
    long a reboot is remembered; `history`: the repeat-offender rules, instead of the packaged
    table's `history` block."""

    __pydantic_config__ = _STRICT

    # `metadata`: what the settings' documentation shows (agent/settings_doc.py).
    rules: list[PolicyRule] = field(
        default_factory=list,
        metadata={"description": "rules tried before the packaged table", "example": _EXAMPLE},
    )
    replace_builtin: bool = field(
        default=False, metadata={"description": "use only `policy.rules`"}
    )
    temporary_ttl: float | str = field(
        default=3600.0, metadata={"description": "how long an event-only fault counts"}
    )
    escalation_window: float | str = field(
        default=7 * 86400.0,
        metadata={"description": "how long a reboot is remembered for escalation"},
    )
    history: HistoryRules | None = field(
        default=None,
        metadata={
            "description": "repeat offenders: the same fault after N reboots, M remediations "
            "in D days (the packaged `history:` block when unset)"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "rules", [PolicyRule(**r) if isinstance(r, dict) else r for r in self.rules]
        )
        if isinstance(self.history, dict):
            object.__setattr__(self, "history", HistoryRules(**self.history))
        for name in ("temporary_ttl", "escalation_window"):
            object.__setattr__(self, name, seconds(getattr(self, name), f"policy.{name}"))


def builtin_rules() -> list[PolicyRule]:
    text = resources.files("agent").joinpath("policy.yaml").read_text()
    return [PolicyRule(**r) for r in load_yaml(text)["rules"]]


def rule_table(settings: PolicySettings) -> list[PolicyRule]:
    """The settings' rules first, then the packaged ones (unless replaced)."""
    return [*settings.rules, *(() if settings.replace_builtin else builtin_rules())]


@dataclass
class Tracker:
    """What the policy remembers of one (check, condition, component)."""

    check: str
    condition: str
    component: str
    temporary: bool
    rule: str
    status: Status
    reason: str
    message: str
    action: Action = Action.NONE
    evidence: dict[str, Any] = field(default_factory=dict)
    occurrences: list[float] = field(default_factory=list)
    pids: list[str] = field(default_factory=list)  # of the occurrences counted (`incident`)
    active: bool = False
    changed: float = 0.0  # when `active` last flipped (the condition's transition time)
    last_fault: float | None = None
    clean: int = 0
    escalated: bool = False

    @property
    def key(self) -> str:
        return key_of(self.check, self.condition, self.component)

    def snapshot(self) -> Tracker:
        """A copy for a change to carry: the tracker itself keeps changing."""
        snap = copy.copy(self)  # dataclasses.replace is several times slower, on a hot path
        snap.occurrences, snap.evidence = list(self.occurrences), dict(self.evidence)
        snap.pids = list(self.pids)
        return snap


def key_of(check: str, condition: str, component: str) -> str:
    return f"{check}\t{condition}\t{component}"


@dataclass(frozen=True)
class Reported:
    """A finding worth an event: new, changed, temporary, or a condition turning on."""

    finding: Finding
    tracker: Tracker
    needed: int  # occurrences the rule needs


@dataclass(frozen=True)
class Cleared:
    tracker: Tracker
    why: str


@dataclass(frozen=True)
class VerdictChanged:
    old: Verdict
    new: Verdict
    cause: Tracker | None
    why: str


@dataclass(frozen=True)
class RebootSeen:
    boot_id: str
    cleared: int


@dataclass(frozen=True)
class DeepCheckWanted:
    """A rule with `deep_check` counted: the node's hardware should be looked at; the verdict
    stays what it was until the deep check's findings say otherwise."""

    tracker: Tracker
    why: str


Change = Reported | Cleared | VerdictChanged | RebootSeen | DeepCheckWanted


DUPLICATE_WINDOW = 10.0  # seconds


class Policy:
    def __init__(
        self,
        rules: list[PolicyRule],
        settings: PolicySettings,
        state_path: Path | None = None,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
        history: History | None = None,
    ) -> None:
        self.rules = rules
        self.history = history  # the hardware history: its rules, and what they read
        self.settings = settings
        self.state_path = state_path
        self.clock = clock
        self._patterns = [_compile(r) for r in rules]
        self._by_name = {r.name: r for r in reversed(rules)}  # the first of a name wins
        self.trackers: dict[str, Tracker] = {}
        self.verdict = Verdict.SCHEDULABLE
        self.latched: Verdict | None = None
        self.latched_keys: list[str] = []
        self.rebooted_for: dict[str, float] = {}
        self.boot_id = boot_id
        self.hold: Verdict | None = None  # kept after a reboot until the first round of checks
        self.pending: list[Change] = []  # changes found while loading, for the first caller
        self._dirty = False
        # (condition, component, reason, xid) of recent fault events -> (check, when): the XID
        # code, since one reason (XidHardwareFailure) covers many codes
        self._recent: dict[tuple[str, str, str, str], tuple[str, float]] = {}
        if state_path is not None:
            self._load(state_path, boot_id)

    # ---- deciding ------------------------------------------------------------------------

    def observe(
        self, findings: Iterable[Finding], report_all: bool = False, log_time: bool = False
    ) -> list[Change]:
        """Take a batch of findings; return what changed, the verdict last. With `log_time`,
        windows run on each finding's own time (a saved log), not on the clock."""
        changes, self.pending = self.pending, []
        now = self.clock()
        history = self.history
        with history.saving_once() if history is not None else contextlib.nullcontext():
            for f in findings:
                at = (f.clock if f.clock is not None else f.ts) if log_time else now
                changes += self._observe(f, at, report_all)
        return self._settle(changes)

    def expire(self) -> list[Change]:
        """Clear conditions whose TTL ran out; call at `next_deadline()`."""
        now = self.clock()
        changes: list[Change] = []
        for t in list(self.trackers.values()):
            ttl = self._ttl(t)
            expired = ttl is not None and t.last_fault is not None and now - t.last_fault >= ttl
            if t.active and expired:
                self._deactivate(t, now)
                changes.append(Cleared(t.snapshot(), f"no recurrence for {ttl:g}s"))
            elif t.temporary and not t.active and (t.last_fault or 0) + self._window(t) <= now:
                del self.trackers[t.key]  # an old event: nothing left to count
                self._dirty = True
        return self._settle(changes)

    def next_deadline(self) -> float | None:
        deadlines = []
        for t in self.trackers.values():
            ttl = self._ttl(t)
            if t.active and ttl is not None and t.last_fault is not None:
                deadlines.append(t.last_fault + ttl)
            elif t.temporary and not t.active:
                deadlines.append((t.last_fault or 0) + self._window(t))
        return min(deadlines, default=None)

    def release_hold(self) -> list[Change]:
        """The first round of checks after a reboot is in: the verdict may now go down."""
        self.hold = None
        return self._settle([])

    def _duplicate(self, f: Finding, now: float) -> bool:
        """The same fault event already came from another source just now."""
        if not (f.temporary and f.status is Status.FAULT):
            return False
        key = (f.condition, f.component, f.reason, str(f.evidence.get("xid", "")))
        seen = self._recent.get(key)
        if seen is not None and seen[0] != f.check and abs(now - seen[1]) <= DUPLICATE_WINDOW:
            return True
        self._recent.pop(key, None)
        self._recent[key] = (f.check, now)  # the newest last, so the stale go from the front:
        while abs(now - next(iter(self._recent.values()))[1]) > DUPLICATE_WINDOW:
            del self._recent[next(iter(self._recent))]  # not a copy per finding (a storm)
        return False

    def _observe(self, f: Finding, now: float, report_all: bool) -> list[Change]:
        if self._duplicate(f, now):
            return []
        rule = self._rule_for(f)
        key = key_of(f.check, f.condition, f.component)
        t = self.trackers.get(key)
        new = t is None
        if t is None:
            t = Tracker(
                f.check,
                f.condition,
                f.component,
                f.temporary,
                rule.name,
                f.status,
                f.reason,
                f.message,
                changed=now,
            )
            self.trackers[key] = t
        self._dirty = True
        changed = new or t.status != f.status
        was_active = t.active
        t.rule = rule.name
        if f.status is Status.UNKNOWN:
            t.status = f.status
            return [Reported(f, t.snapshot(), rule.count)] if changed or report_all else []
        wanted: list[Change] = []
        if f.status is Status.FAULT:
            if self._fault(t, f, rule, now) and rule.deep_check:
                why = f"{len(t.occurrences)} occurrences of {t.reason} on {t.component}"
                wanted.append(DeepCheckWanted(t.snapshot(), why))
        elif t.active:
            t.clean += 1
            if t.clean >= rule.clean_polls:
                why = f"{t.clean} clean polls in a row"
                t.status, t.reason, t.message = f.status, f.reason, f.message
                self._deactivate(t, now)
                return [Cleared(t.snapshot(), why)]
            return [Reported(f, t.snapshot(), rule.count)] if report_all else []
        if f.status is not Status.FAULT:  # a fault's are set by _fault (with the history's why)
            t.status, t.reason, t.message = f.status, f.reason, f.message
            t.evidence = dict(f.evidence)
        report = report_all or changed or f.temporary or t.active != was_active
        return [*([Reported(f, t.snapshot(), rule.count)] if report else []), *wanted]

    def _fault(self, t: Tracker, f: Finding, rule: PolicyRule, now: float) -> bool:
        """Count the fault; True when it turned the condition on."""
        t.clean = 0
        t.last_fault = now
        if rule.window is not None:
            keep = [i for i, ts in enumerate(t.occurrences) if now - ts <= rule.window]
            t.occurrences = [t.occurrences[i] for i in keep]
            t.pids = [t.pids[i] for i in keep if i < len(t.pids)]
        if not self._same_incident(t, f, rule, now):
            t.occurrences.append(now)
            if rule.incident is not None:
                t.pids.append(str(f.evidence.get("pid") or ""))
        t.occurrences, t.pids = t.occurrences[-rule.count :], t.pids[-rule.count :]
        action = rule.action or f.action
        since = self.rebooted_for.get(t.key)
        if (
            rule.escalate
            and action is Action.REBOOT
            and since is not None
            and now - since <= self.settings.escalation_window
        ):
            action, t.escalated = Action.REPLACE, True
        t.status, t.reason, t.message, t.evidence = f.status, f.reason, f.message, dict(f.evidence)
        if action is Action.REBOOT and self.history is not None:
            why = self.history.replace_why(t.component, f.reason, now)
            if why is not None:  # a repeat offender: a reboot did not fix it before
                action, t.escalated = Action.REPLACE, True
                t.message = f"{f.message}; {why}"
                t.evidence["history"] = why
        if len(t.occurrences) < rule.count:
            return False
        turned_on = not t.active
        if turned_on and self.history is not None and t.component != "node":
            self.history.fault(t.component, t.reason, str(action), now)
        if turned_on:
            t.active, t.changed, t.action = True, now, action
        elif action.rank > t.action.rank:
            t.action = action
        latch = rule.latch if rule.latch is not None else action.rank >= Action.REBOOT.rank
        verdict = VERDICT_OF_ACTION[t.action]
        if latch and verdict is not Verdict.SCHEDULABLE:
            if self.latched is None or verdict.rank > self.latched.rank:
                self.latched = verdict
            if t.key not in self.latched_keys:
                self.latched_keys.append(t.key)
        return turned_on

    @staticmethod
    def _same_incident(t: Tracker, f: Finding, rule: PolicyRule, now: float) -> bool:
        """Part of an occurrence already counted: close in time to the last one, or from a
        process one of them came from."""
        if rule.incident is None or not t.occurrences:
            return False
        if 0 <= now - t.occurrences[-1] <= rule.incident:
            return True
        pid = str(f.evidence.get("pid") or "")
        return pid not in ("", "<unknown>") and pid in t.pids

    def _deactivate(self, t: Tracker, now: float) -> None:
        t.active, t.changed, t.clean = False, now, 0
        t.occurrences.clear()
        t.pids.clear()
        t.action = Action.NONE
        t.escalated = False
        if t.status is Status.FAULT:
            t.status = Status.OK
        self._dirty = True

    def _settle(self, changes: list[Change]) -> list[Change]:
        new, cause = self._compute()
        if new is not self.verdict:
            why = cause.message if cause else "no active fault"
            snap = cause.snapshot() if cause else None
            changes.append(VerdictChanged(self.verdict, new, snap, why))
            self.verdict = new
            self._dirty = True
        return changes

    def _compute(self) -> tuple[Verdict, Tracker | None]:
        verdict, cause, rank = Verdict.SCHEDULABLE, None, 0
        for t in self.trackers.values():
            if t.active and (r := _VERDICT_RANK[VERDICT_OF_ACTION[t.action]]) > rank:
                verdict, cause, rank = VERDICT_OF_ACTION[t.action], t, r
        if self.latched is not None and self.latched.rank > verdict.rank:
            verdict = self.latched
            cause = next(
                (self.trackers[k] for k in reversed(self.latched_keys) if k in self.trackers), cause
            )
        if self.hold is not None and self.hold.rank > verdict.rank:
            verdict = self.hold
        return verdict, cause

    def _rule_for(self, f: Finding) -> PolicyRule:
        for rule, pats in zip(self.rules, self._patterns, strict=True):
            if all(_fits(pat, _field(f, name)) for name, pat in pats):
                return rule
        raise LookupError(f"no policy rule matches {f.check}/{f.condition}; add a catch-all")

    def _ttl(self, t: Tracker) -> float | None:
        rule = self._rule_named(t.rule)
        if rule is not None and rule.ttl is not None:
            return rule.ttl
        return self.settings.temporary_ttl if t.temporary else None

    def _window(self, t: Tracker) -> float:
        rule = self._rule_named(t.rule)
        return (rule.window if rule and rule.window else 0.0) or self.settings.temporary_ttl

    def _rule_named(self, name: str) -> PolicyRule | None:
        return self._by_name.get(name)

    # ---- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        if self.state_path is not None and (text := self.dump()) is not None:
            try:
                write_atomic(self.state_path, text)
            except OSError:
                self.mark_dirty()
                raise

    def mark_dirty(self) -> None:
        """A dump that could not be written: the next save writes the state again."""
        self._dirty = True

    def dump(self, outbox: dict[str, Any] | None = None) -> str | None:
        """The state as its file holds it, when it changed since the last dump, or with the
        `outbox` of the batch it took in (agent.commit: what that batch still writes elsewhere,
        saved in the same write); taken on the event loop, so that the write (with its fsync)
        can go to a thread."""
        if not self._dirty and outbox is None:
            return None
        state = {
            "version": 1,
            "boot_id": self.boot_id,
            "verdict": self.verdict,
            "latched": self.latched,
            "hold": self.hold,
            "latched_keys": self.latched_keys,
            "rebooted_for": self.rebooted_for,
            "trackers": [dataclasses.asdict(t) for t in self.trackers.values()],
            "outbox": outbox,
        }
        self._dirty = False
        # default=str: a plugin's evidence may hold what JSON has no type for (a Path), which
        # the events render as text; a dump that raised would stop the batch's commit
        return json.dumps(state, indent=1, default=str)

    def _load(self, path: Path, boot_id: str | None) -> None:
        """The state a previous run saved. Any file that is not one (bad JSON, wrong types, a
        directory in its place) is moved aside and the agent starts afresh: a crash at every
        start would be worse than forgetting."""
        try:
            state = _state(json.loads(path.read_text()))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            moved = move_aside(path)
            where = f"moved to {moved.name}" if moved else "could not be moved aside"
            raise StateCorruptError(f"{path}: {exc}; {where}, starting afresh") from exc
        self.trackers = {t.key: t for t in state["trackers"]}
        self.verdict, self.latched = state["verdict"], state["latched"]
        self.hold = state["hold"]
        self.latched_keys = state["latched_keys"]
        self.rebooted_for = state["rebooted_for"]
        old_boot = state["boot_id"]
        if boot_id and old_boot and boot_id != old_boot:
            self._rebooted(boot_id)

    def _rebooted(self, boot_id: str) -> None:
        """A new boot: the reboot was the remediation. Remember what it was for, start clean."""
        now = self.clock()
        if self.latched is Verdict.PENDING_REBOOT:
            self.rebooted_for.update({k: now for k in self.latched_keys})
            if self.history is not None:
                faults = [self.trackers[k] for k in self.latched_keys if k in self.trackers]
                self.history.remediated(
                    "reboot",
                    [(t.component, t.reason) for t in faults if t.component != "node"],
                    now,
                )
        window = self.settings.escalation_window
        self.rebooted_for = {k: ts for k, ts in self.rebooted_for.items() if now - ts <= window}
        cleared = len(self.trackers)
        self.hold = self.verdict if self.verdict is not Verdict.SCHEDULABLE else None
        self.trackers.clear()
        self.latched, self.latched_keys = None, []
        self.pending.append(RebootSeen(boot_id, cleared))
        self._dirty = True


def coalesce(changes: list[Change]) -> list[Change]:
    """One event for the findings of one rule on one component that a batch reported alike
    (same reason, status and action): the first finding's, with the last one's counts, and
    `repeated` (the classifier's count of lines folded in) raised by the findings it stands for.
    The policy has counted each of them already; only the reporting is folded. A change of the
    condition in between (cleared, a new verdict) starts a new event."""
    out: list[Change] = []
    open_: dict[tuple[str, ...], int] = {}  # group -> index in out
    lines: dict[int, int] = {}  # index in out -> lines it stands for
    for change in changes:
        if not isinstance(change, Reported):
            out.append(change)
            key = getattr(change, "tracker", None)
            if key is not None:
                open_ = {g: i for g, i in open_.items() if g[0] != key.key}
            else:
                open_.clear()
            continue
        f, t = change.finding, change.tracker
        group = (t.key, t.rule, f.reason, str(f.status), str(f.action))
        n = 1 + _repeated(f)
        if (i := open_.get(group)) is None:
            open_[group], lines[len(out)] = len(out), n
            out.append(change)
            continue
        lines[i] += n
        first = out[i]
        assert isinstance(first, Reported)
        evidence = dict(first.finding.evidence) | {"repeated": str(lines[i] - 1)}
        folded = dataclasses.replace(first.finding, evidence=evidence)
        out[i] = Reported(folded, t, change.needed)
    return out


def _repeated(f: Finding) -> int:
    try:
        return max(0, int(f.evidence.get("repeated") or 0))
    except (TypeError, ValueError):
        return 0


class StateCorruptError(RuntimeError):
    """The persisted state could not be read; it was moved aside."""


def _state(raw: Any) -> dict[str, Any]:
    """policy-state.json read back, every value of the type it was saved with; TypeError or
    ValueError otherwise."""
    if not isinstance(raw, dict) or not isinstance(raw.get("trackers"), list):
        raise TypeError("not a policy state (no list of trackers)")
    verdicts = {k: Verdict(raw[k]) if raw.get(k) else None for k in ("latched", "hold")}
    keys, rebooted = raw.get("latched_keys", []), raw.get("rebooted_for", {})
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise TypeError("latched_keys is not a list of strings")
    if not (isinstance(rebooted, dict) and all(_number(v) for v in rebooted.values())):
        raise TypeError("rebooted_for is not a map of times")
    if not isinstance(raw.get("boot_id"), str | None):
        raise TypeError("boot_id is not a string")
    return {
        "trackers": [_tracker(d) for d in raw["trackers"]],
        "verdict": Verdict(raw["verdict"]),
        **verdicts,
        "latched_keys": list(keys),
        "rebooted_for": dict(rebooted),
        "boot_id": raw.get("boot_id"),
    }


_TRACKER_TYPES: dict[str, Any] = {
    **dict.fromkeys(("check", "condition", "component", "rule", "reason", "message"), str),
    **dict.fromkeys(("temporary", "active", "escalated"), bool),
    "evidence": dict,
    "occurrences": list,
    "clean": int,
}


def _tracker(d: Any) -> Tracker:
    if not isinstance(d, dict):
        raise TypeError("a tracker is not an object")
    d = dict(d)
    d["status"] = Status(d["status"])
    d["action"] = Action(d["action"])
    for name, kind in _TRACKER_TYPES.items():
        if name in d and (not isinstance(d[name], kind) or (kind is int and d[name] is True)):
            raise TypeError(f"tracker {name} is not a {kind.__name__}")
    if not all(_number(t) for t in d.get("occurrences", [])):
        raise TypeError("tracker occurrences are not times")
    if not _number(d.get("changed", 0.0)) or not (
        d.get("last_fault") is None or _number(d["last_fault"])
    ):
        raise TypeError("tracker times are not numbers")
    return Tracker(**d)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a crash leaves the old or the new content, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _compile(rule: PolicyRule) -> list[tuple[str, str]]:
    return rule.match.patterns()


def _field(f: Finding, name: str) -> object:
    return f.evidence.get("xid", "") if name == "xid" else getattr(f, name)


def _fits(pattern: str, value: object) -> bool:
    return fnmatch.fnmatchcase(str(value), pattern)


def read_boot_id(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


RESULT_RANK = {"ok": 0, "unknown": 1, "fault": 2}  # a check's results, worst last


def check_results(trackers: Iterable[Tracker]) -> dict[str, str]:
    """Each check's current result, the worst of its trackers': ok, unknown or fault."""
    out: dict[str, str] = {}
    for t in trackers:
        now = "fault" if t.active else str(t.status)
        if RESULT_RANK[now] >= RESULT_RANK.get(out.get(t.check, "ok"), 0):
            out[t.check] = now
    return out
