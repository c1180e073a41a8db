"""The daemon: wires checks -> policy -> events and node state, and owns their lifetimes.

Data flows one way: runner (findings) -> policy (changes) -> event builder -> sinks, and the
policy's desired node state -> node writer. Every long-lived resource is an async context
manager entered here and closed in reverse order on SIGTERM/SIGINT.

A stop is done within `stop_timeout`, whatever is unreachable: the checks are cancelled (their
tools killed), the policy state saved, then the sinks make a last try at once, each bounded
(what they could not send stays in the spool for the next start), and the node writer closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from agent import __version__, deeprecord, hardware, heap
from agent.commit import Outbox, saved_outbox
from agent.config import Settings
from agent.events import EventBuilder, dumps, rfc3339
from agent.identity import Identity
from agent.kube.client import KubeClient
from agent.metrics import Metrics
from agent.nodestate import LocalStateFile, NodeState, NodeWriter, desired, relabel
from agent.plan import PlannedCheck
from agent.policy import (
    RESULT_RANK,
    Change,
    DeepCheckWanted,
    Policy,
    StateCorruptError,
    Verdict,
    builtin_history_rules,
    check_results,
    coalesce,
    read_boot_id,
    rule_table,
    write_atomic,
)
from agent.runner import CHECK_ERROR, Runner
from agent.server import serve_health
from agent.sinks import Fanout, Sink
from agent.sinks.spool import MARK, SpoolSink
from agent.sinks.stdout import StdoutSink
from agent.statedir import StateDir
from agent.supervise import Heart, Supervisor
from agent.threads import DaemonThreads, in_daemon_thread
from checks.api import Action, Finding, Status, StreamingCheck

RECORD_POLL = 2.0  # seconds between looks at the deep-check record (one stat)
UNSPOOLED_MAX = 1 << 20  # bytes of spool lines kept while the spool cannot be written
ECHO_CHARS = 1024  # of a command, in the event that answers it
RUN_CHECK_LISTED = 50  # findings listed in a run-check's answer; the total is given too

log = structlog.get_logger("agent.daemon")


@dataclass(frozen=True)
class Paths:
    policy_state: str = "policy-state.json"
    node_state: str = "node-state.json"
    spool: str = "spool"
    deep_check: str = deeprecord.DIRECTORY  # one <run id>.jsonl per run
    cloudwatch_cursor: str = "cloudwatch.cursor"  # how far the spool has shipped
    hardware_history: str = "hardware-history.json"  # faults and reboots per GPU / NIC


def newest_lines(data: bytes, limit: int) -> tuple[bytes, int]:
    """The last whole lines of `data` within `limit` bytes, and how many events (lines but
    checkpoints) were left out."""
    if len(data) <= limit:
        return data, 0
    nl = data.find(b"\n", len(data) - limit - 1)
    cut = len(data) if nl < 0 else nl + 1
    return data[cut:], sum(1 for ln in data[:cut].splitlines() if not ln.startswith(MARK))


class Agent:
    """One agent: built from settings, run with `serve()` until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        identity: Identity,
        checks: list[PlannedCheck],
        kube: KubeClient | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        state = settings.state_dir
        self.state_dir = StateDir(state)
        self.state_dir.check()  # a read-only or full disk: one clear error, detection goes on
        self.metrics = Metrics()
        self.loops = Supervisor()  # every background loop, restarted on a crash; /healthz
        self.spool = SpoolSink(
            state / Paths.spool, settings.spool.max_segment_bytes, settings.spool.max_segments
        )
        # The spool first: an event is on disk before CloudWatch ships it (a batch's events,
        # held until its commit, reach the other sinks before: _publish).
        self.sinks: list[Sink] = [self.spool]
        if settings.stdout_events:
            self.sinks.append(StdoutSink())
        from agent.sinks import cloudwatch

        readers: list[Sink] = []  # sinks that ship what the spool holds
        if cloudwatch.enabled(settings.cloudwatch, identity):
            readers.append(
                cloudwatch.CloudWatchSink(
                    settings.cloudwatch,
                    identity,
                    state / Paths.spool,
                    state / Paths.cloudwatch_cursor,
                    self.metrics,
                    loops=self.loops,
                )
            )
            self.sinks += readers
        if settings.mqtt.host:
            from agent.sinks.mqtt import MqttSink

            mqtt = MqttSink(settings.mqtt, identity, self._status, self._command, self.loops)
            self.sinks.append(mqtt)
        self.writer: NodeWriter = LocalStateFile(state / Paths.node_state)
        if kube is not None:
            from agent.kube.events import KubeEventSink
            from agent.kube.writer import KubeNodeWriter

            cfg = settings.kubernetes
            writer = KubeNodeWriter(
                kube,
                identity.node_name,
                settings.node_keys,
                cfg,
                on_refused=self._refused,
                # runner job: the annotation is the controller's to take (it runs a Job)
                on_request=self._deep_requested if settings.deep_check.runner == "agent" else None,
                loops=self.loops,
                on_error=self._kube_write_failed,
            )
            self.writer = writer
            uid = lambda: ((writer.node or {}).get("metadata") or {}).get("uid")  # noqa: E731
            self.sinks.append(
                KubeEventSink(
                    kube,
                    identity.node_name,
                    cfg.events_namespace,
                    uid=uid,
                    loops=self.loops,
                    on_error=self._kube_write_failed,
                )
            )
        self.fanout = Fanout(self.sinks, on_error=self._sink_failed)
        # A batch's events go to the spool (held until the batch is committed) and the sinks
        # that send them on themselves; to the spool's readers once the spool holds them.
        self._readers = readers
        self._senders = [s for s in self.sinks if s not in readers]
        self.builder = EventBuilder(identity, dry_run=settings.dry_run)
        boot_id = read_boot_id(settings.host_root / "proc/sys/kernel/random/boot_id")
        rules = rule_table(settings.policy)
        # GPUs' UUIDs come from NVML when the agent starts (serve); NIC GUIDs and Neuron
        # device serials from sysfs now.
        sys_root = settings.host_root / "sys"
        self.inventory = hardware.Inventory(
            nics=hardware.read_nics(sys_root), neurons=hardware.read_neurons(sys_root)
        )
        # The last batch, if its state was saved but its spool write not (agent.commit): its
        # history first (read next), its events before anything else is spooled (serve).
        outbox = saved_outbox(state / Paths.policy_state)
        spooled = self.spool.last_batch()
        self._redo = outbox if outbox is not None and outbox.batch > spooled else None
        self._batch = max(spooled, outbox.batch if outbox is not None else 0)
        if self._redo is not None and self._redo.history is not None:
            self._write_history(state / Paths.hardware_history, self._redo.history)
        self.history = hardware.History(
            state / Paths.hardware_history,
            settings.policy.history or builtin_history_rules(),
            self.inventory,
            deferred=True,  # written with the batch that changed it
        )
        policy = lambda: Policy(  # noqa: E731
            rules, settings.policy, state / Paths.policy_state, boot_id, history=self.history
        )
        try:
            self.policy = policy()
        except StateCorruptError as exc:
            log.error("policy_state_unreadable", error=str(exc))
            # Afresh, without reading it again (it may not have moved: a read-only directory).
            self.policy = Policy(rules, settings.policy, None, boot_id, history=self.history)
            self.policy.state_path = state / Paths.policy_state
        failed = {
            t.check
            for t in self.policy.trackers.values()
            if t.condition == CHECK_ERROR and t.status is Status.UNKNOWN
        }
        self.runner = Runner(checks, self.handle, self.metrics, failed=failed)
        self.metrics.follow(lambda: self.policy.trackers.values(), self.spool.usage)
        self.metrics.info.info(
            {
                "version": __version__,
                "instance_type": identity.instance_type or "",
            }
        )
        self._stop = asyncio.Event()
        # What fails its writes now (a state file by its name, the spool), and why: _spell.
        self._failing: dict[str, str] = {}
        self._unspooled = b""  # what it failed to take, written first at the next try
        self._deadline: float | None = None  # the loop's time by which a stop is done
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._ready = False
        self._saving: asyncio.Future[None] | None = None  # the state file's write, in a thread
        # deep-health-check-status: the last run's, kept in its record across restarts
        record = deeprecord.latest_record(state / Paths.deep_check)
        self.deep_status: str | None = record.status if record else None
        self._deep_seen = {record.run_id} if record else set()  # runs the policy has seen
        self._deep_running = False
        self._deep_task: asyncio.Task[None] | None = None
        self._extra_tasks: set[asyncio.Task[None]] = set()  # checks run on request
        # (the newest deep-check record, its run's figures): the performance annotation
        self._figures_seen: tuple[object, dict[str, object] | None] = (None, None)
        cfg = settings.deep_check
        # After the reboot that remediated a fault (the policy holds its verdict until the
        # first round), the node stays out until a deep check passes.
        remediated = cfg.after_remediation and self.policy.hold is not None
        self._deep_pending = remediated or (cfg.on_first_start and self.deep_status is None)
        if remediated:
            self.deep_status = "InProgress"

    async def _refused(self, why: str) -> None:
        """The breaker kept the node in: said as an event (CloudWatch, Node events), counted;
        the finding itself stays reported and the condition set."""
        self.metrics.breaker_refusals.inc()
        event = self.builder.notice(
            "warn", f"Node not taken out: {why}", reason="CircuitBreakerOpen"
        )
        await self.fanout.emit(event)

    async def _deep_requested(self, value: str) -> None:
        """An operator asked for a deep check on the node (its annotation): run it, unless one
        runs already; `force` runs it even while the accelerators are in use."""
        if self._deep_running or (self._deep_task is not None and not self._deep_task.done()):
            log.info("deep_check_request_ignored", why="one is running")
            return
        log.info("deep_check_requested", value=value)
        self._deep_task = asyncio.create_task(self._run_deep_check(force=value == "force"))

    def _status(self) -> dict[str, object]:
        """The node as the agent sees it now: verdict, labels, each check's last result."""
        checks = check_results(self.policy.trackers.values())
        labels = self._node_state().labels
        return {"verdict": str(self.policy.verdict), "labels": labels, "checks": checks}

    def _node_state(self) -> NodeState:
        """What the node should look like: the policy's state with the deep check's label."""
        state = desired(self.policy, self.settings.node_keys)
        figures = self._figures()
        if figures is not None:
            text = json.dumps(figures, separators=(",", ":"))
            state.annotations[self.settings.node_keys.performance_annotation] = text
        if self.inventory.serials() or self.history.devices:
            summary = self.history.summary(self.policy.clock())
            state.annotations[self.settings.node_keys.hardware_annotation] = summary
        return with_deep_check(state, self.deep_status, self.settings)

    async def _command(self, cmd: dict[str, object]) -> None:
        """A command from MQTT: `deep-check` (`force`), `run-check` (`check`). Each is
        answered with one event that echoes it once, cut to ECHO_CHARS; an unknown or malformed
        one too."""
        name, ident = cmd.get("command"), cmd.get("id")
        planned = {c.name: c for c in self.runner.checks}
        refused: str | None = None
        if name is None:
            refused = f"malformed: {cmd.get('error')}"
        elif name == "deep-check" and self.settings.deep_check.runner == "job":
            refused = "deep_check.runner is job: the controller runs it (annotate the node)"
        elif name == "deep-check":
            force = cmd.get("force", False)
            if not isinstance(force, bool):  # "yes-please" is no yes
                refused = f'"force" is true or false, not {_short(force)}'
            else:
                await self._deep_requested("force" if force else "run")
        elif name == "run-check":
            check = cmd.get("check")
            pc = planned.get(check) if isinstance(check, str) else None
            if pc is None:
                refused = f"no check {_short(check)} runs here (known: {sorted(planned)})"
            else:
                task = asyncio.create_task(self._run_check_now(pc, ident))
                self._extra_tasks.add(task)
                task.add_done_callback(self._extra_tasks.discard)
        else:
            refused = f"unknown command {_short(name)} (deep-check, run-check)"
        what = f"MQTT command {_short(name, quote=False) if name else ''}".rstrip()
        event = self.builder.notice(
            "warn" if refused else "info",
            f"{what} refused: {refused}" if refused else f"{what} accepted",
            command=_echo(cmd.get("payload") if name is None else cmd),
            command_id=_echo(ident),
        )
        await self.fanout.emit(event)

    async def _run_check_now(self, pc: PlannedCheck, ident: object) -> None:
        """One run of a check, asked for; answered with one event of what it found.

        A polling check's findings go to the policy like any round's, which reports only what
        is new or changed. A streaming check's do not: its one-off run re-reads what its source
        holds, records the follower has already reported once each, and counting them again
        would report old faults as new and bring a count rule closer to a reboot."""
        found = await self.runner.run_one(pc)
        streaming = isinstance(pc.check, StreamingCheck)
        if not streaming:
            await self.handle(found)
        worst = max((f.status for f in found), key=RESULT_RANK.__getitem__, default=Status.OK)
        summary = [
            {"condition": f.condition, "component": f.component, "status": str(f.status)}
            | {"reason": f.reason, "time": rfc3339(f.ts)}
            for f in found[:RUN_CHECK_LISTED]
        ]
        said = "each reported when it was read" if streaming else "what changed reported"
        event = self.builder.notice(
            "info",
            f"MQTT command run-check {pc.name} done: {worst}, {len(found)} findings ({said})",
            check=pc.name,
            result=str(worst),
            findings=summary,
            findings_total=len(found),
            command_id=_echo(ident),
        )
        await self.fanout.emit(event)

    def _sink_failed(self, sink: str) -> None:
        self.metrics.sink_errors.labels(sink).inc()

    def _kube_write_failed(self, kind: str) -> None:
        self.metrics.kube_write_errors.labels(kind).inc()

    async def _commit(self, checkpoints: dict[str, dict[str, Any]]) -> None:
        """The batch's policy state, with its outbox (the held events, where the streaming
        checks resume, the hardware history's new text: agent.commit), then the history, then
        the events in one spool write; once per batch, the state written (and fsynced) in a
        thread so that the loop goes on. Shielded: a stop while it is written waits for it
        (serve), so an older state never lands after the last one, nor a batch half-done."""
        data = self._unspooled + self.spool.take(checkpoints, self._batch + 1)
        history = self.history.take()
        outbox = Outbox(self._batch + 1, data, history) if data or history is not None else None
        if outbox is not None:
            self._batch = outbox.batch
        text = self.policy.dump(outbox.saved() if outbox is not None else None)
        if text is not None or outbox is not None:
            self._saving = asyncio.ensure_future(self._apply(text, outbox))
            await asyncio.shield(self._saving)

    async def _apply(self, text: str | None, outbox: Outbox | None) -> None:
        """Each write in its turn; one that fails is logged and counted, and the next goes on
        (an event that cannot be counted is still reported)."""
        if text is not None and self.policy.state_path is not None:
            await self._write_state(self.policy.state_path, text)
        if outbox is None:
            return
        if outbox.history is not None and self.history.path is not None:
            await asyncio.to_thread(self._write_history, self.history.path, outbox.history)
        self._spool_write(outbox.spool)

    @staticmethod
    def _write_history(path: Path, text: str) -> None:
        try:
            write_atomic(path, text)
        except OSError as exc:  # the node decision goes on; the next change writes it again
            log.error("hardware_history_save_failed", path=str(path), error=str(exc))

    def _spool_write(self, data: bytes) -> None:
        """One write of a batch's spool lines. What a full or read-only disk refuses is kept,
        up to UNSPOOLED_MAX bytes (the oldest lines dropped past it, and counted as the spool
        counts what it drops), and written first with the next batch: an outage of the disk
        loses no event CloudWatch could still be sent."""
        self._unspooled = b""
        if not data:
            return
        try:
            self.spool.write(data)
        except OSError as exc:  # a full disk: counted
            self._sink_failed(self.spool.name)
            self._unspooled, lost = newest_lines(data, UNSPOOLED_MAX)
            if lost:
                self.spool.dropped_events += lost
                log.warning("spool_unwritten_dropped_oldest", events=lost)
            self._spell("spool", exc, "sink_emit_failed", sink=self.spool.name)
        else:
            self._spell("spool", None, "sink_recovered", sink=self.spool.name)

    def _spell(self, what: str, exc: OSError | None, event: str, **fields: Any) -> None:
        """A write of `what` failed (`exc`) or worked: said once a failing spell, with
        `event`, and once when it ends, so a full disk does not fill the log."""
        if exc is None:
            if self._failing.pop(what, None) is not None:
                log.info(event, **fields)
            return
        if what not in self._failing:
            log.error(event, error=str(exc), **fields)
        self._failing[what] = exc.strerror or str(exc)

    async def _write_state(self, path: Path, text: str) -> None:
        """A full or read-only state directory is logged and counted, and never stops the node
        decision (the save is tried again at the next change)."""
        try:
            await asyncio.to_thread(write_atomic, path, text)
        except OSError as exc:
            self.policy.mark_dirty()
            self.metrics.state_save_errors.labels("policy-state").inc()
            self._spell("policy-state", exc, "policy_state_save_failed")
        else:
            self._spell("policy-state", None, "policy_state_saved")

    def _live(self) -> str | None:
        """Why the agent is not alive: stopping, or a loop dead or stuck (kubelet restarts it)."""
        if self._stop.is_set():
            return "stopping"
        problems = self.loops.problems()
        return "; ".join(problems) if problems else None

    def _readiness(self) -> str | None:
        """Why the agent is not ready: the first round not in, or the node decision failing
        to land for longer than `kubernetes.write_alarm`."""
        if not self._ready:
            return "the first round of checks is not in"
        failing = getattr(self.writer, "failing_for", None)
        found = failing() if failing is not None else None
        if found is not None and found[0] > self.settings.kubernetes.write_alarm:
            return f"node writer failing for {found[0]:.0f}s: {found[1]}"
        return None

    async def handle(self, findings: list[Finding]) -> None:
        async with self._lock:
            marks = self._checkpoints(findings)
            await self._publish(self.policy.observe(findings), marks)
            for check, state in marks.values():
                self._committed(check, state)
        self._wake.set()

    def _committed(self, check: StreamingCheck, state: dict) -> None:
        """The check's own copy of its place, next to the spool's checkpoint (which a restart
        reads first): one that cannot be written (a full or read-only state directory) is
        counted at every try and said once a failing spell; detection goes on."""
        file = check.name.replace("_", "-")  # kernel_log: kernel-log.json
        try:
            check.committed(state)
        except OSError as exc:
            self.metrics.state_save_errors.labels(file).inc()
            self._spell(file, exc, "check_state_save_failed", check=check.name)
        else:
            self._spell(file, None, "check_state_saved", check=check.name)

    def _warnings(self) -> list[str]:
        """For /healthz: a state directory that cannot be written (which says it all), else
        each state file that could not be saved."""
        if said := self.state_dir.warnings():
            return said
        return [
            f"state file {self.settings.state_dir / file}.json: {why}: kept in memory, "
            "tried again at the next change"
            for file, why in sorted(self._failing.items())
            if file != "spool"
        ]

    def _checkpoints(self, findings: list[Finding]) -> dict[str, tuple[StreamingCheck, dict]]:
        """Where each streaming check resumes after these findings (the last one's position)."""
        last = {f.check: f.position for f in findings if f.position is not None}
        out = {}
        for pc in self.runner.checks:
            if pc.name in last and isinstance(pc.check, StreamingCheck):
                state = pc.check.checkpoint(last[pc.name])  # type: ignore[arg-type]
                if state is not None:
                    out[pc.name] = (pc.check, state)
        return out

    async def _publish(
        self, changes: Iterable[Change], marks: dict[str, tuple[StreamingCheck, dict]] | None = None
    ) -> None:
        changes = coalesce(list(changes))
        events = []
        self.spool.hold()  # the batch's events, committed with its state (_commit)
        try:
            for change in changes:
                event = self.builder.render(change)
                self.metrics.events.labels(event["level"]).inc()
                events.append(event)
                await self.fanout.emit(event, self._senders)
        finally:
            await self._commit({name: state for name, (_, state) in (marks or {}).items()})
        for event in events:
            await self.fanout.emit(event, self._readers)
        self.metrics.spool_dropped.set(self.spool.dropped_events)
        self.metrics.set_verdict(self.policy.verdict)
        if changes:
            # After the commit: a restart after a kill reads back the state that decided it,
            # and never writes the node's decision of before it again. A state file that
            # cannot be written is logged and passed over (_apply).
            await self._reconcile()
        if any(isinstance(c, DeepCheckWanted) for c in changes):
            await self._deep_requested("policy")  # run once the accelerators are free

    def _figures(self) -> dict[str, object] | None:
        """The newest finished deep check's figures, read again only when a record changed."""
        directory = self.settings.state_dir / Paths.deep_check
        newest = _newest(directory)
        if newest != self._figures_seen[0]:
            self._figures_seen = (newest, deeprecord.latest_figures(directory))
        return self._figures_seen[1]

    async def _read_gpus(self) -> None:
        """The GPUs' UUIDs and serials for the hardware history; without them (no NVML, or it
        hangs) GPUs are known by PCI address."""
        try:
            gpus = await asyncio.wait_for(in_daemon_thread(hardware.read_gpus), 10)
        except Exception as exc:
            log.warning("gpu_identities_unread", error=repr(exc))
            return
        self.inventory.gpus.update(gpus)

    async def _reconcile(self) -> None:
        if self.settings.dry_run:
            return
        try:
            await self.writer.apply(self._node_state())
        except Exception as exc:  # the node write is retried at the next change
            log.error("node_write_failed", error=repr(exc))
            self.metrics.state_save_errors.labels("node-state").inc()

    async def _expiry_loop(self, heart: Heart) -> None:
        """Wake at the policy's next deadline (a TTL) and let conditions clear themselves."""
        while True:
            deadline = self.policy.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.policy.clock())
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the wake-up does, and the daemon would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            heart.busy()
            async with self._lock:
                await self._publish(self.policy.expire())
            heart.done()

    async def _after_first_round(self) -> None:
        await self.runner.first_round.wait()
        async with self._lock:
            await self._publish(self.policy.release_hold())
        self._ready = True
        heap.settle()  # start-up's imports and parsing are done
        log.info("first_round_done", verdict=str(self.policy.verdict))

    async def _run_deep_check(self, force: bool = False) -> None:
        """Once the first round of checks is in and nothing uses the accelerators: the deep
        check, its failures fed to the policy like any check's findings."""
        from agent import deepcheck

        cfg = self.settings.deep_check
        await self.runner.first_round.wait()
        while not force and (busy := await deepcheck.accelerators_in_use()):
            log.info("deep_check_waiting", why=busy)
            await asyncio.sleep(cfg.idle_wait)
        opts = deepcheck.Options(
            suite=cfg.suite, level=cfg.level, instance_type=self.identity.instance_type
        )
        records = self.settings.state_dir / Paths.deep_check
        run_id = deepcheck.new_run_id()
        async with self._lock:
            self.deep_status, self._deep_running = "InProgress", True
            self._deep_seen.add(run_id)
            deeprecord.start_record(records, run_id, self.identity)
            await self._reconcile()
        log.info("deep_check_started", suite=cfg.suite, level=cfg.level)
        try:
            status, _, results = await deepcheck.deep_check(
                opts, self.identity, None, cfg.deadline, lambda name, result: None
            )
        except asyncio.CancelledError:
            deeprecord.write_results(
                records, run_id, [deeprecord.stopped_line(self.identity, run_id)]
            )
            raise
        event = deepcheck.result_event(self.identity, status, results, run_id)
        deeprecord.write_results(records, run_id, [*(r.line() for r in results), event])
        await self.fanout.emit(event)
        findings = [dataclasses.replace(f, check="deep_check") for r in results for f in r.findings]
        async with self._lock:
            self._deep_running = False
            record = deeprecord.latest_record(records)
            self.deep_status = record.status if record else None
            await self._publish(self.policy.observe(findings))
            await self._reconcile()
        log.info("deep_check_done", status=status)

    async def _deep_record_loop(self, heart: Heart) -> None:
        """A deep check run beside the daemon (`node-health deep-check` in its pod): keep its
        labels while it runs and after; a failed one goes to the policy like the daemon's own."""
        directory = self.settings.state_dir / Paths.deep_check
        seen = _newest(directory)
        while True:
            heart.done()
            await asyncio.sleep(RECORD_POLL)
            heart.busy()
            if (now := _newest(directory)) == seen:
                continue
            seen = now
            record = deeprecord.latest_record(directory)
            async with self._lock:
                if self._deep_running:  # the daemon's own run owns the label now
                    continue
                findings = []
                if (
                    record
                    and record.status != "InProgress"
                    and record.run_id not in self._deep_seen
                ):
                    self._deep_seen.add(record.run_id)
                    findings = deeprecord.record_findings(record)
                status = record.status if record else None
                if status == self.deep_status and not findings:
                    continue
                log.info("deep_check_record", run=record and record.run_id, status=status)
                self.deep_status = status
                await self._publish(self.policy.observe(findings))
                await self._reconcile()

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            if isinstance(self.writer, contextlib.AbstractAsyncContextManager):
                await self._open(stack, [self.writer])  # the Kubernetes writer's loops
            await self._open(stack, [self.spool])  # closed last: it is where nothing is lost
            if self._redo is not None:  # before anything else is spooled (agent.commit)
                self._spool_write(self._redo.spool)
                log.warning("batch_redone", batch=self._redo.batch, bytes=len(self._redo.spool))
            await self._open(stack, [s for s in self.sinks if s is not self.spool])
            health = contextlib.AsyncExitStack()  # its close bounded like the sinks'
            await self._open(stack, [health])
            await serve_health(
                health,
                self.settings.http_listen,
                self.metrics,
                self._live,
                self._readiness,
                warnings=self._warnings,
            )
            await self._read_gpus()
            async with self._lock:
                await self._publish(self.policy.observe([]))  # what loading found (a reboot)
                await self._reconcile()  # level-triggered: make the node match on start
            log.info(
                "agent_started",
                node=self.identity.node_name,
                verdict=str(self.policy.verdict),
                checks=[c.name for c in self.runner.checks],
                dry_run=self.settings.dry_run,
            )
            resumed = self.spool.last_checkpoints()
            for pc in self.runner.checks:
                if isinstance(pc.check, StreamingCheck):
                    pc.check.resume(resumed.get(pc.name))
            tasks = [
                self.loops.task("checks", lambda heart: self.runner.serve(), stuck=None),
                self.loops.task("expiry", self._expiry_loop),
                self.loops.task("deep-check-record", self._deep_record_loop),
                asyncio.create_task(self._after_first_round()),
            ]
            if self._deep_pending:
                tasks.append(asyncio.create_task(self._run_deep_check()))
            await self._stop.wait()
            began = loop.time()
            self._deadline = began + self.settings.stop_timeout
            log.info("agent_stopping", within_s=self.settings.stop_timeout)
            if self._deep_task is not None:
                tasks.append(self._deep_task)
            tasks += list(self._extra_tasks)
            for task in tasks:
                task.cancel()
            await self._bounded("checks", asyncio.gather(*tasks, return_exceptions=True))
            if self._saving is not None:  # one a cancelled batch left running
                await self._bounded("state", asyncio.gather(self._saving, return_exceptions=True))
            await self._bounded("state", self._commit({}))  # a failure is logged; exit 0
            await self._bounded("node", self._reconcile())  # a batch the stop cut short
            # Then the exit stack: the health server, every sink but the spool at once (each
            # a last bounded try; what is left stays in the spool for the next start, where
            # CloudWatch's cursor resumes), the spool, the node writer.
        log.info("agent_stopped", took_s=round(loop.time() - began, 3))

    async def _open(self, stack: contextlib.AsyncExitStack, resources: list[Any]) -> None:
        """Enter `resources`; they close together, each within what is left of the stop's
        time: one that cannot reach its server must not hold up the others or the exit."""
        entered: list[Any] = []
        stack.push_async_callback(self._close, entered)
        for resource in resources:
            await resource.__aenter__()
            entered.append(resource)

    async def _close(self, resources: list[Any]) -> None:
        await asyncio.gather(
            *(
                self._bounded(getattr(r, "name", type(r).__name__), r.__aexit__(None, None, None))
                for r in resources
            )
        )

    async def _bounded(self, what: str, work: Awaitable[Any]) -> None:
        """`work` until the stop's deadline; past it, given up on (and said), never raised."""
        if self._deadline is None:  # closing after a failed start: the same budget
            self._deadline = asyncio.get_running_loop().time() + self.settings.stop_timeout
        try:
            async with asyncio.timeout_at(self._deadline):
                await work
        except TimeoutError:
            log.warning("stop_gave_up_waiting", on=what, within_s=self.settings.stop_timeout)
        except Exception as exc:
            log.error("stop_failed", on=what, error=repr(exc))


