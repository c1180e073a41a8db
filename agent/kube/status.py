"""`node-health status`: the cluster's nodes as the agent and the controller labelled them, with
counts per state; each node's performance against its instance type's peers, and the network
nodes suspected (the controller's comparisons, worked out the same way here)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from agent.controller.stragglers import compare
from agent.controller.topology import suspects
from agent.controller.view import connectivity_verdict
from agent.models import ControllerSettings, NodeKeys

INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def rows(nodes: list[dict[str, Any]], keys: NodeKeys) -> list[dict[str, str]]:
    """One row per node: name, health status, deep-check status, the controller's remediation
    step and last connectivity verdict, instance type, last reason."""
    out = []
    for n in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        meta = n["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        out.append(
            {
                "node": meta["name"],
                "health": labels.get(keys.health_status_label, "-"),
                "deep_check": labels.get(keys.deep_health_check_label, "-"),
                "remediation": labels.get(keys.remediation_step_label, "-"),
                "connectivity": connectivity_verdict(annotations, keys) or "-",
                "instance_type": labels.get(INSTANCE_TYPE, "-"),
                "reason": _last_reason(annotations.get(keys.fault_details_annotation))
                or labels.get(keys.fault_reasons_label, "")
                or "-",
            }
        )
    return out


def _last_reason(details: str | None) -> str | None:
    """The newest fault's reason and message from the fault-details annotation."""
    try:
        faults = json.loads(details or "[]")
        last = max(faults, key=lambda f: f.get("timestamp", ""))
        return f"{last['reason']}: {last['message']}"
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def counts(table: list[dict[str, str]]) -> dict[str, int]:
    return dict(sorted(Counter(r["health"] for r in table).items()))


def performance(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: ControllerSettings
) -> list[dict[str, str]]:
    """Per instance type, each node's worst figure against its peers' median."""
    out = []
    for itype, devs in compare(nodes, keys, cfg.stragglers).items():
        worst: dict[str, Any] = {}
        for d in devs:
            if d.node not in worst or d.worse > worst[d.node].worse:
                worst[d.node] = d
        for name, d in sorted(worst.items()):
            out.append(
                {
                    "instance_type": itype,
                    "node": name,
                    "figure": d.figure,
                    "value": f"{d.value:g}",
                    "median": f"{d.median:g}",
                    "worse": f"{d.worse:+.1%}",
                    "degraded": "yes" if d.outlier else "-",
                }
            )
    return out


def suspected(
    nodes: list[dict[str, Any]], keys: NodeKeys, cfg: ControllerSettings, now: float
) -> list[str]:
    """The network nodes suspected, in words (the controller holds their nodes' remediation)."""
    return [f"{s.describe()}; remediation held" for s in suspects(nodes, keys, cfg.topology, now)]


def render_fleet(perf: list[dict[str, str]], suspects_now: list[str]) -> str:
    """The performance table (per instance type) and the suspected network nodes; "" if none."""
    from agent import terminal

    parts = []
    if perf:
        cols = ("instance_type", "node", "figure", "value", "median", "worse", "degraded")
        heads = ["INSTANCE-TYPE", "NODE", "WORST-FIGURE", "VALUE", "MEDIAN", "WORSE", "DEGRADED"]
        parts.append(terminal.table(heads, [[r[c] for c in cols] for r in perf]))
    parts += suspects_now
    return "\n\n".join(parts)


REASON_CHARS = 120  # of the last reason in the table; `wide` and JSON show all of it


def render(table: list[dict[str, str]], wide: bool = False) -> str:
    """The table a person reads (rich lays it out), and the counts per state under it."""
    from agent import terminal

    cols = ("node", "health", "deep_check", "remediation", "connectivity", "instance_type")
    heads = ["NODE", "HEALTH", "DEEP-CHECK", "REMEDIATION", "CONNECTIVITY", "INSTANCE-TYPE"]
    cells = [
        [r[c] for c in cols] + [r["reason"] if wide else r["reason"][:REASON_CHARS]] for r in table
    ]
    summary = ", ".join(f"{state}: {n}" for state, n in counts(table).items())
    shown = terminal.table([*heads, "REASON"], cells)
    return f"{shown}\n\n{len(table)} nodes ({summary})" if table else f"{shown}\nno nodes"
