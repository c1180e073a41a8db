"""Fleet-relative performance: the deep check's figures in its record and the node annotation,
and the controller's comparison of each node with its peers of the same instance type (median
and MAD), marking outliers Degraded through the fake API server."""

from __future__ import annotations

import json
from pathlib import Path

from agent import deeprecord
from agent.controller.stragglers import Stragglers, compare
from agent.deepcheck import efa_figures, nccl_figures
from agent.identity import Identity
from agent.kube.client import KubeClient
from agent.models import NodeKeys, StragglerSettings
from checks.efa_output import judge_loopback
from tests.kube.fake_api import FakeKubeAPI

KEYS = NodeKeys()
FIX = Path(__file__).parent.parent / "fixtures"
GIB = "nccl_busbw_1073741824"
TYPE = "node.kubernetes.io/instance-type"


def node(name: str, itype: str, found: dict[str, float]) -> dict:
    doc = {"run": "r", "figures": found}
    return {
        "metadata": {
            "name": name,
            "labels": {TYPE: itype},
            "annotations": {KEYS.performance_annotation: json.dumps(doc)},
        }
    }


def fleet(values: list[float], itype: str = "p5.48xlarge", figure: str = GIB) -> list[dict]:
    return [node(f"{itype}-{i}", itype, {figure: v}) for i, v in enumerate(values)]


def outliers(nodes: list[dict], cfg: StragglerSettings | None = None) -> list[str]:
    table = compare(nodes, KEYS, cfg or StragglerSettings())
    return [d.node for rows in table.values() for d in rows if d.outlier]


def test_the_figures_of_a_deep_check_are_each_size_s_bus_bandwidth_and_efa_s_worst_device():
    text = (FIX / "nccl" / "p5-2node-mpirun.txt").read_text()
    found = nccl_figures(text)
    assert found[GIB] == 313.29 and found["nccl_busbw_2147483648"] == 437.89  # in-place better
    assert found["nccl_busbw_0"] == 0.0
    pingpong = (FIX / "efa" / "fi_pingpong-client-2node-cut.txt").read_text()
    ok = judge_loopback("rdmap16s27", pingpong, 0, False)
    bad = judge_loopback("rdmap32s27", "", 1, False)
    assert efa_figures([ok, bad]) == {
        "efa_loopback_mb_s": ok.evidence["max_mb_s"],
        "efa_loopback_usec": ok.evidence["min_usec"],
    }
    assert efa_figures([bad]) == {}


def test_the_newest_finished_run_s_figures_are_the_node_s(tmp_path: Path) -> None:
    ident = Identity(node_name="gpu-1")
    for run, status, value in (
        ("20261101T000000Z-a", "Passed", 300.0),
        ("20261102T000000Z-b", "Failed", 250.0),
    ):
        deeprecord.start_record(tmp_path, run, ident)
        test = {"test": "nccl-allreduce", "result": "passed", "figures": {GIB: value}}
        deeprecord.write_results(
            tmp_path, run, [test, {"deep_health_check_status": status, "ts": run}]
        )
    deeprecord.start_record(tmp_path, "20261103T000000Z-c", ident)  # going: not yet
    assert deeprecord.latest_figures(tmp_path) == {
        "run": "20261102T000000Z-b",
        "at": "20261102T000000Z-b",
        "figures": {GIB: 250.0},
    }


def test_a_node_well_below_its_peers_is_an_outlier() -> None:
    assert outliers(fleet([480, 482, 479, 481, 400])) == ["p5.48xlarge-4"]
    assert outliers(fleet([480, 482, 479, 481, 460])) == []  # 4% slower: within the fleet
    # spread peers: 15% below the median but within 3 MADs of it
    assert outliers(fleet([400, 480, 560, 470, 408])) == []


def test_latency_is_worse_higher_and_types_are_compared_apart() -> None:
    lat = fleet([20.0, 21.0, 20.5, 20.2, 30.0], figure="efa_loopback_usec")
    assert outliers(lat) == ["p5.48xlarge-4"]
    # dcgmi diag's PCIe figures: a slow link is low bandwidth, or high latency
    assert outliers(fleet([53.1, 53.0, 53.2, 52.9, 40.0], figure="dcgm_pcie_h2d_gb_s")) == [
        "p5.48xlarge-4"
    ]
    pcie_lat = fleet([2.0, 2.1, 2.05, 2.02, 1.5], figure="dcgm_pcie_h2d_usec")
    assert outliers(pcie_lat) == []  # faster than its peers: not degraded
    mixed = fleet([480, 482, 479, 481]) + fleet([240, 241, 239, 242], itype="p4d.24xlarge")
    assert outliers(mixed) == []  # a p4d is not slow next to a p5


