"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it: one
active controller among its replicas.

- A Lease held by another is taken only once it has not changed for `lease_duration` *as this
  process saw it* (the local clock measures the time since the record last changed; clocks of
  different machines are never compared).
- Every write is a PUT with the resourceVersion read: of two that try at once, one gets 409.
- A leader that cannot renew within `renew_deadline` stops acting before its Lease can expire
  for the others (renew_deadline < lease_duration).
- The Lease also carries the starts of the last hour's remediations: written by the leader with
  the same precondition, it is a fence (a process that lost the Lease cannot start one) and it
  outlives a restart, or a replaced node.
On a clean stop the leader gives the Lease up (empty holder), so a successor need not wait.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from agent.kube.client import KubeClient, KubeError

log = structlog.get_logger("agent.controller.lease")

STARTS_ANNOTATION = "node-health-agent.io/remediation-starts"
HOUR = 3600.0


def microtime(ts: float) -> str:
    """A MicroTime, as the API server wants it in a Lease."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """`try_acquire_or_renew()` each retry period; `leader` says whether this one may act."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.namespace, self.name, self.identity = client, namespace, name, identity
        self.duration, self.deadline = lease_duration, renew_deadline
        self.clock, self.wall = clock, wall
        self._lock = threading.Lock()
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # when this one last wrote the Lease as holder
        self._lease: dict | None = None
        self.error: str | None = None  # why the last try could not read or write the Lease

    @property
    def leader(self) -> bool:
        at = self._renewed_at
        return at is not None and self.clock() - at < self.deadline

    def try_acquire_or_renew(self) -> bool:
        """One try; True when this process holds the Lease now."""
        with self._lock:
            try:
                leading = self._try()
            except KubeError as exc:
                # Said once per kind of failure: a replica that cannot reach its Lease (the API
                # server away, a 403) must not look like a quiet standby.
                if str(exc) != self.error:
                    log.error(
                        "lease_unavailable",
                        lease=f"{self.namespace}/{self.name}",
                        error=str(exc),
                        leader=self.leader,
                    )
                self.error = str(exc)
                return self.leader
            if self.error is not None:
                log.info("lease_available", lease=f"{self.namespace}/{self.name}")
            self.error = None
            return leading

    def _try(self) -> bool:
        now, wall = self.clock(), self.wall()
        try:
            lease = self.client.get_lease(self.namespace, self.name)
        except KubeError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec_times(microtime(wall), wall, 0),
            }
            self._lease = self.client.create_lease(self.namespace, body)
            self._won(now)
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime")))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        mine = holder == self.identity
        if holder and not mine and now - self._observed_at < self.duration:
            self._renewed_at = None
            self._lease = lease
            return False
        acquired = spec.get("acquireTime") if mine and spec.get("acquireTime") else microtime(wall)
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = {**spec, **self._spec_times(acquired, wall, transitions)}
        try:
            self._lease = self.client.replace_lease(self.namespace, self.name, lease)
        except KubeError as exc:
            if exc.status == 409:  # another wrote first: look again next time
                if not mine:
                    self._renewed_at = None
                return self.leader
            raise
        if not mine:
            log.info("lease_acquired", identity=self.identity, previous=holder or None)
        self._won(now)
        return True

    def _won(self, now: float) -> None:
        self._renewed_at = now
        spec = (self._lease or {}).get("spec") or {}
        self._observed, self._observed_at = (self.identity, str(spec.get("renewTime"))), now

    def _spec_times(self, acquire: str, renew: float, transitions: int) -> dict:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": acquire,
            "renewTime": microtime(renew),
            "leaseTransitions": transitions,
        }

    # -- the hour's starts, fenced by the Lease -------------------------------------------

    def starts(self) -> list[float]:
        """When the remediations of the last hour started (wall clock), from the Lease."""
        with self._lock:
            return _starts(self._lease, self.wall())

    def record_start(self, at: float, instead_of: float | None = None) -> bool:
        """Write one more start to the Lease (in place of the start `instead_of`, one that
        came to nothing); False when this process is not the leader (the write failed or was
        fenced off), and then it must not start one."""
        with self._lock:
            if not self.leader or self._lease is None:
                return False
            lease = json.loads(json.dumps(self._lease))
            meta = lease.setdefault("metadata", {})
            starts = [t for t in _starts(lease, at) if t != instead_of] + [at]
            meta.setdefault("annotations", {})[STARTS_ANNOTATION] = json.dumps(
                [round(t, 3) for t in starts]
            )
            lease["spec"]["renewTime"] = microtime(self.wall())
            try:
                self._lease = self.client.replace_lease(self.namespace, self.name, lease)
            except KubeError as exc:
                log.warning("lease_write_failed", error=str(exc))
                if exc.status == 409:
                    self._renewed_at = None
                return False
            self._won(self.clock())
            return True

    def release(self) -> None:
        """Give the Lease up on a clean stop: holder empty, so a successor takes it at once."""
        with self._lock:
            if not self.leader or self._lease is None:
                return
            lease = json.loads(json.dumps(self._lease))
            lease["spec"] = {
                **lease.get("spec", {}),
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": microtime(self.wall()),
            }
            try:
                self.client.replace_lease(self.namespace, self.name, lease)
            except KubeError as exc:
                log.warning("lease_release_failed", error=str(exc))
            self._renewed_at = None


def _starts(lease: dict | None, now: float) -> list[float]:
    text = (((lease or {}).get("metadata") or {}).get("annotations") or {}).get(STARTS_ANNOTATION)
    try:
        values = [float(t) for t in json.loads(text or "[]")]
    except (TypeError, ValueError):
        return []
    return [t for t in values if now - t < HOUR]
