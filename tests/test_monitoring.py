"""deploy/monitoring/: the rules pass promtool's own unit tests, the PrometheusRule carries
exactly the plain rule file's groups, every expression in the rules and the dashboard names
metrics the agent or controller exports, and the PodMonitor scrapes the pods deploy/ runs.

`python -m tests.test_monitoring` rewrites prometheusrule.yaml from rules.yaml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

MONITORING = REPO / "deploy" / "monitoring"
# Metrics the rules may use that come from elsewhere: Prometheus' own and kube-state-metrics'.
EXTERNAL = re.compile(r"^(up|kube_[a-z_]+)$")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported() -> set[str]:
    """Every series name the agent's (and controller's) metrics registry can expose."""
    from agent.metrics import Metrics

    metrics = Metrics()
    metrics.follow(list, lambda: (0, 0))
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in _SUFFIXES[family.type]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in ("and", "or", "unless", "bool", "offset"):
            continue  # a function or an aggregation, a keyword
        names.add(m.group())
    return names


def rule_file() -> dict[str, Any]:
    return yaml.safe_load((MONITORING / "rules.yaml").read_text())


def render_prometheus_rule() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "node-health-agent",
            "labels": {"app.kubernetes.io/name": "node-health-agent"},
        },
        "spec": rule_file(),
    }
    head = "# Generated from rules.yaml by `python -m tests.test_monitoring`: edit that file.\n"
    return head + yaml.dump(doc, Dumper=_Literal, sort_keys=False, width=100)


class _Literal(yaml.SafeDumper):
    """Multi-line strings (the expressions) as `|` blocks, as they stand in rules.yaml."""


_Literal.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package; .ci/run installs it)")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "rules.test.yaml"]):
        out = subprocess.run(
            [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_promtool_test() -> None:
    alerts = {r["alert"] for g in rule_file()["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((MONITORING / "rules.test.yaml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    assert alerts == tested


def test_prometheus_rule_is_the_rule_file() -> None:
    assert (MONITORING / "prometheusrule.yaml").read_text() == render_prometheus_rule(), (
        "prometheusrule.yaml is stale: run `python -m tests.test_monitoring`"
    )


def test_expressions_name_only_exported_metrics() -> None:
    names = exported()
    records = {r["record"] for g in rule_file()["groups"] for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rule_file()["groups"] for r in g["rules"]] + dashboard_exprs()
    for expr in exprs:
        used = metric_names(expr)
        ours = {n for n in used if not EXTERNAL.match(n)}
        assert ours <= names | records, (expr, sorted(ours - names - records))
        assert used, expr
    assert len(dashboard_exprs()) >= 15


def test_metric_names_are_read_from_expressions() -> None:
    """The parser the test above relies on: it must see every metric and nothing else."""
    expr = (
        'sum by (instance_type, reason) (node_health_faults_active{reason!="x"} * on (node)'
        " group_left (instance_type) max by (node, instance_type) (node_health_agent_info))"
        " / rate(node_health_check_runs_total[5m]) > 0 and up == 0"
    )
    assert metric_names(expr) == {
        "node_health_faults_active",
        "node_health_agent_info",
        "node_health_check_runs_total",
        "up",
    }


def test_pod_monitors_scrape_the_deployed_pods() -> None:
    monitors = [d for d in yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())]
    workloads = {
        "node-health-agent": REPO / "deploy" / "daemonset.yaml",
        "node-health-controller": REPO / "deploy" / "controller" / "deployment.yaml",
    }
    assert {m["metadata"]["name"] for m in monitors} == set(workloads)
    for monitor in monitors:
        workload = yaml.safe_load(workloads[monitor["metadata"]["name"]].read_text())
        template = workload["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"


if __name__ == "__main__":
    (MONITORING / "prometheusrule.yaml").write_text(render_prometheus_rule())
