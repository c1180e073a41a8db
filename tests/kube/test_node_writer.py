"""The node writer against the fake API server, through the real `kubernetes` client: each
transition and its exact patches, other writers' data kept, manual overrides, the remediation
switch, stale conditions, outages, the breaker, the watch and deep-check requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.kube.client import KubeClient
from agent.kube.writer import KubeNodeWriter
from agent.models import KubernetesSettings, NodeKeys
from agent.nodestate import NodeState, relabel
from tests.kube.fake_api import FakeKubeAPI

KEYS = NodeKeys()
HEALTH = KEYS.health_status_label
OWNED = KEYS.owned_annotation
NODE = r"/api/v1/nodes/node-a"
GPU_DOWN = {
    "type": "NvidiaGPUUnhealthy",
    "status": "True",
    "reason": "XidHardwareFailure",
    "message": "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.",
    "lastTransitionTime": "2026-11-23T10:00:00Z",
}


def state(health: str, *conditions: dict[str, str], **labels: str) -> NodeState:
    base = NodeState(labels=dict(labels), conditions=list(conditions))
    return relabel(base, KEYS, health=health)


def run(
    kcfg: Path,
    steps: Callable[[KubeNodeWriter], Any],
    cfg: KubernetesSettings | None = None,
    timeout: float = 5,
    **callbacks: Any,
) -> KubeNodeWriter:
    async def main() -> KubeNodeWriter:
        client = KubeClient(str(kcfg), timeout=timeout)
        async with KubeNodeWriter(
            client, "node-a", KEYS, cfg or KubernetesSettings(), **callbacks
        ) as w:
            await steps(w)
        return w

    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def labels(api: FakeKubeAPI) -> dict[str, str]:
    return api.node("node-a")["metadata"]["labels"]


def condition(api: FakeKubeAPI, ctype: str) -> dict[str, str] | None:
    return next((c for c in api.node("node-a")["status"]["conditions"] if c["type"] == ctype), None)


def test_out_and_back_with_exact_patches_and_nothing_written_twice(api, kcfg):
    bad = state("UnschedulablePendingReboot", GPU_DOWN)
    bad.labels[KEYS.fault_types_label] = "NvidiaGPUUnhealthy"

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(bad)
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)

    run(kcfg, steps)
    [status] = api.requests("PATCH", NODE + "/status")
    assert status.content_type == "application/strategic-merge-patch+json"
    [sent] = status.body["status"]["conditions"]
    assert {k: sent[k] for k in GPU_DOWN} == GPU_DOWN and "lastHeartbeatTime" in sent
    [meta] = api.requests("PATCH", NODE)
    assert meta.content_type == "application/merge-patch+json"
    assert meta.body["metadata"]["labels"] == {
        HEALTH: "UnschedulablePendingReboot",
        KEYS.fault_types_label: "NvidiaGPUUnhealthy",
    }
    assert meta.body["spec"]["taints"] == [
        {"key": HEALTH, "value": "UnschedulablePendingReboot", "effect": "NoSchedule"}
    ]
    assert meta.body["metadata"]["resourceVersion"]  # the taint list is replaced whole
    node = api.node("node-a")
    assert node["status"]["conditions"][0]["type"] == "Ready"  # kubelet's condition kept
    assert json.loads(node["metadata"]["annotations"][OWNED])["health"] == (
        "UnschedulablePendingReboot"
    )

    recovered = {**GPU_DOWN, "status": "False", "message": "cleared after 3 clean polls"}

    async def back(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable", recovered))
        await until(lambda: labels(api).get(HEALTH) == "Schedulable")
        await until(lambda: condition(api, "NvidiaGPUUnhealthy")["status"] == "False")
        await w.apply(state("Schedulable", recovered))  # the same again: no write
        await asyncio.sleep(0.3)

    before = len(api.requests("PATCH"))
    run(kcfg, back)
    patches = api.requests("PATCH")[before:]
    assert len(patches) == 2
    meta = next(p for p in patches if p.path == NODE)
    assert meta.body["metadata"]["labels"] == {
        HEALTH: "Schedulable",
        KEYS.fault_types_label: None,  # ours, no longer wanted: removed
    }
    assert meta.body["spec"]["taints"] == []
    assert api.node("node-a")["spec"]["taints"] == []
    assert KEYS.fault_types_label not in labels(api)


def test_another_writers_taint_and_labels_survive_a_conflict(api, kcfg):
    """Another controller adds its taint after the agent read the node: the agent's patch
    gets 409, it reads the node again, and both taints are there in the end."""
    other = {"key": "nvidia.com/gpu-driver-upgrade", "value": "true", "effect": "NoSchedule"}

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable"))
        await until(lambda: OWNED in api.node("node-a")["metadata"]["annotations"])
        stale = api.node("node-a")

        def add(node: dict) -> None:
            node["spec"]["taints"] = [other]
            node["metadata"]["labels"]["team"] = "ml"

        api.edit("node-a", add)
        w.node = stale  # as if the watch had not delivered the change yet
        w._stop.set()  # and will not
        w.client.stop_watch()
        await w.apply(state("UnschedulablePendingReplacement"))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReplacement")

    run(kcfg, steps)
    node = api.node("node-a")
    assert {t["key"] for t in node["spec"]["taints"]} == {other["key"], HEALTH}
    assert node["metadata"]["labels"]["team"] == "ml"
    gets = [r for r in api.requests() if r.method == "GET" and r.path == NODE]
    assert len(gets) >= 2  # the re-read after the 409


@pytest.mark.parametrize(
    "by_hand", ["UnschedulablePendingReplacement", "UnschedulablePendingReplace"]
)
def test_a_pending_label_set_by_hand_is_never_reverted(api, kcfg, by_hand):
    def operator(node: dict) -> None:
        node["metadata"]["labels"][HEALTH] = by_hand
        node["spec"]["taints"] = [{"key": HEALTH, "value": by_hand, "effect": "NoSchedule"}]

    api.edit("node-a", operator)

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable", {**GPU_DOWN, "status": "False"}))
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)
        await asyncio.sleep(0.3)

    run(kcfg, steps)
    node = api.node("node-a")
    assert node["metadata"]["labels"][HEALTH] == by_hand
    assert node["spec"]["taints"][0]["value"] == by_hand


def test_remediation_off_reports_but_never_takes_the_node_out(api, kcfg):
    api.edit(
        "node-a",
        lambda n: n["metadata"]["annotations"].update({KEYS.remediation_annotation: "off"}),
    )

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot", GPU_DOWN))
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)
        await asyncio.sleep(0.3)

    run(kcfg, steps)
    node = api.node("node-a")
    assert HEALTH not in node["metadata"]["labels"]
    assert not node["spec"].get("taints")


def test_conditions_the_agent_no_longer_reports_are_removed(api, kcfg):
    renamed = {**GPU_DOWN, "type": "NvidiaGPUFailure"}

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable", GPU_DOWN))
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)
        await until(
            lambda: (
                "NvidiaGPUUnhealthy" in api.node("node-a")["metadata"]["annotations"].get(OWNED, "")
            )
        )
        await w.apply(state("Schedulable", renamed))
        await until(lambda: condition(api, "NvidiaGPUFailure") is not None)

    run(kcfg, steps)
    assert condition(api, "NvidiaGPUUnhealthy") is None
    assert condition(api, "Ready") is not None
    last = api.requests("PATCH", NODE + "/status")[-1].body["status"]["conditions"]
    assert {"type": "NvidiaGPUUnhealthy", "$patch": "delete"} in last


@pytest.mark.parametrize(
    ("status", "retry_after"), [(500, None), (503, None), (429, 1), (403, None)]
)
def test_api_errors_are_retried_and_the_latest_state_lands(api, kcfg, status, retry_after):
    api.fail("PATCH", NODE, status, times=2, retry_after=retry_after)

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot"))
        await asyncio.sleep(0.1)
        await w.apply(state("UnschedulablePendingReplacement"))  # changed while failing
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReplacement")

    started = time.monotonic()
    run(kcfg, steps)
    if retry_after:
        assert time.monotonic() - started >= retry_after  # Retry-After was honoured
    assert len(api.requests("PATCH", NODE)) >= 3


def test_unreachable_api_server_then_catch_up(api, kcfg, tmp_path):
    """The API server is gone (connection refused): the agent keeps going, and when a server
    answers again at that address the wanted state lands."""
    dead = tmp_path / "dead-kubeconfig"
    from tests.kube.conftest import kubeconfig

    kubeconfig(dead, "http://127.0.0.1:9")  # nothing listens on the discard port

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot"))
        await asyncio.sleep(1.0)
        assert not w.connected and w.writes == 0
        w.client = KubeClient(str(kcfg), timeout=5)  # the server is back
        w.breaker.client = w.client
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot", 40)

    run(dead, steps)


def test_the_breaker_refuses_beyond_its_limit_and_says_so(api, kcfg):
    for name, value in [
        ("n1", "Schedulable"),
        ("n2", "UnschedulablePendingReboot"),
        ("n3", "Unschedulable"),
    ]:
        api.add_node(name, {HEALTH: value})
    api.add_node("not-ours")  # no health label: not one of the agent's nodes
    refusals: list[str] = []

    async def refused(why: str) -> None:
        refusals.append(why)

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable"))
        await until(lambda: labels(api).get(HEALTH) == "Schedulable")
        await w.apply(state("UnschedulablePendingReboot", GPU_DOWN))
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)
        await until(lambda: bool(refusals))

    run(kcfg, steps, KubernetesSettings(max_unschedulable=2), on_refused=refused)
    assert labels(api)[HEALTH] == "Schedulable"  # not taken out; the condition still says why
    assert refusals == ["circuit breaker: 2 nodes are unschedulable already (at most 2)"]
    lists = [r for r in api.requests("GET", r"/api/v1/nodes") if "watch" not in r.query]
    assert lists and all(
        r.query == {"labelSelector": HEALTH, "resourceVersion": "0"} for r in lists
    )  # the agent's nodes only, from the API server's cache


def test_the_breaker_by_percentage_lets_the_first_nodes_out(api, kcfg):
    for i in range(9):
        api.add_node(f"n{i}", {HEALTH: "Schedulable"})

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable"))
        await until(lambda: labels(api).get(HEALTH) == "Schedulable")
        await w.apply(state("UnschedulablePendingReboot"))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")

    run(kcfg, steps, KubernetesSettings(max_unschedulable_percent=10))  # 1 of 10 nodes


def test_a_taint_someone_removed_comes_back_through_the_watch(api, kcfg):
    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot"))
        await until(lambda: bool(api.node("node-a")["spec"].get("taints")))
        api.edit("node-a", lambda n: n["spec"].update(taints=[]))
        await until(lambda: bool(api.node("node-a")["spec"].get("taints")))

    run(kcfg, steps)


def test_a_deep_check_asked_for_on_the_node_is_handed_over_once_and_cleared(api, kcfg):
    asked: list[str] = []

    async def request(value: str) -> None:
        asked.append(value)

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("Schedulable"))
        await until(lambda: labels(api).get(HEALTH) == "Schedulable")
        api.edit(
            "node-a",
            lambda n: n["metadata"]["annotations"].update(
                {KEYS.deep_check_request_annotation: "run"}
            ),
        )
        await until(lambda: asked == ["run"])
        await until(
            lambda: (
                KEYS.deep_check_request_annotation
                not in api.node("node-a")["metadata"]["annotations"]
            )
        )
        await asyncio.sleep(0.3)

    run(kcfg, steps, on_request=request)
    assert asked == ["run"]


def test_a_slow_api_server_times_out_and_the_write_is_retried(api, kcfg):
    api.fail("PATCH", NODE, 0, delay=1.5)  # answers, but after the client gave up

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot"))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")

    run(kcfg, steps, timeout=0.5)
    assert len(api.requests("PATCH", NODE)) >= 2


@pytest.mark.parametrize("status", [403, 422])
def test_conditions_refused_for_good_never_hold_the_node_decision(api, kcfg, status):
    """nodes/status refuses every write: the health label and taint land all the same, the
    failure is counted as a condition's, and the conditions are tried again on their own."""
    api.fail("PATCH", NODE + "/status", status, times=10_000)
    errors: list[str] = []

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReplacement", GPU_DOWN))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReplacement")
        await until(lambda: len(api.requests("PATCH", NODE + "/status")) >= 2)

    run(kcfg, steps, on_error=errors.append)
    node = api.node("node-a")
    assert node["spec"]["taints"] == [
        {"key": HEALTH, "value": "UnschedulablePendingReplacement", "effect": "NoSchedule"}
    ]
    assert condition(api, "NvidiaGPUUnhealthy") is None
    assert set(errors) == {"condition"}


