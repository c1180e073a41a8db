"""How much remediation the fleet takes at once: at most `concurrent` nodes in remediation and
`per_hour` started in any hour. A pure object: the controller keeps its state on the nodes and
rebuilds it from them after a restart (`in_progress`, `started_at`)."""

from __future__ import annotations

from dataclasses import dataclass, field

HOUR = 3600.0


@dataclass
class Budget:
    concurrent: int
    per_hour: int
    in_progress: set[str] = field(default_factory=set)
    started_at: list[float] = field(default_factory=list)  # when each recent one began

    def refuses(self, node: str, now: float) -> str | None:
        """Why `node` may not start now; None: it may."""
        if node in self.in_progress:
            return None  # already counted
        if len(self.in_progress) >= self.concurrent:
            return (
                f"{len(self.in_progress)} nodes in remediation already (at most {self.concurrent})"
            )
        recent = [t for t in self.started_at if now - t < HOUR]
        if len(recent) >= self.per_hour:
            return f"{len(recent)} remediations started in the last hour (at most {self.per_hour})"
        return None

    def start(self, node: str, now: float) -> None:
        if node not in self.in_progress:
            self.in_progress.add(node)
            self.started_at = [t for t in self.started_at if now - t < HOUR] + [now]

    def done(self, node: str) -> None:
        self.in_progress.discard(node)
