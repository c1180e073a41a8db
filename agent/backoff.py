"""Jittered exponential backoff: the one every retry loop of the agent uses.

A small state object rather than a retry decorator (tenacity's, backoff's): the loops are async
tasks, threads and a reconcile that keeps one delay per part of the node, each with its own
control flow; they only ask "how long now" and say when a try worked. Every wait is jittered, so
a thousand nodes that lost the same API server or broker do not come back in step. A server's
Retry-After is a floor (never try sooner than asked), spread upwards by the same jitter and
capped at five ceilings, so a wrong header cannot park a loop for hours.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_AFTER_CEILINGS = 5  # the longest Retry-After honoured, in ceilings


@dataclass
class Backoff:
    """`first`, twice that, ... up to `ceiling`, each times a factor drawn from `spread`."""

    first: float
    ceiling: float
    spread: tuple[float, float] = (0.8, 1.2)
    uniform: Callable[[float, float], float] = field(default=random.uniform, repr=False)
    failures: int = 0  # in a row, since the last reset

    @property
    def step(self) -> float:
        """The next wait before jitter."""
        return min(self.ceiling, self.first * 2.0 ** min(self.failures, 64))

    def next(self, retry_after: float | None = None) -> float:
        """Seconds to wait after one more failure; `retry_after` is the server's word."""
        low, high = self.spread
        wait = self.step * self.uniform(low, high)
        if retry_after is not None:  # spread, then bounded: the bound is the longest wait
            floor = retry_after * self.uniform(1.0, max(1.0, high))
            wait = max(wait, min(floor, RETRY_AFTER_CEILINGS * self.ceiling))
        self.failures += 1
        return wait

    def reset(self) -> None:
        """A try worked: the next failure waits `first` again."""
        self.failures = 0
