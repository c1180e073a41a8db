"""The node writer in a cluster: keeps the state the agent wants and makes its own Node match.

Level-triggered: it reconciles when the wanted state changes, on start, after the API server
comes back, and when the Node changes (a watch on this one node). It writes only what differs
(agent/kube/plan.py), in three parts, each on its own: the node decision (health label, taint,
owned record) first, then the other annotations, then the conditions (`nodes/status`). A part
that fails is retried with jittered exponential backoff, honouring Retry-After, without holding
up the others: conditions refused for good (403, 422) never keep a node with a dead GPU
schedulable. Meanwhile the agent keeps detecting, and the last wanted state is what lands. A
409 (another writer changed the node) re-reads and plans again.

Before taking the node out it asks the breaker: one LIST of the agent's nodes, from the API
server's cache, at that moment only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.backoff import Backoff
from agent.events import rfc3339
from agent.kube.client import MERGE, STRATEGIC, KubeClient, KubeError, is_node
from agent.kube.plan import plan
from agent.models import KubernetesSettings, NodeKeys
from agent.nodestate import NodeState
from agent.policy import Verdict
from agent.supervise import Heart, Supervisor
from agent.threads import in_daemon_thread

log = structlog.get_logger("agent.kube")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
WATCH_SECONDS = 300
CONFLICT_TRIES = 5  # 409s in one pass before it is left to the next
LAST_PASS = 5.0  # seconds the stop gives the last pass (Kubernetes Events: 5 s too)


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
        loops: Supervisor | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """`on_error(kind)`: a write failed (label, taint, annotation, condition)."""
        self.client, self.name, self.keys = client, node_name, keys
        self.breaker = Breaker(client, keys, cfg)
        self.on_refused, self.on_request, self.on_error = on_refused, on_request, on_error
        self.loops = loops or Supervisor()
        self.want: NodeState | None = None
        self.node: dict[str, Any] | None = None  # the freshest copy we have seen
        self.connected = False
        self.refused: str | None = None
        self.writes = 0
        self.failing: dict[str, Failing] = {}  # part -> since when, and why
        self._wake = asyncio.Event()
        self._closing = False  # a last pass asked for: the stop's
        self._closed = asyncio.Event()  # that pass is done
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KubeNodeWriter:
        loop = asyncio.get_running_loop()
        self._tasks = [self.loops.task("node-writer", self._reconcile_loop)]
        # Its own thread, not the loop's executor: a watch blocks on its connection.
        stuck = WATCH_SECONDS + 2 * self.client.timeout + 60
        self._watcher = self.loops.thread(
            "node-watch", lambda heart: self._watch(loop, heart), self._stop, stuck
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """A last pass of the reconcile loop, every part tried whatever its backoff, so the
        decision asked for last (a fault just before a SIGTERM) lands if the API server lets
        it; at most LAST_PASS seconds (a loop waiting out a crash makes none), and within the
        caller's bound (the daemon's stop budget). Then the loops end."""
        self._stop.set()
        self.client.stop_watch()
        try:
            if any(not t.done() for t in self._tasks):
                self._closing = True
                self._wake.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), LAST_PASS)
        finally:
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

    def failing_for(self, now: float | None = None) -> tuple[float, str] | None:
        """How long the node decision (health label, taint) has failed to land, and why."""
        f = self.failing.get(META)
        if f is None:
            return None
        return (now if now is not None else time.monotonic()) - f.since, f.error

    async def _reconcile_loop(self, heart: Heart) -> None:
        recheck: float | None = 0.0  # a pass at once (on start, and after a restart)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(recheck):
                    await self._wake.wait()
            self._wake.clear()
            last = self._closing  # this pass is the stop's last
            if self.want is None:
                if last:
                    self._closed.set()
                continue
            heart.busy()
            now = time.monotonic()
            due = {p for p in PARTS if last or p not in self.failing or self.failing[p].at <= now}
            if not due:
                recheck = self._next_try(now)
                heart.done()
                continue
            request, refused, failed = await in_daemon_thread(self._reconcile, self.want, due)
            self._settle(due, failed)
            if refused and self.on_refused is not None:
                await self.on_refused(refused)
            if request is not None and self.on_request is not None:
                await self.on_request(request)
            recheck = self._next_try(time.monotonic())
            if recheck is None and self.refused:
                recheck = BACKOFF_MAX  # nodes may have come back
            heart.done()
            if last:
                self._closed.set()

    def _next_try(self, now: float) -> float | None:
        if not self.failing:
            return None
        return max(0.0, min(f.at for f in self.failing.values()) - now)

    def _settle(self, due: set[str], failed: dict[str, KubeError]) -> None:
        """Each part's outcome: a failure backs off (its own delay), a success clears it."""
        now = time.monotonic()
        for part in due:
            exc = failed.get(part)
            if exc is None:
                if self.failing.pop(part, None) is not None:
                    log.info("node_write_recovered", node=self.name, part=part)
                continue
            was = self.failing.get(part)
            backoff = was.backoff if was else Backoff(BACKOFF_MIN, BACKOFF_MAX)
            delay = backoff.next(exc.retry_after)
            if was is None:
                log.warning(
                    "node_write_failed",
                    node=self.name,
                    part=part,
                    error=str(exc),
                    status=exc.status,
                )
            self.failing[part] = Failing(was.since if was else now, str(exc), backoff, now + delay)
        if not failed and not self.connected:
            log.info("api_server_reachable", node=self.name)
        self.connected = not failed

    def _reconcile(
        self, want: NodeState, due: set[str]
    ) -> tuple[str | None, str | None, dict[str, KubeError]]:
        """One pass (in a thread): plan against the freshest node and write each `due` part
        that differs, the node decision first; a part that fails does not stop the others.
        Returns the deep-check request found on the node (cleared by this pass), the breaker's
        refusal when it is new, and the parts that failed."""
        failed: dict[str, KubeError] = {}
        try:
            node = self._fresh() or self._seen(self.client.get_node(self.name))
        except KubeError as exc:
            return None, None, dict.fromkeys(due, exc)
        refused: str | None = None
        request: str | None = None
        looked, conflicts = False, 0
        written: set[str] = set()
        while True:
            annotations = (node.get("metadata") or {}).get("annotations") or {}
            if self.on_request is not None:  # else the request is another's (the controller)
                request = annotations.get(self.keys.deep_check_request_annotation) or request
            p = plan(node, want, self.keys, rfc3339(time.time()), refused, request is not None)
            if p.takes_out and refused is None and self.breaker.enabled and not looked:
                looked = True
                try:
                    refused = self.breaker.refuses(self.name)
                except KubeError as exc:  # cannot tell: the node stays in, tried again soon
                    failed[META] = exc
                    refused = f"circuit breaker: cannot list the nodes ({exc})"
                if refused is not None:
                    continue  # plan again, leaving the health label and taint alone
            part = next(
                (k for k in PARTS if k in due and k not in written and getattr(p, k) is not None),
                None,
            )
            if part is None:
                break
            written.add(part)
            try:
                node = self._seen(self._write(part, getattr(p, part)))
                self.writes += 1
            except KubeError as exc:
                if part == META and exc.status == 409 and conflicts < CONFLICT_TRIES:
                    conflicts += 1
                    written.discard(part)
                    try:
                        node = self._seen(self.client.get_node(self.name))  # plan again
                    except KubeError as again:
                        failed[part] = again
                        written.add(part)
                    continue
                failed[part] = exc
                for kind in _kinds(part, getattr(p, part)):
                    if self.on_error is not None:
                        self.on_error(kind)
        if META in failed and refused is not None and refused.startswith("circuit breaker: cannot"):
            refused = None  # not a refusal: the breaker could not look
        newly = refused if refused is not None and self.refused is None else None
        if newly:
            log.warning("node_not_taken_out", node=self.name, why=refused)
        if META in due and META not in failed:
            self.refused = refused
        if ANNOTATIONS not in due or ANNOTATIONS in failed:
            request = None  # taken once its annotation is cleared, else run again and again
        return request, newly, failed

    def _write(self, part: str, patch: dict[str, Any]) -> dict[str, Any]:
        if part == STATUS:
            return self.client.patch_node(self.name, patch, STRATEGIC, status=True)
        return self.client.patch_node(self.name, patch, MERGE)

    def _fresh(self) -> dict[str, Any] | None:
        with self._lock:
            return self.node

    def _seen(self, node: dict[str, Any]) -> dict[str, Any]:
        """Keep the newest copy (by resourceVersion) of the node, from a patch or the watch."""
        with self._lock:
            if self.node is None or _rv(node) >= _rv(self.node):
                self.node = node
            return self.node

    def _watch(self, loop: asyncio.AbstractEventLoop, heart: Heart) -> None:
        """This node's changes (in a thread): each one wakes a reconcile, so a label or taint
        someone else removed comes back, and a deep check asked for is seen. An answer that
        is not a Node is skipped; the supervisor restarts this after anything unforeseen."""
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while not self._stop.is_set():
            heart.busy()
            try:
                node = self._seen(self.client.get_node(self.name))
                loop.call_soon_threadsafe(self._wake.set)
                backoff.reset()
                rv = node["metadata"].get("resourceVersion", "")
                for event in self.client.watch_node(self.name, rv, WATCH_SECONDS):
                    if self._stop.is_set():
                        return
                    obj = event.get("object")
                    if event.get("type") in ("ADDED", "MODIFIED") and is_node(obj):
                        self._seen(obj)
                        loop.call_soon_threadsafe(self._wake.set)
                    heart.done()
                    heart.busy()
                heart.done()
            except KubeError as exc:
                heart.done()
                if self._stop.is_set():
                    return
                log.debug("node_watch_failed", error=str(exc))
                self._stop.wait(backoff.next(exc.retry_after))
            except RuntimeError:  # the loop closed under us: the agent is stopping
                if self._stop.is_set() or loop.is_closed():
                    return
                raise


@dataclass
class Failing:
    """A part of the node's state that does not land: since when, why, when to try again."""

    since: float
    error: str
    backoff: Backoff
    at: float


META, ANNOTATIONS, STATUS = "meta", "annotations", "status"
PARTS = (META, ANNOTATIONS, STATUS)  # the order of the writes: the node decision first


def _kinds(part: str, patch: dict[str, Any]) -> list[str]:
    """The metric's kinds a failed patch counts as."""
    if part == STATUS:
        return ["condition"]
    if part == ANNOTATIONS:
        return ["annotation"]
    kinds = ["label"] if (patch.get("metadata") or {}).get("labels") else []
    if "taints" in (patch.get("spec") or {}):
        kinds.append("taint")
    return kinds or ["annotation"]  # the owned record alone


def _rv(node: dict[str, Any]) -> int:
    try:
        return int(node["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return -1
