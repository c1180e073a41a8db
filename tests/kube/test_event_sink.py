"""Node events against the fake API server: a POST that timed out but landed is not posted
again under another name."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.kube.client import KubeClient
from agent.kube.events import KubeEventSink
from tests.kube.fake_api import FakeKubeAPI

EVENTS = r"/api/v1/namespaces/default/events"


def test_a_timed_out_post_is_one_event_not_three(api: FakeKubeAPI, kcfg: Path) -> None:
    api.fail("POST", EVENTS, 0, times=2, delay=1.0)  # created, but after the client gave up
    errors: list[str] = []

    async def main() -> KubeEventSink:
        client = KubeClient(str(kcfg), timeout=0.3)
        async with KubeEventSink(client, "node-a", on_error=errors.append) as sink:
            await sink.emit(
                {"level": "error", "msg": "GPU has fallen off the bus", "reason": "Xid"}
            )
            async with asyncio.timeout(20):
                while sink.posted == 0:
                    await asyncio.sleep(0.05)
        return sink

    sink = asyncio.run(main())
    posts = api.requests("POST", EVENTS)
    assert len(posts) >= 3 and len({p.body["metadata"]["name"] for p in posts}) == 1
    assert [e["message"] for e in api.events()] == ["GPU has fallen off the bus"]
    assert sink.posted == 1 and errors == ["event"] * (len(posts) - 1)  # the last: 409, done


def test_a_throttled_post_waits_the_servers_retry_after(api: FakeKubeAPI, kcfg: Path) -> None:
    api.fail("POST", EVENTS, 429, times=1, retry_after=1)

    async def main() -> KubeEventSink:
        client = KubeClient(str(kcfg), timeout=2.0)
        async with KubeEventSink(client, "node-a") as sink:
            await sink.emit({"level": "error", "msg": "throttled", "reason": "Xid"})
            async with asyncio.timeout(20):
                while sink.posted == 0:
                    await asyncio.sleep(0.05)
        return sink

    asyncio.run(main())
    first, second = api.requests("POST", EVENTS)[:2]
    assert first.code == 429 and second.at - first.at >= 1.0
    assert [e["message"] for e in api.events()] == ["throttled"]
