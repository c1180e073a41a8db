"""The MQTT sink's buffer while the broker is away: bounded, the oldest go first, counted."""

from __future__ import annotations

import asyncio
import json

from agent.identity import Identity
from agent.models import MqttSettings
from agent.sinks.mqtt import MqttSink


async def _nothing(cmd: dict) -> None:
    return None


def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    sink = MqttSink(
        MqttSettings(host="127.0.0.1", buffer=3), Identity(node_name="n"), dict, _nothing
    )

    async def emit_five() -> None:
        for i in range(5):
            await sink.emit({"level": "info", "msg": f"e{i}"})

    asyncio.run(emit_five())
    assert [json.loads(b)["msg"] for b in sink.buffer] == ["e2", "e3", "e4"]
    assert sink.dropped == 2
    assert sink.events_topic == "node-health/default/n/events"
