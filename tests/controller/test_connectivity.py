"""The multi-node connectivity check: the pair planner's bisection, the MPIJob it submits, and
whole runs against the fake API server, where a stand-in for the MPI Operator finishes each
MPIJob with a real `all_reduce_perf` output (tests/fixtures/nccl/SOURCES.md): the p5 two-node
run for a healthy pair (313 GB/s at 1 GiB), the p4de one (77 GB/s, under p5's 250) for a
pair with a bad node, and an NCCL init failure for a test that could not run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.controller.connectivity import (
    Connectivity,
    ConnectivityError,
    mpijob,
)
from agent.controller.pairs import Planner, Verdict
from agent.kube.client import KubeClient
from agent.models import ConnectivitySettings, NodeKeys
from tests.conftest import REPO
from tests.kube.fake_api import FakeKubeAPI
from tests.kube.fake_workloads import finish_mpijob

FIX = Path(__file__).parent.parent / "fixtures" / "nccl"
GOOD = (FIX / "p5-2node-mpirun.txt").read_text()
SLOW = (FIX / "p4de-2node-srun.txt").read_text()
BROKEN = (FIX / "init-failure.txt").read_text()
KEYS = NodeKeys()
NS = "node-health"


def simulate(nodes: list[str], bad: set[str], limit: int = 4) -> tuple[dict, int]:
    planner, rounds = Planner(nodes), 0
    while pairs := planner.next_pairs(limit):
        rounds += 1
        for pair in pairs:
            planner.record(pair, not (set(pair) & bad))
    return planner.verdicts(), rounds


def test_planner_finds_the_bad_node_of_a_failed_pair() -> None:
    verdicts, rounds = simulate([f"n{i}" for i in range(8)], {"n3"})
    assert [n for n, v in verdicts.items() if v is Verdict.FAILED] == ["n3"]
    assert all(v is Verdict.PASSED for n, v in verdicts.items() if n != "n3")
    assert rounds == 2  # the pairs, then n2 and n3 each against a node known good


def test_planner_odd_one_out_and_two_bad_in_one_pair() -> None:
    verdicts, _ = simulate([f"n{i}" for i in range(7)], {"n0", "n1", "n6"})
    assert {n for n, v in verdicts.items() if v is Verdict.FAILED} == {"n0", "n1", "n6"}
    assert sum(v is Verdict.PASSED for v in verdicts.values()) == 4


def test_planner_never_fails_a_node_without_a_known_good_one() -> None:
    verdicts, _ = simulate(["a", "b"], {"a"})
    assert verdicts == {"a": Verdict.UNKNOWN, "b": Verdict.UNKNOWN}
    verdicts, _ = simulate(["a", "b", "c", "d"], {"a", "b", "c", "d"})
    assert set(verdicts.values()) == {Verdict.UNKNOWN}


def test_planner_a_test_that_could_not_run_decides_nothing() -> None:
    planner = Planner(["a", "b", "c", "d"])
    first = planner.next_pairs(4)
    assert first == [("a", "b"), ("c", "d")]
    planner.record(("a", "b"), None)
    planner.record(("c", "d"), True)
    assert planner.next_pairs(4) == []
    assert planner.verdicts() == {
        "a": Verdict.UNKNOWN,
        "b": Verdict.UNKNOWN,
        "c": Verdict.PASSED,
        "d": Verdict.PASSED,
    }


def test_planner_keeps_to_the_limit_and_never_puts_a_node_in_two_tests() -> None:
    planner = Planner([f"n{i:02}" for i in range(20)])
    pairs = planner.next_pairs(3)
    assert len(pairs) == 3
    assert len({n for p in pairs for n in p}) == 6


def test_the_mpijob_pins_one_worker_to_each_node_of_the_pair() -> None:
    cfg = ConnectivitySettings()
    job = mpijob("nh-conn-1-0", ("gpu-a", "gpu-b"), cfg, 8, 32, 1 << 30, KEYS)
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["kind"] == "MPIJob"
    specs = job["spec"]["mpiReplicaSpecs"]
    assert specs["Worker"]["replicas"] == 2 and job["spec"]["slotsPerWorker"] == 8
    worker = specs["Worker"]["template"]["spec"]
    [term] = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"][0]["values"] == ["gpu-a", "gpu-b"]
    anti = worker["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 32}
    command = specs["Launcher"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("-np") + 1] == "16" and command[command.index("-e") + 1] == str(
        1 << 30
    )
    assert {"key": KEYS.taint_key, "operator": "Exists", "effect": "NoSchedule"} in worker[
        "tolerations"
    ]


class Operator:
    """Finishes each MPIJob as the MPI Operator and the launcher would: the output depends on
    whether a bad node is in the pair."""

    def __init__(self, api: FakeKubeAPI, bad: set[str], broken: set[str] = frozenset()) -> None:
        self.api, self.bad, self.broken = api, bad, broken
        self.seen: list[tuple[str, ...]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Operator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        done: set[tuple[str, str]] = set()
        while not self.stop.is_set():
            with self.api.lock:
                jobs = {k: v for k, v in self.api.state.mpijobs.items() if k not in done}
            for key, job in jobs.items():
                worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
                aff = worker["affinity"]["nodeAffinity"]
                terms = aff["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                pair = tuple(terms[0]["matchExpressions"][0]["values"])
                self.seen.append(pair)
                if set(pair) & self.broken:
                    finish_mpijob(self.api, key[0], key[1], False, BROKEN)
                else:
                    log = SLOW if set(pair) & self.bad else GOOD
                    finish_mpijob(self.api, key[0], key[1], True, log)
                done.add(key)
            self.stop.wait(0.01)


def fleet(api: FakeKubeAPI, n: int, itype: str = "p5.48xlarge", prefix: str = "gpu") -> list[str]:
    names = [f"{prefix}-{i}" for i in range(n)]
    for name in names:
        api.add_node(
            name,
            {"node.kubernetes.io/instance-type": itype, KEYS.health_status_label: "Schedulable"},
        )
    return names


def connectivity(kcfg: Path, events: list, **cfg: object) -> Connectivity:
    settings = ConnectivitySettings(poll=0.01, **cfg)
    return Connectivity(KubeClient(str(kcfg)), settings, KEYS, events.append)


def test_a_run_finds_and_labels_the_faulty_node(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 6)
    events: list[dict] = []
    with Operator(api, bad={"gpu-3"}) as op:
        verdicts = connectivity(kcfg, events, max_share=1.0).check(names)
    assert verdicts["gpu-3"] is Verdict.FAILED
    assert all(v is Verdict.PASSED for n, v in verdicts.items() if n != "gpu-3")
    assert op.seen[:3] == [("gpu-0", "gpu-1"), ("gpu-2", "gpu-3"), ("gpu-4", "gpu-5")]
    bad = api.node("gpu-3")["metadata"]
    assert bad["labels"][KEYS.deep_health_check_label] == "Failed"
    assert bad["labels"][KEYS.health_status_label] == "UnschedulablePendingReplacement"
    assert '"verdict": "Failed"' in bad["annotations"][KEYS.connectivity_result_annotation]
    good = api.node("gpu-2")["metadata"]["labels"]
    assert good[KEYS.deep_health_check_label] == "Passed"
    assert good[KEYS.health_status_label] == "Schedulable"
    failed = next(e for e in events if e.get("node") == "gpu-3")
    assert failed["level"] == "error" and "Replace the Instance" in failed["msg"]
    short = next(e for e in events if e.get("pair") == ["gpu-2", "gpu-3"])
    assert "Expected minimum threshold :250,NCCL Test output Bw: 76.86" in short["msg"]
    assert len(api.state.deleted_mpijobs) == len(op.seen)  # every MPIJob cleaned up


def test_never_more_than_the_share_of_the_fleet_at_once(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 8)
    fleet(api, 32, itype="p4d.24xlarge", prefix="p4d")  # 40 nodes: 10% is 4, two pairs
    with Operator(api, bad=set()):
        connectivity(kcfg, []).check(names)
    assert api.state.most_mpijobs == 2


def test_a_pair_that_could_not_run_leaves_its_nodes_unknown(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 4)
    events: list[dict] = []
    with Operator(api, bad=set(), broken={"gpu-0"}):
        verdicts = connectivity(kcfg, events, max_share=1.0).check(names)
    assert verdicts["gpu-0"] is Verdict.UNKNOWN and verdicts["gpu-1"] is Verdict.UNKNOWN
    assert verdicts["gpu-2"] is Verdict.PASSED
    labels = api.node("gpu-0")["metadata"]["labels"]
    assert KEYS.deep_health_check_label not in labels
    assert labels[KEYS.health_status_label] == "Schedulable"


def test_a_test_with_no_result_in_time_is_unknown(api: FakeKubeAPI, kcfg: Path) -> None:
    names = fleet(api, 2)
    verdicts = connectivity(kcfg, [], max_share=1.0, timeout=0.2).check(names)
    assert set(verdicts.values()) == {Verdict.UNKNOWN}
    assert api.state.mpijobs == {}  # deleted at the deadline


@pytest.mark.parametrize(
    ("setup", "names", "message"),
    [
        (lambda api: fleet(api, 2), ["gpu-0", "nope"], "no such nodes: nope"),
        (lambda api: fleet(api, 2), ["gpu-0"], "at least two nodes"),
        (
            lambda api: (fleet(api, 1), api.add_node("cpu", {})),
            ["gpu-0", "cpu"],
            "one instance type",
        ),
    ],
)
def test_bad_requests_are_clear_errors(api, kcfg: Path, setup, names, message) -> None:
    setup(api)
    with pytest.raises(ConnectivityError, match=message):
        connectivity(kcfg, []).check(names)


def run_cli(kcfg: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("controller: {connectivity: {poll: 0.05}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_HEALTH_")}
    env.update(PYTHONPATH=str(REPO), NODE_HEALTH_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run(
        [sys.executable, "-m", "agent", "deep-check", "--connectivity", "--config", str(cfg),
         "--kubeconfig", str(kcfg), *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_cli_finds_the_bad_node_and_exits_1(api, kcfg: Path, tmp_path: Path) -> None:
    fleet(api, 4)
    fleet(api, 36, itype="p4d.24xlarge", prefix="p4d")
    with Operator(api, bad={"gpu-1"}):
        out = run_cli(kcfg, tmp_path, "--nodes", "gpu-0,gpu-1,gpu-2,gpu-3", "--json")
    assert out.returncode == 1, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(list(e)[:3] == ["level", "ts", "msg"] for e in events)
    verdicts = {e["node"]: e["verdict"] for e in events if "verdict" in e}
    assert verdicts == {"gpu-0": "Passed", "gpu-1": "Failed", "gpu-2": "Passed", "gpu-3": "Passed"}
    assert api.node("gpu-1")["metadata"]["labels"][KEYS.deep_health_check_label] == "Failed"


def test_the_cli_dry_run_labels_nothing_and_bad_nodes_exit_2(api, kcfg: Path, tmp_path) -> None:
    fleet(api, 2)
    with Operator(api, bad=set()):
        out = run_cli(kcfg, tmp_path, "--nodes", "gpu-0,gpu-1", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "gpu-0 + gpu-1: passed" in out.stdout
    assert KEYS.deep_health_check_label not in api.node("gpu-0")["metadata"]["labels"]
    out = run_cli(kcfg, tmp_path, "--nodes", "gpu-0,gpu-9")
    assert out.returncode == 2 and "no such nodes: gpu-9" in out.stderr


SCHEMA = json.loads((FIX.parent / "mpi-operator" / "mpijob-v2beta1.schema.json").read_text())
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def pruned(doc: object, schema: dict, path: str = "") -> list[str]:
    """The fields the API server would drop from `doc`: those a structural schema names not."""
    if not isinstance(doc, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    out = []
    for key, value in doc.items():
        if props is not None and key in props:
            out += pruned(value, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            out += pruned(value, extra, f"{path}.{key}")
        elif props is not None:
            out.append(f"{path}.{key}")
    return out


def test_each_mpijob_is_one_the_api_server_keeps_whole_and_the_operator_accepts(
    api: FakeKubeAPI, kcfg: Path
) -> None:
    import jsonschema
    import kubernetes_validate

    from tests.test_deploy import K8S_VERSION

    names = fleet(api, 5)
    with Operator(api, bad={"gpu-4"}):
        connectivity(kcfg, [], max_share=1.0).check(names)
    path = f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs"
    jobs = [r.body for r in api.requests("POST", path)]
    assert len(jobs) >= 3
    for job in jobs:  # as sent
        jsonschema.validate(job, SCHEMA)  # types, enums, required
        assert pruned(job, SCHEMA) == []
        spec = job["spec"]
        assert spec["runPolicy"]["cleanPodPolicy"] in ("None", "Running", "All")
        replicas = spec["mpiReplicaSpecs"]
        assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
        last = f"{job['metadata']['name']}-worker-{replicas['Worker']['replicas'] - 1}"
        assert DNS_1035.match(last) and len(last) <= 63
        for replica in replicas.values():
            assert replica["restartPolicy"] in ("Never", "OnFailure")
            template = replica["template"]
            assert "restartPolicy" not in template["spec"]  # the operator would override it
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                | {"template": template},
                K8S_VERSION,
                strict=True,
            )
