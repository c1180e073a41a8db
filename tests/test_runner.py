"""Each check isolated: hangs time out, exceptions are caught, the others keep running."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from agent.metrics import Metrics
from agent.runner import BATCH, CHECK_ERROR, Runner
from checks.api import Action, Finding, Status, StreamingCheck
from tests.conftest import planned
from tests.plugins.sample_checks import (
    BlockingCheck,
    BoomCheck,
    FixedCheck,
    FlakyStream,
    HangCheck,
)


class Collector:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    async def __call__(self, findings: list[Finding]) -> None:
        self.findings += findings

    def of(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]


async def serve_for(runner: Runner, seconds: float) -> None:
    task = asyncio.create_task(runner.serve())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_hanging_check_is_timed_out_while_the_others_keep_running() -> None:
    got = Collector()
    runner = Runner([planned(HangCheck), planned(FixedCheck)], got, Metrics())
    await serve_for(runner, 0.6)
    hang = got.of("hang")
    assert hang and hang[0].status is Status.UNKNOWN
    assert hang[0].reason == "CheckTimeout" and "timed out after 0.2s" in hang[0].message
    assert len(got.of("fixed")) >= 5  # kept polling every 50 ms meanwhile


async def test_raising_check_becomes_unknown_with_its_reason() -> None:
    got = Collector()
    runner = Runner([planned(BoomCheck), planned(FixedCheck)], got, Metrics())
    findings = await runner.run_round()
    boom = [f for f in findings if f.check == "boom"]
    assert [(f.status, f.condition) for f in boom] == [(Status.UNKNOWN, CHECK_ERROR)]
    assert "RuntimeError: sensor exploded" in boom[0].message
    assert [f.status for f in findings if f.check == "fixed"] == [Status.OK]


class SloppyCheck(FixedCheck):
    name = "sloppy"

    def collect(self) -> list:
        if self.polls == 0:
            self.polls += 1
            return [Finding("gpu:0", "GpuHealth", "fault", "Bad", "m", "reboot")]  # plain strings
        return [{"status": "fault"}]


async def test_plugin_findings_are_coerced_or_rejected_never_crash() -> None:
    runner = Runner([planned(SloppyCheck)], Collector(), Metrics())
    (first,) = await runner.run_round()
    assert (first.status, first.action) == (Status.FAULT, Action.REBOOT)
    (second,) = await runner.run_round()
    assert (second.status, second.reason) == (Status.UNKNOWN, "InvalidFinding")
    assert "dict instead of a Finding" in second.message


class TimelessCheck(FixedCheck):
    name = "timeless"

    def collect(self) -> list:
        bad = [float("nan"), float("inf"), 1e20, -1.0, "now"]
        self.polls += 1
        return [Finding("gpu:0", "GpuHealth", Status.FAULT, "Bad", "m", ts=bad[self.polls - 1])]


async def test_a_plugin_finding_whose_time_is_no_time_is_unknown_not_a_fault() -> None:
    """Its event could not be stamped (rfc3339 raises on NaN, inf, a year past 9999): the
    batch it was in would fail, its events and the node decision with it."""
    runner = Runner([planned(TimelessCheck)], Collector(), Metrics())
    for _ in range(5):
        (got,) = await runner.run_round()
        assert (got.status, got.reason) == (Status.UNKNOWN, "InvalidFinding"), got
        assert "time is no time" in got.message


async def test_blocking_check_never_stalls_the_event_loop() -> None:
    runner = Runner([planned(BlockingCheck)], Collector(), Metrics())
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    start = time.perf_counter()
    first = await runner.run_round()
    second = await runner.run_round()  # its thread from the first run is still sleeping
    elapsed = time.perf_counter() - start
    t.cancel()
    assert first[0].reason == "CheckTimeout"
    assert "has not returned yet" in second[0].message
    assert elapsed < 0.9 and ticks >= 10
    await asyncio.sleep(1.0)  # let the worker thread finish before the loop closes


async def test_a_check_that_decides_again_closes_its_check_error() -> None:
    got = Collector()
    runner = Runner([planned(FixedCheck)], got, Metrics(), failed={"fixed"})
    findings = await runner.run_round()
    closing = [f for f in findings if f.condition == CHECK_ERROR]
    assert [(f.status, f.reason) for f in closing] == [(Status.OK, "CheckRecovered")]
    assert not [f for f in await runner.run_round() if f.condition == CHECK_ERROR]


async def test_broken_stream_is_reported_and_restarted() -> None:
    got = Collector()
    runner = Runner([planned(FlakyStream)], got, Metrics(), stream_backoff=(0.05, 0.1))
    await serve_for(runner, 0.3)
    xids = [f for f in got.of("flaky-stream") if f.condition == "SampleXid"]
    errors = [f for f in got.of("flaky-stream") if f.condition == CHECK_ERROR]
    assert len(xids) >= 2  # restarted after the failure
    assert errors and "OSError: source went away" in errors[0].message


async def test_first_round_is_marked_when_every_polling_check_ran_once() -> None:
    runner = Runner([planned(FixedCheck), planned(BoomCheck)], Collector(), Metrics())
    task = asyncio.create_task(runner.serve())
    await asyncio.wait_for(runner.first_round.wait(), 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_metrics_count_runs_by_result() -> None:
    metrics = Metrics()
    runner = Runner([planned(BoomCheck), planned(FixedCheck)], Collector(), metrics)
    asyncio.run(runner.run_round())
    sample = metrics.registry.get_sample_value
    assert sample("node_health_check_runs_total", {"check": "boom", "result": "unknown"}) == 1
    assert sample("node_health_check_runs_total", {"check": "fixed", "result": "ok"}) == 1
    assert sample("node_health_check_success", {"check": "boom"}) == 0


class BurstStream(StreamingCheck):
    """A stream with a backlog: `n` faults ready at once, as a log file's first read is."""

    name = "burst"
    n = 5 * BATCH + 3

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        for i in range(self.n):
            yield Finding(
                f"gpu:{i % 7}", "SampleXid", Status.FAULT, "Xid13", "a line", temporary=True
            )
        await asyncio.Event().wait()  # then follows: nothing more


async def test_a_backlog_is_handled_in_bounded_batches_that_let_the_loop_run() -> None:
    calls: list[int] = []
    seen: list[int] = []  # what another task saw, each time it ran

    async def handle(findings: list[Finding]) -> None:
        calls.append(len(findings))
        await asyncio.sleep(0)  # as the daemon awaits a batch's save in a thread

    async def other() -> None:
        while True:
            seen.append(sum(calls))
            await asyncio.sleep(0)

    runner = Runner([planned(BurstStream)], handle, Metrics())
    task = asyncio.create_task(other())
    serving = asyncio.create_task(runner.serve())
    with contextlib.suppress(TimeoutError):  # the whole backlog, however loaded the machine
        async with asyncio.timeout(30):
            while sum(calls) < BurstStream.n:
                await asyncio.sleep(0.01)
    for t in (serving, task):
        t.cancel()
    await asyncio.gather(serving, task, return_exceptions=True)
    assert sum(calls) == BurstStream.n  # nothing lost
    assert 1 < len(calls) < BurstStream.n and max(calls) <= BATCH  # batches, bounded
    between = set(seen) & set(itertools.accumulate(calls))
    assert len(between) >= 3  # the loop ran between the batches, not only after them
