"""Which pairs of nodes to test, and what their results say about each node: a pure planner
for the multi-node connectivity check (HyperPod's InstanceConnectivity).

An all-reduce across two nodes that falls short says one of the two is bad, not which. So:
1. pair the nodes (same instance type) two by two; a pair that passes clears both;
2. each node of a failed pair is tested again with a node known good: a pass clears it, a
   failure convicts it;
3. when no node is known good yet, suspects not yet tested together are paired with each
   other (a pass clears both); a suspect never tested against a node known good stays
   unknown, never failed.
A test that could not run (its job failed, no result table) decides nothing: its two nodes are
unknown, tested with no one else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

Pair = tuple[str, str]


class Verdict(enum.StrEnum):
    PASSED = "Passed"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


@dataclass
class Planner:
    nodes: list[str]
    good: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    suspects: dict[str, set[str]] = field(default_factory=dict)  # -> partners it failed with
    tested: set[frozenset[str]] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)  # in a pair under test now
    fresh: list[str] = field(default_factory=list)  # never tested yet

    def __post_init__(self) -> None:
        self.fresh = sorted(set(self.nodes))

    def next_pairs(self, limit: int) -> list[Pair]:
        """Up to `limit` pairs to test now, none sharing a node with a test under way."""
        out: list[Pair] = []
        while len(out) < limit:
            pair = self._one()
            if pair is None:
                break
            self.busy |= set(pair)
            self.tested.add(frozenset(pair))
            out.append(pair)
        return out

    def _one(self) -> Pair | None:
        fresh = [n for n in self.fresh if n not in self.busy]
        if len(fresh) >= 2:
            return self._take(fresh[0], fresh[1])
        good = sorted(self.good - self.busy)
        waiting = sorted(n for n in self.suspects if n not in self.busy) + fresh
        for n in waiting:  # a suspect (or the odd one out) against a node known good
            if good:
                return self._take(n, good[0])
        if self.good or self.busy:
            return None  # wait: a good node may be free, or proven, soon
        for a in waiting:  # nobody known good: suspects from different failed pairs
            for b in waiting:
                if a < b and frozenset((a, b)) not in self.tested:
                    return self._take(a, b)
        return None

    def _take(self, a: str, b: str) -> Pair:
        for n in (a, b):
            if n in self.fresh:
                self.fresh.remove(n)
        return (a, b)

    def record(self, pair: Pair, passed: bool | None) -> None:
        """The pair's result: True passed, False fell short, None could not run."""
        a, b = pair
        self.busy -= {a, b}
        if passed is None:
            for n in (a, b):
                if n not in self.good:
                    self.unknown.add(n)
                    self.suspects.pop(n, None)
            return
        if passed:
            for n in (a, b):
                self.good.add(n)
                self.suspects.pop(n, None)
                self.unknown.discard(n)
            return
        known = [n for n in (a, b) if n in self.good]
        if known:  # against a known-good node: the other is the bad one
            for n in (a, b):
                if n not in self.good:
                    self.bad.add(n)
                    self.suspects.pop(n, None)
            return
        for n, other in ((a, b), (b, a)):
            self.suspects.setdefault(n, set()).add(other)

    def verdicts(self) -> dict[str, Verdict]:
        out = {}
        for n in sorted(set(self.nodes)):
            if n in self.bad:
                out[n] = Verdict.FAILED
            elif n in self.good:
                out[n] = Verdict.PASSED
            else:
                out[n] = Verdict.UNKNOWN
        return out