def test_too_few_peers_compare_nothing() -> None:
    assert outliers(fleet([480, 482, 300])) == []
    assert outliers(fleet([480, 482, 300]), StragglerSettings(min_peers=3)) == ["p5.48xlarge-2"]


def test_an_outlier_is_marked_degraded_once_and_cleared_when_back(api: FakeKubeAPI, kcfg) -> None:
    values = {"gpu-0": 480.0, "gpu-1": 482.0, "gpu-2": 479.0, "gpu-3": 481.0, "gpu-4": 400.0}
    for name, value in values.items():
        api.add_node(name, {TYPE: "p5.48xlarge", KEYS.health_status_label: "Schedulable"})
        doc = json.dumps({"run": "r", "figures": {GIB: value}})
        api.edit(
            name,
            lambda n, d=doc: n["metadata"]["annotations"].update({KEYS.performance_annotation: d}),
        )
    client = KubeClient(str(kcfg))
    s = Stragglers(client, KEYS, StragglerSettings())
    [event] = s.scan(client.list_nodes(""))
    assert (event["node"], event["reason"], event["level"]) == (
        "gpu-4",
        "PerformanceDegraded",
        "warn",
    )
    assert event["figures"] == {GIB: 400.0}
    assert "17% worse than the median 480 (MAD 1)" in event["msg"]
    labels = api.node("gpu-4")["metadata"]["labels"]
    assert labels[KEYS.performance_label] == "Degraded"
    assert labels[KEYS.health_status_label] == "Schedulable"  # the agent's, untouched
    assert s.scan(client.list_nodes("")) == []  # said once
    doc = json.dumps({"run": "r2", "figures": {GIB: 478.0}})
    api.edit(
        "gpu-4", lambda n: n["metadata"]["annotations"].update({KEYS.performance_annotation: doc})
    )
    [event] = s.scan(client.list_nodes(""))
    assert (event["node"], event["reason"]) == ("gpu-4", "PerformanceRecovered")
    assert KEYS.performance_label not in api.node("gpu-4")["metadata"]["labels"]


def test_the_agent_publishes_the_last_run_s_figures_on_its_node(settings_for) -> None:
    from agent.daemon import Agent

    settings = settings_for()
    records = settings.state_dir / deeprecord.DIRECTORY
    deeprecord.start_record(records, "20261101T000000Z-a", Identity(node_name="gpu-1"))
    test = {"test": "nccl-allreduce", "result": "passed", "figures": {GIB: 313.29}}
    done = {"deep_health_check_status": "Passed", "ts": "2026-11-01T00:10:00Z"}
    deeprecord.write_results(records, "20261101T000000Z-a", [test, done])
    agent = Agent(settings, Identity(node_name="gpu-1"), [])
    published = json.loads(agent._node_state().annotations[KEYS.performance_annotation])
    assert published == {"run": "20261101T000000Z-a", "at": done["ts"], "figures": {GIB: 313.29}}


def test_the_connectivity_check_s_figures_are_compared_too(api: FakeKubeAPI, kcfg) -> None:
    """Each pair's bus bandwidth at each size lands in the result annotation; a node's figure
    is its best pair's, so the node in the slow pair that is fine elsewhere is not an
    outlier, and the slow node is."""
    from agent.controller.stragglers import figures
    from tests.controller.test_connectivity import GOOD, SLOW, Operator, connectivity
    from tests.controller.test_connectivity import fleet as cluster

    names = cluster(api, 6)
    with Operator(api, bad={"gpu-3"}):
        connectivity(kcfg, [], max_share=1.0).check(names)
    nodes = [api.node(n) for n in names]
    best = {n["metadata"]["name"]: figures(n, KEYS)[f"connectivity_{GIB}"] for n in nodes}
    assert best["gpu-2"] == nccl_figures(GOOD)[GIB]  # with gpu-3 slow, with another fine
    assert best["gpu-3"] == nccl_figures(SLOW)[GIB]
    assert set(outliers(nodes)) == {"gpu-3"}  # on several sizes
