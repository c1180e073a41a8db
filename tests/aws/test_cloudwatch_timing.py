"""When the CloudWatch sink ships: an event reaching an idle sink goes out at once, not after
flush_interval; what follows within flush_interval goes out together, as one batch."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.identity import Identity
from agent.metrics import Metrics
from agent.models import CloudWatchSettings
from agent.sinks.cloudwatch import CloudWatchSink
from tests.aws.conftest import aws_env
from tests.aws.proxy import LogsProxy

IDENT = Identity(node_name="n1", instance_id="i-1", cluster_name="c", cluster_id="1")


@pytest.fixture
def proxy(moto_url, monkeypatch):
    with LogsProxy(moto_url) as p:
        for k, v in aws_env(p.url).items():
            monkeypatch.setenv(k, v)
        yield p


def spool(state: Path, first: int, n: int) -> None:
    """`n` events appended to the spool, as the spool sink writes them."""
    (state / "spool").mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (state / "spool" / "0000000001.jsonl").open("a") as f:
        for i in range(first, first + n):
            f.write(json.dumps({"level": "info", "ts": now, "msg": "e", "seq": i}) + "\n")


def sink(state: Path, every: float) -> CloudWatchSink:
    settings = CloudWatchSettings(flush_interval=every)
    return CloudWatchSink(settings, IDENT, state / "spool", state / "cw.cursor", Metrics())


async def test_an_event_to_an_idle_sink_goes_out_without_waiting_for_flush_interval(
    tmp_path, proxy
):
    async with sink(tmp_path, every=3600) as cw:  # an hour: only "at once" passes
        spool(tmp_path, 0, 1)
        await cw.emit(None)  # type: ignore[arg-type]  # the event is in the spool already
        async with asyncio.timeout(30):
            while not proxy.puts:
                await asyncio.sleep(0.01)
        assert [len(p["logEvents"]) for p in proxy.puts] == [1]


async def test_a_burst_after_the_first_event_goes_out_as_one_batch(tmp_path, proxy):
    async with sink(tmp_path, every=1.0) as cw:
        spool(tmp_path, 0, 1)
        await cw.flush()  # the first, at once
        for i in range(1, 501):  # then a burst, the shipper free to run between its events
            spool(tmp_path, i, 1)
            await cw.emit(None)  # type: ignore[arg-type]
            await asyncio.sleep(0)
        await cw.flush()
    assert [len(p["logEvents"]) for p in proxy.puts] == [1, 500]
    seqs = [json.loads(e["message"])["seq"] for p in proxy.puts for e in p["logEvents"]]
    assert seqs == list(range(501))
