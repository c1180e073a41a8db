"""Run checks on the event loop, each isolated from the others.

A check that hangs is timed out, one that raises is caught: either becomes an `unknown` finding
with the reason, and the other checks never notice. Polling checks run every `interval`;
streaming checks are followed and restarted with backoff when their source fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import structlog

from agent.backoff import Backoff
from agent.metrics import Metrics
from agent.plan import PlannedCheck
from checks.api import Action, Finding, PollingCheck, Status, StreamingCheck

log = structlog.get_logger("agent.runner")

CHECK_ERROR = "CheckError"  # the condition of a check that could not decide
# Findings of a stream handled together: one decision, one state save, events shipped, then
# the loop's other tasks (the health endpoint, the shipper) get their turn.
BATCH = 512
Handler = Callable[[list[Finding]], Awaitable[None]]


def unknown(check: str, reason: str, message: str) -> Finding:
    return Finding(
        component="agent",
        condition=CHECK_ERROR,
        status=Status.UNKNOWN,
        reason=reason,
        message=message,
        check=check,
    )


def _valid(f: object) -> Finding:
    """A plugin's finding with its enums coerced (`"reboot"` -> Action.REBOOT), or an error."""
    if not isinstance(f, Finding):
        raise TypeError(f"{type(f).__name__} instead of a Finding")
    fields = (f.component, f.condition, f.reason, f.message)
    if not all(isinstance(v, str) for v in fields) or not f.component or not f.condition:
        raise ValueError(f"a finding without component, condition, reason or message: {f!r}")
    if not _a_time(f.ts) or not (f.clock is None or _a_time(f.clock)):
        raise ValueError(f"a finding whose time is no time (ts {f.ts!r}, clock {f.clock!r})")
    return replace(f, status=Status(f.status), action=Action(f.action), evidence=dict(f.evidence))


def _a_time(t: object) -> bool:
    """Seconds an event can carry: a NaN, an infinity or a year past 9999 fails every time
    format (rfc3339) and every window's comparison, in the middle of a batch."""
    return isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < 253402300800


