"""One switch, many nodes: network faults on several nodes under one network node point at the
network, not at the nodes.

EKS labels each node with its place in the AWS network hierarchy
(`topology.k8s.aws/network-node-layer-1` .. `-3`, and `-4` on four-layer types; the bottom
layer is the most selective: nodes sharing it are closest). When `min_nodes` nodes under one
network node report network-class faults (their fault-details annotation: a `type` matching
`fault_types`) within `window`, that network node is the suspect: the controller says so and
holds the remediation of those nodes (replacing N healthy nodes fixes no switch). The labels are
tried most selective first, and a node counts toward the first domain that gathers enough.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.models import NodeKeys, TopologySettings


@dataclass(frozen=True)
class Suspect:
    label: str
    value: str
    nodes: tuple[str, ...]
    faults: tuple[str, ...]  # the network-class fault types seen

    @property
    def domain(self) -> str:
        return f"{self.label}={self.value}"

    def describe(self) -> str:
        return (
            f"network node {self.domain} suspected: {len(self.nodes)} nodes under it report "
            f"network faults ({', '.join(self.faults)}): {', '.join(self.nodes)}"
        )


def network_faults(
    node: dict[str, Any], keys: NodeKeys, cfg: TopologySettings, now: float
) -> list[str]:
    """The node's network-class fault types reported within the window (fault-details)."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    try:
        details = json.loads(annotations.get(keys.fault_details_annotation) or "[]")
    except ValueError:
        return []
    out = []
    for d in details if isinstance(details, list) else []:
        if not isinstance(d, dict):
            continue
        kind, at = str(d.get("type", "")), _time(d.get("timestamp"))
        if at is None or now - at > cfg.window:
            continue
        if any(fnmatch.fnmatchcase(kind, p) for p in cfg.fault_types):
            out.append(kind)
    return sorted(set(out))


def suspects(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: TopologySettings, now: float
) -> list[Suspect]:
    """The network nodes under which at least `min_nodes` nodes report network faults."""
    faulty = {}
    for n in nodes:
        if found := network_faults(n, keys, cfg, now):
            faulty[n["metadata"]["name"]] = (n, found)
    out: list[Suspect] = []
    for label in cfg.labels:
        groups: dict[str, list[str]] = {}
        for name, (n, _) in faulty.items():
            value = ((n.get("metadata") or {}).get("labels") or {}).get(label)
            if value:
                groups.setdefault(value, []).append(name)
        for value, names in sorted(groups.items()):
            if len(names) >= cfg.min_nodes:
                kinds = sorted({k for name in names for k in faulty[name][1]})
                out.append(Suspect(label, value, tuple(sorted(names)), tuple(kinds)))
                for name in names:
                    del faulty[name]  # counted toward the most selective domain only
    return out


def _time(value: object) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
