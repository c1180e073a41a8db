"""Kubernetes Events for the agent's events: each transition and each temporary problem shows
in `kubectl describe node` and `kubectl get events`, as kubelet's and NPD's do.

A sink like the others, but it never holds the daemon up: `emit` queues (bounded; the oldest
goes first when full, counted), a task posts. The same reason and message again within
`REPEAT_WINDOW` raises the first event's count (a patch), as the API's own event series do.
Each event's name is fixed when it is queued (`<node>.<hex ns>`, as kubelet's), so a POST that
timed out and is tried again cannot make a second Event: a 409 AlreadyExists means it landed.
The events are also in the spool and CloudWatch: one that cannot be posted is not lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Self

import structlog

from agent.backoff import Backoff
from agent.events import Event, rfc3339
from agent.kube.client import KubeClient, KubeError
from agent.supervise import Heart, Supervisor
from agent.threads import in_daemon_thread

log = structlog.get_logger("agent.kube.events")

QUEUE = 256
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
REPEAT_WINDOW = 600.0
CLOSE_WAIT = 5.0  # seconds a stop waits for the queue to be posted
COMPONENT = "node-health-agent"


def k8s_event(
    event: Event,
    node: str,
    uid: str | None,
    namespace: str,
    now: float,
    component: str = COMPONENT,
    instance: str | None = None,
    *,
    name: str,
) -> dict:
    """The core/v1 Event for one of our events, on `node`, reported by `component` from
    `instance` (the node itself for its agent), named `name`."""
    details = event.get("details: ") or {}
    reason = event.get("reason") or details.get("reason") or event.get("verdict") or "NodeHealth"
    kind = "Warning" if event.get("level") in ("warn", "error") else "Normal"
    involved = {"apiVersion": "v1", "kind": "Node", "name": node}
    if uid:
        involved["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": involved,
        "reason": str(reason)[:128],
        "message": str(event.get("msg", ""))[:1024],
        "type": kind,
        "source": {"component": component, "host": node},
        "reportingComponent": component,
        "reportingInstance": instance or node,
        "firstTimestamp": rfc3339(now),
        "lastTimestamp": rfc3339(now),
        "count": 1,
    }


class KubeEventSink:
    name = "kubernetes-events"

    def __init__(
        self,
        client: KubeClient,
        node: str | None,
        namespace: str = "default",
        uid: Callable[[], str | None] = lambda: None,
        component: str = COMPONENT,
        instance: str | None = None,
        loops: Supervisor | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """Events go on `node`; with None (the controller, reporting as `instance`) on the
        node an event names (`node`, `node_uid`), and one that names none is not posted.
        `on_error("event")`: a post failed."""
        self.client, self.node, self.namespace, self.uid = client, node, namespace, uid
        self.component, self.instance = component, instance
        self.loops, self.on_error = loops or Supervisor(), on_error
        self.dropped = 0
        self.posted = 0
        self._last_ns = 0
        self._queue: collections.deque[tuple[Event, float, int]] = collections.deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._series: dict[tuple[str, str, str], tuple[str, int, float]] = {}  # -> name, count, at
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = self.loops.task(f"{self.name}-poster", self._post_loop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """A last try of at most CLOSE_WAIT seconds (the API server may be down or hang);
        what is left is in the spool and CloudWatch."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await self.flush()
        finally:  # even when the caller's own deadline cut the last try short
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            if self._queue:
                log.warning("node_events_not_posted", count=len(self._queue))

    async def emit(self, event: Event) -> None:
        if self.node is None and not event.get("node"):
            return
        if len(self._queue) >= QUEUE:
            self._queue.popleft()
            self.dropped += 1
        self._last_ns = max(time.time_ns(), self._last_ns + 1)  # unique: it names the Event
        self._queue.append((event, self._last_ns / 1e9, self._last_ns))
        self._idle.clear()
        self._ready.set()

    async def flush(self) -> None:
        await self._idle.wait()

    async def _post_loop(self, heart: Heart) -> None:
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while True:
            await self._ready.wait()
            while self._queue:
                event, at, ns = self._queue[0]
                heart.busy()
                try:
                    await in_daemon_thread(self._post, event, at, ns)
                except KubeError as exc:
                    heart.done()  # waiting out an outage is not being stuck
                    if self.on_error is not None:
                        self.on_error("event")
                    if not exc.retryable:  # refused for good (403, 422): not worth holding
                        log.warning("node_event_refused", error=str(exc))
                        self._queue.popleft()
                        continue
                    await asyncio.sleep(backoff.next(exc.retry_after))
                    continue
                self._queue.popleft()
                backoff.reset()
                heart.done()
            self._ready.clear()
            self._idle.set()

    def _post(self, event: Event, at: float, ns: int) -> None:
        node = str(self.node or event.get("node"))
        uid = self.uid() if self.node else event.get("node_uid")
        name = f"{node}.{ns:x}"
        body = k8s_event(
            event, node, uid, self.namespace, at, self.component, self.instance, name=name
        )
        key = (node, body["reason"], body["message"])
        seen = self._series.get(key)
        if seen is not None and at - seen[2] <= REPEAT_WINDOW:
            name, count, _ = seen
            patch = {"count": count + 1, "lastTimestamp": rfc3339(at)}
            try:
                self.client.patch_event(self.namespace, name, patch)
                self._series[key] = (name, count + 1, at)
                self.posted += 1
                return
            except KubeError as exc:
                if exc.status != 404:  # gone (expired): post a new one below
                    raise
        try:
            self.client.create_event(self.namespace, body)
        except KubeError as exc:
            if exc.status != 409:  # AlreadyExists: an earlier try that timed out landed
                raise
        self._series[key] = (body["metadata"]["name"], 1, at)
        self._series = {k: v for k, v in self._series.items() if at - v[2] <= REPEAT_WINDOW}
        self.posted += 1
