"""Turn kernel-log records into findings with the rule table, fast and without double counts.

Bulk input (a saved log, a backlog) goes through the anchor prefilter so that Python only
touches the lines that hold an anchor; a live record is looked at on its own. On top of the
rules, the classifier keeps a little state:
- de-duplication: one fault printed as several lines (a burst of XID 13 lines for one
  exception, an XID 79 followed by its "fallen off the bus" line) is one finding;
- rates: `rate` rules escalate when a component keeps failing;
- context: a line that only describes (the OOM summary with the pod's cgroup, the first line
  of a GPU's "fallen off the bus" report that syslog split) is merged into the finding that
  follows it, so a multi-line report becomes one finding; a context can also silence what
  follows it (the Oops and panic of a crash asked for through sysrq);
- counts: lines folded into a finding by de-duplication are counted, and the next finding of
  the same key carries the count (`repeated`), so a flood is one event per window.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from checks.api import Action, Finding, Status
from checks.kernel_log import engine
from checks.kernel_log.formats import Stamp, stamp
from checks.kernel_log.rules import CompiledRule, RuleSet, normalize_pci

MAX_MESSAGE = 1024
CUT = "...[truncated by node-health-agent]"  # ends a message or line cut to MAX_MESSAGE
MAX_LINE = 4096
CONTEXT_SECONDS = 5.0
# How long a requested crash (sysrq-trigger, lkdtm) silences what it causes: lkdtm's hard
# lockup is only detected by the watchdog tens of seconds after it was provoked.
REQUESTED_SECONDS = 120.0
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_SPACES = re.compile(r"\s*\n\s*")


@dataclass
class _Context:
    groups: dict[str, str]
    ts: float


@dataclass
class Classifier:
    rules: RuleSet
    engine: str = "auto"
    boot_time: float | None = None  # Unix time of boot, to date records timed since boot
    matched: int = 0  # records that matched a rule (reported or de-duplicated)
    engine_name: str = field(init=False)
    _prefilter: engine.Prefilter = field(init=False, repr=False)
    _last: dict[tuple[str, str, str, Action], float] = field(default_factory=dict, init=False)
    _rates: dict[tuple[str, str], deque[float]] = field(default_factory=dict, init=False)
    _repeats: dict[tuple[str, str, str, Action], int] = field(default_factory=dict, init=False)
    _context: dict[str, _Context] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.engine_name, self._prefilter = engine.build(self.rules.anchors, self.engine)

    # ---- input --------------------------------------------------------------------------------

    def record(self, text: str, when: Stamp | None = None) -> Finding | None:
        """One record (its text may span lines). `when` defaults to what the text says."""
        if not any(a in text for a in self.rules.anchors):
            return None
        return self._classify(text, when or stamp(text, self.boot_time))

    def bulk(self, buf: bytes) -> Iterator[Finding]:
        """Every finding in a buffer of whole lines, in order."""
        for text in self.candidate_records(buf):
            finding = self._classify(text, stamp(text, self.boot_time))
            if finding is not None:
                yield finding

    def candidate_records(self, buf: bytes) -> Iterator[str]:
        """The records (a line and its indented continuation lines) that hold an anchor."""
        for text, _ in self.candidate_spans(buf):
            yield text

    def candidate_spans(self, buf: bytes) -> Iterator[tuple[str, int]]:
        """Each candidate record, with where it ends in `buf` (after its newline)."""
        last_start = -1
        size = len(buf)
        for end in self._prefilter(buf):
            start = buf.rfind(b"\n", 0, end) + 1
            if start <= last_start:
                continue
            # A continuation line (indented, as dmesg and journalctl print the later lines of
            # one record) belongs to the record it continues.
            while start > 0 and buf[start : start + 1] in (b" ", b"\t"):
                start = buf.rfind(b"\n", 0, start - 1) + 1
            stop = buf.find(b"\n", end)
            stop = size if stop < 0 else stop
            while stop + 1 < size and buf[stop + 1 : stop + 2] in (b" ", b"\t"):
                nxt = buf.find(b"\n", stop + 1)
                stop = size if nxt < 0 else nxt
            if start <= last_start:
                continue
            last_start = start
            yield buf[start : min(stop, start + MAX_LINE)].decode("utf-8", "replace"), stop + 1

    # ---- deciding -----------------------------------------------------------------------------

    def _classify(self, text: str, when: Stamp) -> Finding | None:
        for cr in self.rules.candidates(text):
            m = cr.regex.search(text)
            if m is not None:
                self.matched += 1
                return self._finding(cr, m, text, when)
        return None

    def _finding(
        self, cr: CompiledRule, m: re.Match[str], text: str, when: Stamp
    ) -> Finding | None:
        rule = cr.rule
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        if "pci" in groups:
            groups["pci"] = normalize_pci(groups["pci"])
        now = when.ts if when.ts is not None else time.monotonic()
        if rule.context is not None:
            self._context[rule.context] = _Context(groups, now)
            return None
        if rule.unless_context and self._fresh(rule.unless_context, now):
            return None
        if rule.sets_context:
            self._context[rule.sets_context] = _Context(groups, now)
        if rule.uses_context:
            groups = self._merge_context(rule.uses_context, groups, now)
        if "cgroup" in groups and (pod := _POD_UID.search(groups["cgroup"])):
            groups["pod_uid"] = pod.group(1).replace("_", "-")

        component = (
            rule.component.format_map(groups)
            if all(f in groups for f in cr.fields)
            else rule.component_fallback
        )
        reason = rule.reason.format_map(_Blank(groups))
        action, evidence = rule.action, dict(groups)
        for lk in rule.lookup:
            hit = self.rules.tables[lk.table].get(lk.key.format_map(_Blank(groups)))
            if hit is not None:
                action, reason = hit.action, hit.reason or reason
                evidence |= hit.evidence
                break

        window = rule.dedup if rule.dedup is not None else self.rules.dedup
        # The action too: reasons name a class (XidHardwareFailure), and a replace-class line
        # right after a reboot-class one on the same GPU must not fold into it.
        key = (rule.condition or "", reason, component, action)
        last = self._last.get(key)
        if last is not None and 0 <= now - last < window:
            self._repeats[key] = self._repeats.get(key, 0) + 1
            return None
        self._last[key] = now
        if repeated := self._repeats.pop(key, 0):
            evidence["repeated"] = str(repeated)  # lines folded into the previous event

        if rule.rate is not None:
            seen = self._rates.setdefault((rule.name, component), deque())
            seen.append(now)
            while seen and now - seen[0] > rule.rate.window:
                seen.popleft()
            if len(seen) >= rule.rate.count and rule.rate.action.rank > action.rank:
                evidence["rate"] = f"{len(seen)} in {rule.rate.window:g}s"
                action = rule.rate.action
                seen.clear()

        message = _clip(_SPACES.sub(" ", text[m.start() :]).strip())
        evidence |= {"rule": rule.name, "line": _clip(_SPACES.sub(" ", text).strip())}
        if when.wall is not None:
            evidence["log_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when.wall))
        return Finding(
            component=component,
            condition=rule.condition or "",
            status=Status.FAULT,
            reason=reason,
            message=message,
            action=Action(action),
            evidence=evidence,
            temporary=rule.temporary,
            ts=when.wall if when.wall is not None else time.time(),
            clock=when.ts,
            severity=rule.severity,
        )

    def _fresh(self, name: str, now: float) -> bool:
        ctx = self._context.get(name)
        return ctx is not None and 0 <= now - ctx.ts <= REQUESTED_SECONDS

    def _merge_context(self, name: str, groups: dict[str, str], now: float) -> dict[str, str]:
        ctx = self._context.pop(name, None)
        if ctx is None or abs(now - ctx.ts) > CONTEXT_SECONDS:
            return groups
        if "pid" in ctx.groups and "pid" in groups and ctx.groups["pid"] != groups["pid"]:
            return groups
        return ctx.groups | groups


def _clip(text: str) -> str:
    """At most MAX_MESSAGE characters; a cut one says so, so no one takes it for the whole."""
    if len(text) <= MAX_MESSAGE:
        return text
    return text[: MAX_MESSAGE - len(CUT)] + CUT


class _Blank(dict[str, str]):
    """Template values where a group that did not match reads as empty."""

    def __missing__(self, key: str) -> str:
        return ""
