"""Counter velocity: is an error counter growing too fast, or a link going down too often?

Hardware error counters (InfiniBand and EFA ports, NVLinks, PCIe) only ever grow, and a
long-lived node has some of each: a count says nothing, its growth does. `Velocity` keeps,
per counter, the last value and the increases seen within the longest window a limit asks
for, and judges each poll against the limits (`Limit`, a table in counters.yaml):
- `over`: more than this many within `window` (a rate: `over: 5, window: 1m` is >5/min);
- `flaps`: increases in at least this many polls within `window` (a link going down twice);
- `strikes`: after this many breach episodes the breach is permanent until the node reboots.
A value below the last one is a reset (a driver reload, an NVML reset): a new baseline, never
a burst. A new boot id means new counters: everything is forgotten. The state is a small JSON
file in the state dir, written only when a value moved, so that an agent restart neither
loses the baseline nor counts a node's lifetime total as one burst.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from checks.api import load_yaml, seconds


@dataclass(frozen=True)
class Limit:
    """One line of a counter table: which counters (fnmatch on the name), and how fast."""

    counter: str
    window: float
    over: float | None = None
    flaps: int | None = None
    strikes: int | None = None
    reason: str = "ErrorRate"

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Limit:
        known = {"counter", "window", "over", "flaps", "strikes", "reason", "source"}
        if unknown := set(row) - known:
            raise ValueError(f"counter limit {row!r}: unknown field(s) {sorted(unknown)}")
        if "counter" not in row or "window" not in row:
            raise ValueError(f"counter limit {row!r}: counter and window are required")
        if (row.get("over") is None) == (row.get("flaps") is None):
            raise ValueError(f"counter limit {row!r}: give exactly one of over, flaps")
        try:
            return cls._of(row)
        except TypeError as exc:
            raise ValueError(f"counter limit {row!r}: {exc}") from None

    @classmethod
    def _of(cls, row: Mapping[str, Any]) -> Limit:
        return cls(
            counter=str(row["counter"]),
            window=seconds(row["window"], f"counter limit {row['counter']}: window"),
            over=None if row.get("over") is None else float(row["over"]),
            flaps=None if row.get("flaps") is None else int(row["flaps"]),
            strikes=None if row.get("strikes") is None else int(row["strikes"]),
            reason=str(row.get("reason", "ErrorRate")),
        )

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.counter)

    def describe(self) -> str:
        if self.flaps is not None:
            return f"{self.flaps} flaps in {_span(self.window)}"
        return f">{self.over:g}{_per(self.window)}"


def table(section: str) -> list[Limit]:
    """The packaged limits of one section of counters.yaml (`infiniband`, `nvlink`, ...)."""
    text = resources.files("checks").joinpath("counters.yaml").read_text()
    return [Limit.of(row) for row in load_yaml(text)[section]]


@dataclass(frozen=True)
class Breach:
    key: str
    counter: str
    limit: Limit
    increase: float  # within the limit's window (flaps: polls with an increase)
    permanent: bool

    def describe(self) -> str:
        got = (
            f"{self.increase:g} flaps in {_span(self.limit.window)}"
            if self.limit.flaps is not None
            else f"{self.increase:g}{_per(self.limit.window)}"
        )
        return f"{self.counter} {got} (limit {self.limit.describe()})" + (
            ", persistent" if self.permanent else ""
        )


@dataclass(frozen=True, slots=True)
class _Plan:
    """The limits of one counter name, looked up once: each with its strike-key suffix, the
    longest window, and how much a counter may grow within it without any limit to look at
    (below the lowest `over` and the fewest `flaps`): what a busy but healthy counter does."""

    limits: list[tuple[Limit, str]]
    horizon: float
    under_total: float
    under_polls: float

    @classmethod
    def of(cls, limits: Iterable[Limit]) -> _Plan:
        mine = list(limits)
        return cls(
            [(lim, f"\t{lim.counter}\t{lim.window:g}") for lim in mine],
            max((lim.window for lim in mine), default=0.0),
            min((lim.over for lim in mine if lim.over is not None), default=math.inf),
            min((lim.flaps - 1 for lim in mine if lim.flaps is not None), default=math.inf),
        )


class Velocity:
    """Counter samples across polls, judged by `limits`, persisted in `path` (None: in memory)."""

    def __init__(self, limits: Iterable[Limit], path: Path | None, boot_id: str | None) -> None:
        self.limits = list(limits)
        self._plans: dict[str, _Plan] = {}  # counter name -> the limits that match it
        self.path = path
        self.boot_id = boot_id
        self._values: dict[str, int] = {}
        self._events: dict[str, list[list[float]]] = {}  # key -> [[t, increase], ...]
        self._strikes: dict[str, int] = {}  # key\tlimit -> breach episodes this boot
        self._active: set[str] = set()  # key\tlimit in breach at the last poll
        self._flagged: set[str] = set()  # keys with a strike or in breach: judged every poll
        self._dirty = False
        self.resets: list[str] = []  # keys that went backwards in the last poll
        self._load()

    def observe(self, now: float, key: str, counter: str, value: int) -> list[Breach]:
        """Record `value` of `counter` (under `key`) at `now`; the limits it breaches."""
        plan = self._plans.get(counter)
        if plan is None:
            plan = self._plans[counter] = _Plan.of(
                lim for lim in self.limits if lim.matches(counter)
            )
        before = self._values.get(key)
        events = self._events.get(key)
        if before != value:
            self._values[key] = value
            self._dirty = True
            if before is not None and value > before:
                if events is None:
                    events = self._events[key] = []
                events.append([now, value - before])
            elif before is not None:
                self.resets.append(key)
        flagged = key in self._flagged
        if not events and not flagged:
            return []  # the common case: a quiet counter
        if events:
            horizon = now - plan.horizon
            if events[0][0] <= horizon:
                events[:] = [e for e in events if e[0] > horizon]
                self._dirty = True
                if not events:
                    del self._events[key]
            if not flagged and len(events) <= plan.under_polls:
                total = events[0][1] if len(events) == 1 else sum(e[1] for e in events)
                if total <= plan.under_total:
                    return []  # growing, but below every limit, with no strike to hold
        return self._judge(now, key, counter, plan, events)

    def _judge(
        self, now: float, key: str, counter: str, plan: _Plan, events: list[list[float]] | None
    ) -> list[Breach]:
        """Each limit of the counter against its window: a breach, or the strikes it holds."""
        breaches = []
        for lim, suffix in plan.limits:
            sk = key + suffix
            recent = [inc for t, inc in events or () if t > now - lim.window]
            got = len(recent) if lim.flaps is not None else sum(recent)
            threshold = lim.flaps - 1 if lim.flaps is not None else lim.over
            if recent and got > threshold:  # type: ignore[operator]
                breaches.append(Breach(key, counter, lim, got, self._strike(key, sk, lim)))
            else:
                self._active.discard(sk)
                if self._strikes.get(sk, 0) >= (lim.strikes or 0) > 0:
                    breaches.append(Breach(key, counter, lim, got, True))
        if not any(key + s in self._active or key + s in self._strikes for _, s in plan.limits):
            self._flagged.discard(key)
        return breaches

    def _strike(self, key: str, sk: str, lim: Limit) -> bool:
        """Count a breach episode (its first poll); True once `strikes` episodes are reached."""
        self._flagged.add(key)
        if sk not in self._active:
            self._active.add(sk)
            if lim.strikes:
                self._strikes[sk] = self._strikes.get(sk, 0) + 1
                self._dirty = True
        return bool(lim.strikes) and self._strikes.get(sk, 0) >= lim.strikes  # type: ignore[operator]

    def save(self) -> None:
        """Write the state if a value moved; a failed write only costs the baseline."""
        self.resets = []
        if self.path is None or not self._dirty:
            return
        state = {
            "boot_id": self.boot_id,
            "values": self._values,
            "events": self._events,
            "strikes": self._strikes,
        }
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(state, separators=(",", ":")))
            os.replace(tmp, self.path)
            self._dirty = False

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # no state yet, or unreadable: start from a new baseline
        if not isinstance(state, dict) or state.get("boot_id") != self.boot_id:
            self._dirty = True  # a reboot: the counters started again
            return
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            self._values = {str(k): int(v) for k, v in state.get("values", {}).items()}
            self._events = {
                str(k): [[float(t), float(i)] for t, i in v]
                for k, v in state.get("events", {}).items()
            }
            self._strikes = {str(k): int(v) for k, v in state.get("strikes", {}).items()}
            self._flagged = {sk.rsplit("\t", 2)[0] for sk in self._strikes}


def boot_id(host_path: Path) -> str | None:
    """This boot's id (/proc/sys/kernel/random/boot_id under the host root)."""
    try:
        return (host_path / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def read_small(path: str, size: int = 4096) -> bytes:
    """A small sysfs file's bytes, in plain os calls (a poll reads hundreds: open() costs
    twice as much). Raises OSError as open() would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def read_counter(path: str) -> int | None:
    """A sysfs counter file (one decimal number), or None where it is absent or not a number."""
    try:
        return int(read_small(path, 64))
    except (OSError, ValueError):
        return None


def _per(window: float) -> str:
    return {1.0: "/s", 60.0: "/min", 3600.0: "/h", 86400.0: "/d"}.get(
        window, f" in {_span(window)}"
    )


def _span(window: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if window >= size and window % size == 0:
            return f"{window / size:g}{unit}"
    return f"{window:g}s"
