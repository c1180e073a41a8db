"""Fleet-relative performance: a node much slower than its peers drags every collective.

Each node's agent publishes its last deep check's figures (the performance annotation: NCCL
bus bandwidth at each size, EFA loopback bandwidth and latency, DCGM diag's PCIe bandwidth and
latency and Diagnostic gigaflops); the connectivity check's
result annotation carries its pairs' bus bandwidth at each size. Nodes of one instance type are
compared figure by figure: the median and the median absolute deviation (MAD) over the peers'
last results; a node is an outlier on a figure when it is at least `min_drop` worse than the
median and more than `mads` MADs from it (robust statistics: one slow node does not move the
median, and the MAD scales the test to how alike the peers are). There is no absolute number:
the fleet is its own reference. Figures named `*_usec` are better lower; all others higher.

An outlier is marked Degraded (the controller's own label, and an Event with the figures); it
stays Schedulable: taking a node out is the policy's decision, not a comparison's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.events import Event, rfc3339
from agent.kube.client import MERGE, KubeClient, KubeError
from agent.models import NodeKeys, StragglerSettings

log = structlog.get_logger("agent.controller")

INSTANCE_TYPE = "node.kubernetes.io/instance-type"
DEGRADED = "Degraded"


@dataclass(frozen=True)
class Deviation:
    node: str
    figure: str
    value: float
    median: float
    mad: float
    worse: float  # the share worse than the median (0.15: 15% worse); negative: better
    outlier: bool


def figures(node: dict[str, Any], keys: NodeKeys) -> dict[str, float]:
    """The node's last deep-check figures, and its last connectivity run's as
    `connectivity_<figure>`: per figure the best of its pairs (a slow partner slows one pair;
    a slow node slows them all)."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    out = _numbers(_json(annotations.get(keys.performance_annotation)).get("figures"))
    tests = _json(annotations.get(keys.connectivity_result_annotation)).get("tests")
    for test in tests if isinstance(tests, list) else []:
        found = _numbers(test.get("figures") if isinstance(test, dict) else None)
        for k, v in found.items():
            name = f"connectivity_{k}"
            better = min if k.endswith("_usec") else max
            out[name] = better(out[name], v) if name in out else v
    return out


def _json(text: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(text or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _numbers(found: object) -> dict[str, float]:
    if not isinstance(found, dict):
        return {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)}


def instance_type(node: dict[str, Any]) -> str:
    return ((node.get("metadata") or {}).get("labels") or {}).get(INSTANCE_TYPE) or "-"


def compare(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: StragglerSettings
) -> dict[str, list[Deviation]]:
    """Per instance type, every node's deviation on every figure enough peers have."""
    by_type: dict[str, dict[str, dict[str, float]]] = {}
    for n in nodes:
        if found := figures(n, keys):
            by_type.setdefault(instance_type(n), {})[n["metadata"]["name"]] = found
    out: dict[str, list[Deviation]] = {}
    for itype, peers in sorted(by_type.items()):
        names = sorted({f for found in peers.values() for f in found})
        rows = []
        for figure in names:
            values = {name: found[figure] for name, found in peers.items() if figure in found}
            if len(values) < cfg.min_peers:
                continue
            median = statistics.median(values.values())
            mad = statistics.median(abs(v - median) for v in values.values())
            for name, value in sorted(values.items()):
                lower_better = figure.endswith("_usec")
                gap = (value - median) if lower_better else (median - value)
                worse = gap / median if median else 0.0
                outlier = worse >= cfg.min_drop and gap > cfg.mads * mad
                rows.append(Deviation(name, figure, value, median, mad, worse, outlier))
        if rows:
            out[itype] = rows
    return out


class Stragglers:
    """Marks outliers Degraded and clears the mark when they no longer are; says both."""

    def __init__(
        self,
        client: KubeClient,
        keys: NodeKeys,
        cfg: StragglerSettings,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.keys, self.cfg, self.wall = client, keys, cfg, wall

    def scan(self, nodes: list[dict[str, Any]]) -> list[Event]:
        table = compare(nodes, self.keys, self.cfg)
        outliers: dict[str, list[Deviation]] = {}
        for rows in table.values():
            for d in rows:
                if d.outlier:
                    outliers.setdefault(d.node, []).append(d)
        compared = {d.node for rows in table.values() for d in rows}
        events: list[Event] = []
        for n in nodes:
            meta = n["metadata"]
            name = meta["name"]
            marked = (meta.get("labels") or {}).get(self.keys.performance_label) == DEGRADED
            if name in outliers and not marked:
                if self._label(meta, DEGRADED):
                    events.append(self._event(n, outliers[name]))
            elif marked and name in compared and name not in outliers and self._label(meta, None):
                events.append(self._cleared(n))
        return events

    def _label(self, meta: dict[str, Any], value: str | None) -> bool:
        patch = {
            "metadata": {
                "resourceVersion": meta.get("resourceVersion"),
                "labels": {self.keys.performance_label: value},
            }
        }
        try:
            self.client.patch_node(meta["name"], patch, MERGE)
        except KubeError as exc:  # the next scan tries again
            log.warning("performance_label_failed", node=meta["name"], error=str(exc))
            return False
        return True

    def _event(self, node: dict[str, Any], worst: list[Deviation]) -> Event:
        said = "; ".join(
            f"{d.figure} {d.value:g} is {d.worse:.0%} worse than the median {d.median:g} "
            f"(MAD {d.mad:g})"
            for d in sorted(worst, key=lambda d: -d.worse)[:5]
        )
        return self._base(
            node,
            "warn",
            "PerformanceDegraded",
            f"slower than its {instance_type(node)} peers: {said}; it stays schedulable",
        ) | {"figures": {d.figure: d.value for d in worst}}

    def _cleared(self, node: dict[str, Any]) -> Event:
        msg = f"back within its {instance_type(node)} peers' figures"
        return self._base(node, "info", "PerformanceRecovered", msg)

    def _base(self, node: dict[str, Any], level: str, reason: str, msg: str) -> Event:
        meta = node["metadata"]
        event: Event = {"level": level, "ts": rfc3339(self.wall()), "msg": msg}
        event.update(node=meta["name"], reason=reason)
        if meta.get("uid"):
            event["node_uid"] = meta["uid"]
        return event
