"""The node writer in a cluster: keeps the state the agent wants and makes its own Node match.

Level-triggered: it reconciles when the wanted state changes, on start, after the API server
comes back, and when the Node changes (a watch on this one node). It writes only what differs
(agent/kube/plan.py). A write that fails is retried with jittered exponential backoff, honouring
Retry-After; meanwhile the agent keeps detecting, and the last wanted state is what lands. A
409 (another writer changed the node) re-reads and plans again.

Before taking the node out it asks the breaker: one LIST of the agent's nodes, from the API
server's cache, at that moment only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent.events import rfc3339
from agent.kube.client import MERGE, STRATEGIC, KubeClient, KubeError
from agent.kube.plan import plan
from agent.models import KubernetesSettings, NodeKeys
from agent.nodestate import NodeState
from agent.policy import Verdict
from agent.threads import in_daemon_thread

log = structlog.get_logger("agent.kube")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
WATCH_SECONDS = 300
CONFLICT_TRIES = 6  # the conditions, the breaker's look, and conflicts


class Breaker:
    """Refuses to take a node out when too many are out already (absolute, percentage)."""

    def __init__(self, client: KubeClient, keys: NodeKeys, cfg: KubernetesSettings) -> None:
        self.client, self.keys, self.cfg = client, keys, cfg

    @property
    def enabled(self) -> bool:
        return (
            self.cfg.max_unschedulable is not None or self.cfg.max_unschedulable_percent is not None
        )

    def refuses(self, me: str) -> str | None:
        """Why taking `me` out now is refused; None: go ahead."""
        if not self.enabled:
            return None
        nodes = self.client.list_nodes(self.keys.health_status_label)
        total = len({n["metadata"]["name"] for n in nodes} | {me})
        out = {
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("labels", {}).get(self.keys.health_status_label)
            != str(Verdict.SCHEDULABLE)
        } - {me}
        after = len(out) + 1
        cap = self.cfg.max_unschedulable
        if cap is not None and after > cap:
            return f"circuit breaker: {len(out)} nodes are unschedulable already (at most {cap})"
        pct = self.cfg.max_unschedulable_percent
        if pct is not None and after * 100 > pct * total:
            return (
                f"circuit breaker: {len(out)} of {total} nodes are unschedulable already "
                f"(at most {pct:g}%)"
            )
        return None


class KubeNodeWriter:
    """`async with KubeNodeWriter(...) as w: await w.apply(state)`."""

    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        keys: NodeKeys,
        cfg: KubernetesSettings,
        on_refused: Callable[[str], Awaitable[None]] | None = None,
        on_request: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.client, self.name, self.keys = client, node_name, keys
        self.breaker = Breaker(client, keys, cfg)
        self.on_refused, self.on_request = on_refused, on_request
        self.want: NodeState | None = None
        self.node: dict[str, Any] | None = None  # the freshest copy we have seen
        self.connected = False
        self.refused: str | None = None
        self.writes = 0
        self._wake = asyncio.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KubeNodeWriter:
        loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._reconcile_loop())]
        # Its own thread, not the loop's executor: a watch blocks on its connection.
        self._watcher = threading.Thread(target=self._watch, args=(loop,), daemon=True)
        self._watcher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.stop_watch()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._watcher.join, 5.0)
        self.client.close()

    async def apply(self, state: NodeState) -> bool:
        """Take `state` as the one to reach; the write happens in the background."""
        changed = state != self.want
        self.want = state
        if changed:
            self._wake.set()
        return changed

    async def _reconcile_loop(self) -> None:
        recheck: float | None = None  # while the breaker refuses: look again after this
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(recheck):
                    await self._wake.wait()
            self._wake.clear()
            if self.want is None:
                continue
            delay = 0.0
            while True:  # until this state (or a newer one) is written
                try:
                    request, refused = await in_daemon_thread(self._reconcile, self.want)
                    break
                except KubeError as exc:
                    delay = self._backoff(exc, delay)
                except Exception as exc:  # a bug must not stop the node from being written
                    log.error("node_write_error", error=repr(exc))
                    delay = BACKOFF_MAX
                await asyncio.sleep(delay)  # a newer state waits too: Retry-After is honoured
            if not self.connected:
                log.info("api_server_reachable", node=self.name)
                self.connected = True
            if refused and self.on_refused is not None:
                await self.on_refused(refused)
            if request is not None and self.on_request is not None:
                await self.on_request(request)
            recheck = BACKOFF_MAX if self.refused else None  # nodes may have come back

    def _backoff(self, exc: KubeError, delay: float) -> float:
        if self.connected or delay == 0.0:
            log.warning("node_write_failed", node=self.name, error=str(exc), status=exc.status)
        self.connected = False
        if exc.retry_after is not None:
            return min(max(exc.retry_after, BACKOFF_MIN), 5 * BACKOFF_MAX)
        step = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
        return step * random.uniform(0.8, 1.2)

    def _reconcile(self, want: NodeState) -> tuple[str | None, str | None]:
        """One pass (in a thread): plan against the freshest node, patch what differs.
        Returns the deep-check request found on the node (cleared by this pass) and the
        breaker's refusal when it is new."""
        node = self._fresh() or self._seen(self.client.get_node(self.name))
        refused: str | None = None
        request: str | None = None
        for _ in range(CONFLICT_TRIES):
            annotations = (node.get("metadata") or {}).get("annotations") or {}
            if self.on_request is not None:  # else the request is another's (the controller)
                request = annotations.get(self.keys.deep_check_request_annotation) or request
            p = plan(node, want, self.keys, rfc3339(time.time()), refused, request is not None)
            if p.takes_out and refused is None and self.breaker.enabled:
                refused = self.breaker.refuses(self.name)
                if refused is not None:
                    continue  # plan again, leaving the health label and taint alone
            if p.status is not None:  # conditions first: the owned record follows them
                node = self._seen(
                    self.client.patch_node(self.name, p.status, STRATEGIC, status=True)
                )
                self.writes += 1
                continue  # plan the rest against the node as it is now
            if p.meta is not None:
                try:
                    node = self._seen(self.client.patch_node(self.name, p.meta, MERGE))
                except KubeError as exc:
                    if exc.status != 409:
                        raise
                    node = self._seen(self.client.get_node(self.name))  # re-read, plan again
                    continue
                self.writes += 1
            newly = refused if refused is not None and self.refused is None else None
            if newly:
                log.warning("node_not_taken_out", node=self.name, why=refused)
            self.refused = refused
            return request, newly
        raise KubeError(409, "the node kept changing under us; trying again later")

    def _fresh(self) -> dict[str, Any] | None:
        with self._lock:
            return self.node

    def _seen(self, node: dict[str, Any]) -> dict[str, Any]:
        """Keep the newest copy (by resourceVersion) of the node, from a patch or the watch."""
        with self._lock:
            if self.node is None or _rv(node) >= _rv(self.node):
                self.node = node
            return self.node

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """This node's changes (in a thread): each one wakes a reconcile, so a label or taint
        someone else removed comes back, and a deep check asked for is seen."""
        delay = 0.0
        while not self._stop.is_set():
            try:
                node = self._seen(self.client.get_node(self.name))
                loop.call_soon_threadsafe(self._wake.set)
                delay = 0.0
                rv = node["metadata"].get("resourceVersion", "")
                for event in self.client.watch_node(self.name, rv, WATCH_SECONDS):
                    if self._stop.is_set():
                        return
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._seen(event["object"])
                        loop.call_soon_threadsafe(self._wake.set)
            except KubeError as exc:
                if self._stop.is_set():
                    return
                delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
                log.debug("node_watch_failed", error=str(exc))
                self._stop.wait(delay * random.uniform(0.8, 1.2))
            except RuntimeError:  # the loop closed under us: the agent is stopping
                return


def _rv(node: dict[str, Any]) -> int:
    try:
        return int(node["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1
