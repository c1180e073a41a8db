"""Leader election on a Lease served by the fake API server, with clocks the tests move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.controller.lease import STARTS_ANNOTATION, Elector
from agent.kube.client import KubeClient
from tests.kube.fake_api import FakeKubeAPI

NS, NAME = "node-health", "node-health-controller"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def elector(kcfg: Path, who: str, clock: Clock) -> Elector:
    client = KubeClient(str(kcfg))
    return Elector(client, NS, NAME, who, 15.0, 10.0, clock=clock, wall=lambda: 1.7e9 + clock.t)


def test_first_one_creates_the_lease_and_leads(api: FakeKubeAPI, kcfg: Path, clock) -> None:
    a = elector(kcfg, "a", clock)
    assert a.try_acquire_or_renew() and a.leader
    spec = api.lease(NS, NAME)["spec"]
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["renewTime"].endswith("Z") and "." in spec["renewTime"]


def test_a_second_waits_while_the_leader_renews_and_takes_over_once_it_stops(
    api: FakeKubeAPI, kcfg: Path, clock
) -> None:
    a, b = elector(kcfg, "a", clock), elector(kcfg, "b", clock)
    assert a.try_acquire_or_renew()
    for _ in range(10):  # 20 s of a renewing every 2 s: b never leads
        clock.t += 2
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew() and not b.leader
    clock.t += 14  # a stopped renewing: not yet 15 s since b saw the record change
    assert not b.try_acquire_or_renew()
    assert not a.leader  # a cannot have renewed for 14 s > renew deadline: it stops acting
    clock.t += 2
    assert b.try_acquire_or_renew() and b.leader
    lease = api.lease(NS, NAME)["spec"]
    assert lease["holderIdentity"] == "b" and lease["leaseTransitions"] == 1


def test_two_racing_for_a_free_lease_one_wins_by_the_resource_version(
    api: FakeKubeAPI, kcfg: Path, clock
) -> None:
    a, b = elector(kcfg, "a", clock), elector(kcfg, "b", clock)
    assert a.try_acquire_or_renew()
    a.release()
    # both read the released Lease; a writes first, b's PUT carries the old version: 409
    lease = api.lease(NS, NAME)
    b.client.get_lease = lambda ns, name, stale=lease: json.loads(json.dumps(stale))
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and not b.leader
    assert api.lease(NS, NAME)["spec"]["holderIdentity"] == "a"
    assert any(r.code == 409 for r in api.requests("PUT"))


def test_a_released_lease_is_taken_at_once(api: FakeKubeAPI, kcfg: Path, clock) -> None:
    a, b = elector(kcfg, "a", clock), elector(kcfg, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.leader
    assert b.try_acquire_or_renew()


def test_a_leader_that_cannot_reach_the_api_stops_leading_after_the_renew_deadline(
    api: FakeKubeAPI, kcfg: Path, clock
) -> None:
    a = elector(kcfg, "a", clock)
    assert a.try_acquire_or_renew()
    api.fail("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{NAME}", 500, times=99)
    clock.t += 8
    assert a.try_acquire_or_renew()  # 8 s without renewing: still within the deadline
    clock.t += 3
    assert not a.try_acquire_or_renew() and not a.leader


def test_remediation_starts_are_kept_on_the_lease_for_an_hour_and_fenced(
    api: FakeKubeAPI, kcfg: Path, clock
) -> None:
    a = elector(kcfg, "a", clock)
    assert a.try_acquire_or_renew()
    now = 1.7e9 + clock.t
    assert a.record_start(now - 4000)  # older than an hour: dropped by the next write
    assert a.record_start(now)
    assert a.starts() == [now]
    assert json.loads(api.lease(NS, NAME)["metadata"]["annotations"][STARTS_ANNOTATION]) == [now]
    assert a.record_start(now + 1, instead_of=now)  # a start that came to nothing, taken again
    assert a.starts() == [now + 1]
    # a successor reads them back
    a.release()
    b = elector(kcfg, "b", clock)
    assert b.try_acquire_or_renew() and b.starts() == [now + 1]
    # a, no longer leader, cannot record one (and so must not start one)
    assert not a.record_start(now + 1)
    # nor can b once someone else wrote the Lease under it
    api.state.leases[(NS, NAME)]["metadata"]["resourceVersion"] = "1"
    assert not b.record_start(now + 2)
    assert not b.leader
