"""`node-health controller`: one active replica (the Lease), a pass over the nodes every
`interval`, and the events of each step to the spool, stdout, CloudWatch and the node's
Kubernetes Events.

Three loops: one keeps the Lease (every `retry_period`), one runs remediation passes in a
thread while this replica leads, one looks at every node every `scan` in a thread (asks the
agents of new nodes for their deep check, or with `deep_check.runner: job` runs it and the ones
asked for as Jobs on the nodes; runs the connectivity test on the nodes asked for).
A pass checks leadership before each write, and a write that the Lease fences off is not done,
so a replica that lost the Lease stops within `renew_deadline`; a connectivity test is
interrupted (its MPIJobs deleted, nothing labelled). On a stop the pass under way finishes,
the test is interrupted, and their events go out before the Lease is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import structlog

from agent.config import Settings
from agent.controller.backends import backend
from agent.controller.connectivity import Interrupted
from agent.controller.lease import Elector
from agent.controller.remediator import Remediator
from agent.controller.replaced import ReplacedHardware
from agent.controller.requests import Requests
from agent.controller.stragglers import Stragglers
from agent.events import Event, rfc3339
from agent.identity import Identity
from agent.kube.client import KubeClient
from agent.metrics import Metrics
from agent.server import serve_health
from agent.sinks import Fanout, Sink
from agent.sinks.spool import SpoolSink
from agent.sinks.stdout import StdoutSink
from agent.supervise import Heart, Supervisor
from agent.threads import in_daemon_thread

log = structlog.get_logger("agent.controller")

COMPONENT = "node-health-controller"


def holder_identity() -> str:
    """Unique per process, readable per pod (as client-go's `<hostname>_<uuid>`)."""
    name = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{name}_{uuid.uuid4().hex[:12]}"


class Controller:
    def __init__(self, settings: Settings, client: KubeClient, identity: str | None = None):
        cfg = settings.controller
        self.settings, self.client = settings, client
        self.identity = identity or holder_identity()
        self.metrics = Metrics()
        self.loops = Supervisor()  # the Lease loop and the sinks' loops: /healthz
        self.elector = Elector(
            client,
            cfg.namespace,
            cfg.lease_name,
            self.identity,
            cfg.lease_duration,
            cfg.renew_deadline,
        )
        self.replaced = ReplacedHardware(
            client, cfg.namespace, cfg.replaced_record, settings.node_keys
        )
        self.stragglers = Stragglers(client, settings.node_keys, cfg.stragglers)
        self.remediator = Remediator(
            client,
            settings.node_keys,
            cfg,
            backend(cfg.backend, settings.cluster_name),
            settings.kubernetes.max_unschedulable_percent
            if cfg.concurrent_percent is None
            else cfg.concurrent_percent,
            is_leader=lambda: self.elector.leader,
            record_start=self.elector.record_start,
            starts=self.elector.starts,
            replaced=self.replaced,
        )
        self._stop, self._halt = asyncio.Event(), threading.Event()  # the halt: for threads
        self.requests = Requests(
            client,
            cfg,
            settings.node_keys,
            self._say_from_thread,
            stopped=lambda: self._halt.is_set() or not self.elector.leader,
            sleep=self._halt.wait,
            deep=settings.deep_check,
        )
        self.sinks = self._sinks(settings)
        self.fanout = Fanout(self.sinks)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _sinks(self, settings: Settings) -> list[Sink]:
        state = Path(settings.state_dir) / "controller"
        spool = settings.spool
        sinks: list[Sink] = [
            SpoolSink(state / "spool", spool.max_segment_bytes, spool.max_segments)
        ]
        if settings.stdout_events:
            sinks.append(StdoutSink())
        from agent.sinks import cloudwatch

        me = Identity(
            node_name=self.identity.split("_")[0],
            region=settings.region,
            cluster_name=settings.cluster_name,
            cluster_id=settings.cluster_id,
        )
        if cloudwatch.enabled(settings.cloudwatch, me):
            sinks.append(
                cloudwatch.CloudWatchSink(
                    settings.cloudwatch,
                    me,
                    state / "spool",
                    state / "cloudwatch.cursor",
                    self.metrics,
                    stream=f"NodeHealthController/{me.cluster_name or 'cluster'}",
                    loops=self.loops,
                )
            )
        from agent.kube.events import KubeEventSink

        sinks.append(
            KubeEventSink(
                self.client,
                None,
                settings.kubernetes.events_namespace,
                component=COMPONENT,
                instance=me.node_name,
                loops=self.loops,
            )
        )
        return sinks

    def stop(self) -> None:
        self._stop.set()
        self._halt.set()

    def _say_from_thread(self, event: Event) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.fanout.emit(event), self._loop)

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            for sink in self.sinks:
                await stack.enter_async_context(sink)
            await serve_health(
                stack,
                self.settings.http_listen,
                self.metrics,
                live=self._live,
                ready=self._readiness,
            )
            log.info(
                "controller_started",
                identity=self.identity,
                backend=self.settings.controller.backend,
                lease=f"{self.settings.controller.namespace}/{self.settings.controller.lease_name}",
            )
            lease = self.loops.task("lease", self._lease_loop)
            scans = asyncio.create_task(self._scans())
            # A pass under way when asked to stop finishes, and its events are sent: what it
            # wrote to the nodes is said, and nothing is written after the Lease is given up.
            await self._passes()
            await scans
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)
            await in_daemon_thread(self.elector.release)
            await self.fanout.flush()
        self.client.close()
        log.info("controller_stopped")

    async def _lease_loop(self, heart: Heart) -> None:
        cfg = self.settings.controller
        was = self.elector.leader  # as it stands after a restart of this loop
        while True:
            heart.busy()
            leading = await in_daemon_thread(self.elector.try_acquire_or_renew)
            if leading != was:
                log.info("leadership", leader=leading, identity=self.identity)
                self.metrics.leader.set(1 if leading else 0)
                await self.fanout.emit(self._notice(leading))
                was = leading
            heart.done()
            await asyncio.sleep(cfg.retry_period)

    async def _passes(self) -> None:
        """A pass every `interval` while this replica leads, until asked to stop."""
        cfg = self.settings.controller
        while not self._stop.is_set():
            leading = self.elector.leader
            if leading:
                try:
                    events = await in_daemon_thread(self.remediator.run_pass)
                except Exception as exc:  # the API server away, say: try again next time
                    log.warning("pass_failed", error=str(exc))
                    events = []
                self.metrics.suspect_network_nodes.set(len(self.remediator.suspects))
                for event in events:
                    self.metrics.remediation_steps.labels(event.get("reason", "")).inc()
                    await self.fanout.emit(event)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.interval if leading else cfg.retry_period):
                    await self._stop.wait()

    async def _scans(self) -> None:
        """Every `scan` while this replica leads: deep checks for new nodes, connectivity for
        the nodes asked for (or new); one connectivity run at a time."""
        cfg = self.settings.controller
        while cfg.scan and not self._stop.is_set():
            leading = self.elector.leader
            if leading:
                try:
                    await in_daemon_thread(self.requests.scan)
                except Interrupted as exc:
                    log.info("connectivity_interrupted", reason=str(exc))
                except Exception as exc:  # the API server away, say: try again next time
                    log.warning("scan_failed", error=str(exc))
                await self._fleet_scan()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.scan if leading else cfg.retry_period):
                    await self._stop.wait()

    async def _fleet_scan(self) -> None:
        """Nodes carrying hardware replaced elsewhere for a fault, and nodes slower than their
        peers: marked, and said."""

        def scan() -> list[Event]:
            nodes = self.client.list_nodes("")
            return [*self.replaced.scan(nodes), *self.stragglers.scan(nodes)]

        try:
            events = await in_daemon_thread(scan)
        except Exception as exc:  # the API server away, say: try again next time
            log.warning("fleet_scan_failed", error=str(exc))
            return
        for event in events:
            await self.fanout.emit(event)

    def _live(self) -> str | None:
        if self._stop.is_set():
            return "stopping"
        return "; ".join(self.loops.problems()) or None

    def _readiness(self) -> str | None:
        """A standby replica is ready too; one that cannot reach its Lease is not, and says
        why."""
        error = self.elector.error
        return f"cannot take part in leader election: {error}" if error else None

    def _notice(self, leading: bool) -> dict:
        msg = "leads: remediation is on" if leading else "does not lead: remediation paused"
        return {
            "level": "info",
            "ts": rfc3339(time.time()),
            "msg": f"controller {self.identity} {msg}",
            "controller": self.identity,
        }


async def run_controller(settings: Settings, client: KubeClient) -> int:
    controller = Controller(settings, client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stop)
    await controller.serve()
    return 0