def test_failing_conditions_do_not_delay_the_label(api, kcfg):
    """500s on nodes/status: the label is written before the conditions get through."""
    api.fail("PATCH", NODE + "/status", 500, times=3)

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot", GPU_DOWN))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None, 20)

    run(kcfg, steps)
    [meta] = [r for r in api.requests("PATCH", NODE) if "labels" in r.body.get("metadata", {})]
    statuses = api.requests("PATCH", NODE + "/status")
    first_ok = next(r for r in statuses if r.code == 200)
    assert meta.code == 200 and meta.done < first_ok.at
    assert [r.code for r in statuses].count(500) == 3


def test_a_failing_label_write_does_not_hold_the_conditions(api, kcfg):
    api.fail("PATCH", NODE, 422, times=10_000)
    errors: list[str] = []

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot", GPU_DOWN))
        await until(lambda: condition(api, "NvidiaGPUUnhealthy") is not None)
        await until(lambda: w.failing_for() is not None)

    w = run(kcfg, steps, on_error=errors.append)
    assert HEALTH not in labels(api)
    assert {"label", "taint"} <= set(errors)
    since, why = w.failing_for()
    assert since >= 0 and "422" in why


def test_the_agents_own_fault_taints_a_node_labelled_pending_by_hand(api, kcfg):
    """The operator set Pending* by hand (no taint); then the agent finds its own fault: the
    label stays the operator's, and the NoSchedule taint keeps pods off."""
    by_hand = "UnschedulablePendingReboot"
    api.edit("node-a", lambda n: n["metadata"]["labels"].update({HEALTH: by_hand}))

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReplacement", GPU_DOWN))
        await until(lambda: bool(api.node("node-a")["spec"].get("taints")))

    run(kcfg, steps)
    node = api.node("node-a")
    assert node["metadata"]["labels"][HEALTH] == by_hand
    assert node["spec"]["taints"] == [{"key": HEALTH, "value": by_hand, "effect": "NoSchedule"}]


