"""A backlog of findings through the daemon: batches that let the loop run, one state save per
batch, nothing dropped, repeats folded into counted events."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import AsyncIterator

import agent.daemon
from agent.daemon import Agent
from agent.identity import Identity
from agent.runner import BATCH
from checks.api import Finding, Status, StreamingCheck
from tests.conftest import planned, spooled
from tests.test_daemon import free_port

BURST = 40 * BATCH
GPUS = 8
handled = 0  # findings the daemon has handled so far (the test's probe reads it)
go = threading.Event()  # the probe has had its first answer: the burst may start


class Backlog(StreamingCheck):
    """What a log's backlog yields: many XIDs, all ready at once."""

    name = "backlog"

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        while not go.is_set():
            await asyncio.sleep(0.01)
        for i in range(BURST):
            yield Finding(
                f"gpu:{i % GPUS}",
                "NvidiaXid",
                Status.FAULT,
                "Xid13",
                f"NVRM: Xid 13 line {i}",
                temporary=True,
            )
        await asyncio.Event().wait()


async def test_a_backlog_leaves_healthz_answering_saves_once_per_batch_drops_nothing(
    settings_for, monkeypatch
) -> None:
    global handled
    handled = 0
    saves: list[int] = []
    write = agent.daemon.write_atomic
    monkeypatch.setattr(agent.daemon, "write_atomic", lambda p, t: (saves.append(1), write(p, t)))
    port = free_port()
    settings = settings_for(http_listen=f"127.0.0.1:{port}")
    daemon = Agent(settings, Identity("node-a"), [planned(Backlog)])
    batches: list[int] = []
    handle = daemon.handle

    async def counting(findings: list[Finding]) -> None:
        global handled
        await handle(findings)
        batches.append(len(findings))
        handled += len(findings)

    daemon.runner.handle = counting
    answered_at: list[int] = []  # findings handled when each /healthz answer came

    def probe() -> None:
        while len(answered_at) < 1000 and handled < BURST:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30):
                    answered_at.append(handled)
                    go.set()
            except OSError:
                pass

    thread = threading.Thread(target=probe, daemon=True)
    task = asyncio.create_task(daemon.serve())
    thread.start()
    while handled < BURST:
        await asyncio.sleep(0.05)
    daemon.stop()
    await task
    thread.join(5)
    go.clear()
    assert [n for n in answered_at if 0 < n < BURST]  # answered while the backlog was handled
    assert 1 < len(batches) < BURST and max(batches) <= BATCH
    # One save at start, one per batch that changed the state, one at the stop: not per finding.
    assert len(saves) <= len(batches) + 2
    events = [e for e in spooled(settings.state_dir) if e.get("condition") == "NvidiaXid"]
    lines = sum(1 + int(e["evidence"].get("repeated", 0)) for e in events)
    assert lines == BURST  # every finding is in an event: folded, counted, none dropped
    assert len(events) <= len(batches) * GPUS  # one event per GPU per batch, not per line