class Runner:
    def __init__(
        self,
        checks: list[PlannedCheck],
        handle: Handler,
        metrics: Metrics,
        failed: set[str] | None = None,
        stream_backoff: tuple[float, float] = (1.0, 300.0),
    ) -> None:
        self.checks = [c for c in checks if c.runnable]
        for c in checks:  # said once, here; a check that cannot run is never a fault
            if c.enabled and c.error:
                log.error("check_not_loaded", check=c.name, error=c.error)
            elif c.enabled and c.missing:
                log.warning("check_skipped", check=c.name, missing=c.missing)
        self.handle = handle
        self.metrics = metrics
        self.failed = set(failed or ())  # checks whose last run could not decide
        self.stream_backoff = stream_backoff
        self.first_round = asyncio.Event()
        self._pending_first = {c.name for c in self.checks if c.interval is not None}

    async def run_round(self) -> list[Finding]:
        """Run every check once, concurrently (streaming ones over what their source holds)."""
        results = await asyncio.gather(*(self.run_one(c, follow=False) for c in self.checks))
        return [f for batch in results for f in batch]

    async def run_one(self, pc: PlannedCheck, follow: bool = False) -> list[Finding]:
        """One run of one check: its findings, or an unknown finding saying why there are none."""
        assert pc.check is not None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(pc.timeout):
                if isinstance(pc.check, PollingCheck):
                    found = list(await pc.check.poll())
                else:
                    found = [f async for f in pc.check.stream(follow=False)]
        except TimeoutError:
            found = [unknown(pc.name, "CheckTimeout", f"{pc.name} timed out after {pc.timeout:g}s")]
        except Exception as exc:
            log.warning("check_failed", check=pc.name, error=repr(exc))
            found = [unknown(pc.name, "CheckException", f"{pc.name}: {type(exc).__name__}: {exc}")]
        self.metrics.check_duration.labels(pc.name).observe(time.perf_counter() - start)
        return self._stamp(pc.name, found)

    def _stamp(self, name: str, found: list[Finding]) -> list[Finding]:
        """Name the check on each finding, and close its CheckError once it decides again."""
        try:
            found = [_valid(f) for f in found]
        except (TypeError, ValueError) as exc:
            found = [unknown(name, "InvalidFinding", f"{name} returned {exc}")]
        failed = any(f.condition == CHECK_ERROR and f.status is Status.UNKNOWN for f in found)
        result = (
            "unknown"
            if failed
            else ("fault" if any(f.status is Status.FAULT for f in found) else "ok")
        )
        self.metrics.check_runs.labels(name, result).inc()
        self.metrics.check_success.labels(name).set(0 if failed else 1)
        found = [replace(f, check=name) for f in found]
        if failed:
            self.failed.add(name)
        elif name in self.failed:
            self.failed.discard(name)
            found.append(
                Finding(
                    component="agent",
                    condition=CHECK_ERROR,
                    status=Status.OK,
                    reason="CheckRecovered",
                    message=f"{name} decides again",
                    check=name,
                )
            )
        return found

    async def serve(self) -> None:
        """Run every check until cancelled."""
        if not self._pending_first:
            self.first_round.set()
        async with asyncio.TaskGroup() as tg:
            for pc in self.checks:
                loop = self._poll_loop if pc.interval is not None else self._stream_loop
                tg.create_task(loop(pc), name=f"check:{pc.name}")

    async def _deliver(self, findings: list[Finding]) -> None:
        try:
            await self.handle(findings)
        except Exception as exc:  # the decision or a report failed: keep checking
            log.error("handle_failed", error=repr(exc))

    async def _poll_loop(self, pc: PlannedCheck) -> None:
        assert pc.interval is not None
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self._deliver(await self.run_one(pc))
            if pc.name in self._pending_first:
                self._pending_first.discard(pc.name)
                if not self._pending_first:
                    self.first_round.set()
            await asyncio.sleep(max(0.0, started + pc.interval - loop.time()))

    async def _stream_loop(self, pc: PlannedCheck) -> None:
        assert isinstance(pc.check, StreamingCheck)
        backoff = Backoff(*self.stream_backoff)
        said = ""
        while True:
            try:
                async for batch in self._batches(pc.check):
                    await self._deliver(self._stamp(pc.name, batch))
                    backoff.reset()
                reason, message = "StreamEnded", f"{pc.name}: its source ended"
            except Exception as exc:
                reason, message = "CheckException", f"{pc.name}: {type(exc).__name__}: {exc}"
                # Said once; the same failure on every retry is not news.
                (log.debug if message == said else log.warning)(
                    "stream_failed", check=pc.name, error=repr(exc), retry_in=backoff.step
                )
                said = message
            await self._deliver(self._stamp(pc.name, [unknown(pc.name, reason, message)]))
            await asyncio.sleep(backoff.next())

    @staticmethod
    async def _batches(check: StreamingCheck) -> AsyncIterator[list[Finding]]:
        """The stream's findings in batches: what it has yielded while the last batch was being
        handled, at most BATCH. A backlog is read on while a batch is decided and saved, and a
        live finding alone is handled at once. The stream's own error is raised here."""
        queue: asyncio.Queue[Finding | _End] = asyncio.Queue(BATCH)

        async def produce() -> None:
            try:
                async for finding in check.stream(follow=True):
                    await queue.put(finding)
            except Exception as exc:
                await queue.put(_End(exc))
            else:
                await queue.put(_End(None))

        producer = asyncio.create_task(produce(), name=f"stream:{check.name}")
        try:
            while True:
                items = [await queue.get()]
                while len(items) < BATCH and not queue.empty():
                    items.append(queue.get_nowait())
                end = items.pop() if isinstance(items[-1], _End) else None
                if items:
                    yield items  # type: ignore[misc]  # only the last item can be the end
                if end is not None:
                    if end.error is not None:
                        raise end.error
                    return
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class _End:
    """A stream ended, with its error if it failed."""

    error: Exception | None
