"""The loop supervisor: a loop that raises is started again, and the health endpoint fails
while one crash-loops, has ended or is stuck."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent import supervise
from agent.metrics import Metrics
from agent.server import HealthServer
from agent.supervise import Heart, Supervisor


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(supervise, "BACKOFF_MIN", 0.01)


async def healthz(loops: Supervisor) -> tuple[int, str]:
    probe = lambda: "; ".join(loops.problems()) or None  # noqa: E731
    async with HealthServer("127.0.0.1:0", Metrics(), probe, lambda: None) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = (await reader.read()).decode()
        writer.close()
    head, _, body = answer.partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_a_crashing_task_is_restarted_and_reported_until_it_recovers():
    runs: list[int] = []

    async def body(heart: Heart) -> None:
        runs.append(1)
        if len(runs) <= 3:
            raise KeyError("metadata")
        heart.done()
        await asyncio.Event().wait()

    async def main() -> None:
        loops = Supervisor()
        task = loops.task("node-watch", body)
        while len(runs) < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)
        code, text = await healthz(loops)
        assert code == 503 and "node-watch: crashed 3 times in a row (KeyError('metadata'))" in text
        while len(runs) < 4:
            await asyncio.sleep(0.01)
        assert await healthz(loops) == (200, "ok\n")
        task.cancel()

    asyncio.run(main())


def test_a_thread_loop_is_restarted_until_stopped():
    stop = threading.Event()
    runs: list[int] = []

    def body(heart: Heart) -> None:
        runs.append(1)
        if len(runs) < 5:
            raise RuntimeError("boom")
        heart.done()
        stop.set()

    loops = Supervisor()
    loops.thread("watch", body, stop).join(5)
    assert len(runs) == 5 and loops.problems() == []


def test_a_loop_busy_past_its_limit_is_stuck_and_one_that_returns_has_ended():
    now = [0.0]
    loops = Supervisor(clock=lambda: now[0])
    heart = loops.heart("node-writer", stuck=60)
    heart.busy()
    now[0] = 30
    assert loops.problems() == []
    now[0] = 61
    assert loops.problems() == ["node-writer: stuck for 61s"]
    heart.done()
    assert loops.problems() == []

    async def returns(heart: Heart) -> None:
        return None

    async def main() -> None:
        await loops.task("shipper", returns)

    asyncio.run(main())
    assert loops.problems() == ["shipper: ended (returned)"]