async def run_daemon(
    settings: Settings,
    identity: Identity,
    checks: list[PlannedCheck],
    kube: KubeClient | None = None,
) -> int:
    agent = Agent(settings, identity, checks, kube)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(DaemonThreads())  # a thread stuck in a read cannot hold the exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    from agent.entry import EARLY_SIGNALS

    if EARLY_SIGNALS:  # asked to stop while starting: start, flush, stop
        agent.stop()
    await agent.serve()
    return 0


async def run_once(
    settings: Settings,
    identity: Identity,
    checks: list[PlannedCheck],
    stream: TextIO | None = None,
) -> int:
    """Every enabled check once; every finding as an event on stdout (or `stream`, which the
    command line renders as a table); nothing else changes.

    Exit 0 healthy, 1 a fault that asks for an action, 2 no fault but a check could not decide.
    """
    asyncio.get_running_loop().set_default_executor(DaemonThreads())  # a check's hung read
    policy = Policy(rule_table(settings.policy), settings.policy)
    runner = Runner(checks, handle=_ignore, metrics=Metrics())
    findings = await runner.run_round()
    builder = EventBuilder(identity, dry_run=settings.dry_run)
    async with StdoutSink(stream) as out:
        for change in policy.observe(findings, report_all=True):
            await out.emit(builder.render(change))
    if policy.verdict is not Verdict.SCHEDULABLE or any(
        f.status is Status.FAULT and f.action is not Action.NONE for f in findings
    ):
        return 1
    return 2 if any(f.status is Status.UNKNOWN for f in findings) else 0