@pytest.mark.parametrize(
    "body",
    [{}, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}],
    ids=["empty", "status"],
)
def test_a_malformed_node_answer_never_stops_the_watch(api, kcfg, body):
    """A `{}` or a `Status` where the Node should be: the watch carries on, so a label
    removed by hand afterwards still comes back."""

    async def steps(w: KubeNodeWriter) -> None:
        await w.apply(state("UnschedulablePendingReboot"))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")
        api.fail("GET", NODE, 0, times=1, body=body)
        w.client.stop_watch()  # the watch reconnects: its next GET gets the malformed answer
        await until(lambda: not any(r.code is None for r in api.requests("GET", NODE)))
        await until(lambda: len(api.requests("GET", NODE)) >= 3)
        api.edit("node-a", lambda n: n["metadata"]["labels"].pop(HEALTH))
        await until(lambda: labels(api).get(HEALTH) == "UnschedulablePendingReboot")
        assert w.loops.problems() == []

    run(kcfg, steps)


def test_a_decision_asked_for_just_before_the_stop_lands_whole(api, kcfg):
    """A fault, then at once a SIGTERM: closing the writer makes its last pass, so the label,
    the taint and the condition are on the Node (not the label alone, or nothing)."""
    bad = state("UnschedulablePendingReboot", GPU_DOWN)

    async def steps(w: KubeNodeWriter) -> None:
        await until(lambda: w.node is not None)  # the first pass (nothing to write) is done
        await w.apply(bad)  # and the writer closes at once

    run(kcfg, steps)
    assert labels(api).get(HEALTH) == "UnschedulablePendingReboot"
    assert api.node("node-a")["spec"]["taints"][0]["value"] == "UnschedulablePendingReboot"
    assert condition(api, "NvidiaGPUUnhealthy")["status"] == "True"
