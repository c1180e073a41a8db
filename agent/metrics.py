"""Prometheus metrics, in a registry of the agent's own (so tests can run several agents)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.policy import Tracker, Verdict, check_results


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.check_runs = Counter(
            "node_health_check_runs",
            "Check runs (of a streaming check: its findings) by result: ok, fault or unknown",
            ["check", "result"],
            registry=r,
        )
        self.check_success = Gauge(
            "node_health_check_success",
            "1 when the check's last run decided, 0 when it timed out or failed",
            ["check"],
            registry=r,
        )
        self.check_duration = Histogram(
            "node_health_check_duration_seconds",
            "Check run time",
            ["check"],
            registry=r,
            buckets=(0.01, 0.05, 0.25, 1, 5, 30, 120, 600),
        )
        self.verdict = Gauge(
            "node_health_verdict", "1 for the node's current verdict", ["verdict"], registry=r
        )
        self.events = Counter(
            "node_health_events", "Events emitted, by level", ["level"], registry=r
        )
        self.sink_errors = Counter(
            "node_health_sink_errors", "Events a sink failed to take", ["sink"], registry=r
        )
        self.kube_write_errors = Counter(
            "node_health_kube_write_errors",
            "Writes to the API server that failed, by kind: label, taint, annotation, condition"
            " (the node writer) or event (Node events)",
            ["kind"],
            registry=r,
        )
        self.state_save_errors = Counter(
            "node_health_state_save_errors",
            "Saves of a state file that failed (policy-state, node-state): a full or read-only"
            " state directory",
            ["file"],
            registry=r,
        )
        self.spool_dropped = Gauge(
            "node_health_spool_dropped_events",
            "Events dropped from a full spool since start",
            registry=r,
        )

        self.breaker_refusals = Counter(
            "node_health_breaker_refusals",
            "Times the circuit breaker kept this node in (too many nodes out already)",
            registry=r,
        )

        self.cw_shipped = Counter(
            "node_health_cloudwatch_shipped_events", "Events CloudWatch accepted", registry=r
        )
        self.cw_batches = Counter(
            "node_health_cloudwatch_batches", "PutLogEvents calls that succeeded", registry=r
        )
        self.cw_retries = Counter(
            "node_health_cloudwatch_retries", "PutLogEvents calls tried again", registry=r
        )
        self.cw_rejected = Counter(
            "node_health_cloudwatch_rejected_events",
            "Events CloudWatch refused (too old, too new, invalid) or unreadable spool lines",
            registry=r,
        )
        self.cw_spool_depth = Gauge(
            "node_health_cloudwatch_spool_depth_bytes", "Spool bytes not shipped yet", registry=r
        )
        self.cw_lag = Gauge(
            "node_health_cloudwatch_lag_seconds",
            "Age of the oldest event not shipped yet (0 when caught up); it grows in an outage",
            registry=r,
        )

        self.info = Info(
            "node_health_agent",
            "The agent's version and instance type (join on it for per-type views)",
            registry=r,
        )

        self.leader = Gauge(
            "node_health_controller_leader", "1 while this controller holds the Lease", registry=r
        )
        self.suspect_network_nodes = Gauge(
            "node_health_suspect_network_nodes",
            "Network nodes (topology) under which several nodes report network faults",
            registry=r,
        )
        self.remediation_steps = Counter(
            "node_health_controller_steps",
            "Remediation steps taken and reports made, by reason (RemediationStarted, ...)",
            ["reason"],
            registry=r,
        )

    def follow(
        self,
        trackers: Callable[[], Iterable[Tracker]],
        spool: Callable[[], tuple[int, int]],
    ) -> None:
        """Export the active faults, each check's result and the spool's fill, read at scrape
        time from what the agent holds: nothing to keep in step."""
        self.registry.register(_NodeCollector(trackers, spool))

    def set_verdict(self, current: Verdict) -> None:
        for v in Verdict:
            self.verdict.labels(str(v)).set(1 if v is current else 0)


class _NodeCollector(Collector):
    def __init__(
        self,
        trackers: Callable[[], Iterable[Tracker]],
        spool: Callable[[], tuple[int, int]],
    ) -> None:
        self.trackers, self.spool = trackers, spool

    def collect(self) -> Iterator[Metric]:
        tracked = list(self.trackers())
        faults = GaugeMetricFamily(
            "node_health_faults_active",
            "Components with an active fault, by check, condition, reason and action",
            labels=["check", "condition", "reason", "action"],
        )
        counts: dict[tuple[str, str, str, str], int] = {}
        for t in tracked:
            if t.active:
                key = (t.check, t.condition, t.reason, str(t.action))
                counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            faults.add_metric(list(key), n)
        yield faults
        results = GaugeMetricFamily(
            "node_health_check_result",
            "1 for each check's current result: ok, unknown or fault (the worst of its parts)",
            labels=["check", "result"],
        )
        for check, result in sorted(check_results(tracked).items()):
            for value in ("ok", "unknown", "fault"):
                results.add_metric([check, value], 1 if value == result else 0)
        yield results
        used, limit = self.spool()
        yield GaugeMetricFamily(
            "node_health_spool_bytes", "Bytes in the local spool's segments", value=used
        )
        yield GaugeMetricFamily(
            "node_health_spool_limit_bytes",
            "The spool's bound (segment size times segments kept); past it the oldest goes",
            value=limit,
        )