async def _ignore(findings: list[Finding]) -> None:
    return None


def _newest(directory: Path) -> tuple[str, int, int] | None:
    """The newest record file's name, size and modification time: cheap to poll."""
    try:
        name = max(p.name for p in os.scandir(directory) if p.name.endswith(".jsonl"))
        st = (directory / name).stat()
    except (OSError, ValueError):
        return None
    return name, st.st_size, st.st_mtime_ns


def _short(value: object, quote: bool = True) -> str:
    """A value from a command, as a message names it: its first 64 characters."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= 64 else text[:64] + "..."


def _echo(value: object) -> object:
    """A command's value as its answer carries it: as it came, unless it is longer than
    ECHO_CHARS written out; then that much of it, as text, with a marker."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else dumps(value)
    if len(text) <= ECHO_CHARS:
        return value
    return text[:ECHO_CHARS] + f"...[{len(text) - ECHO_CHARS} more characters]"


def with_deep_check(state: NodeState, deep: str | None, settings: Settings) -> NodeState:
    """The node state the policy asks for, with the deep check's label; while it runs, a node
    the policy finds schedulable is Unschedulable, as HyperPod's is."""
    if deep is None:
        return state
    keys = settings.node_keys
    running = deep == "InProgress"
    schedulable = state.labels.get(keys.health_status_label) == str(Verdict.SCHEDULABLE)
    health = str(Verdict.UNSCHEDULABLE) if running and schedulable else None
    return relabel(state, keys, health=health, deep=deep)
