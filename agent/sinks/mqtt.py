"""MQTT: every event to `<prefix>/<cluster>/<node>/events` (QoS 1), a retained status to
`.../status`, a last will there so subscribers see the agent go offline, and commands from
`.../cmd` and the cluster-wide `<prefix>/<cluster>/cmd`.

While the broker is away, events wait in a bounded buffer (the oldest go first, counted) and
the client reconnects with jittered backoff; an event leaves the buffer only once the broker
acknowledged it (at-least-once). A command is handed to the agent as a dict; one that is too
big, nested too deep or not a command object is answered with a refusal, and a command whose
handling fails is logged: neither ever ends the session. Anything else that goes wrong in a
session says "offline" on the status topic and starts a new one, with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

import structlog

from agent.backoff import Backoff
from agent.events import Event, dumps, rfc3339
from agent.identity import Identity
from agent.models import MqttSettings
from agent.supervise import Supervisor

log = structlog.get_logger("agent.mqtt")

BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STATUS_EVERY = 1.0  # seconds: the retained status at most this often
MAX_COMMAND_BYTES = 4096  # a command is a few short fields; a bigger payload is not read
MAX_COMMAND_DEPTH = 8  # objects and lists inside one another
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


class MqttSink:
    name = "mqtt"

    def __init__(
        self,
        settings: MqttSettings,
        identity: Identity,
        status: Callable[[], dict[str, Any]],
        on_command: Callable[[dict[str, Any]], Awaitable[None]],
        loops: Supervisor | None = None,
    ) -> None:
        self.settings, self.status, self.on_command = settings, status, on_command
        self.loops = loops or Supervisor()  # /healthz: the session loop restarted, or dead
        cluster = identity.cluster_name or "default"
        base = f"{settings.prefix}/{cluster}"
        self.node = identity.node_name
        self.events_topic = f"{base}/{self.node}/events"
        self.status_topic = f"{base}/{self.node}/status"
        self.command_topics = [f"{base}/{self.node}/cmd", f"{base}/cmd"]
        self.buffer: collections.deque[bytes] = collections.deque()
        self.dropped = 0
        self.connected = False
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._status_due = asyncio.Event()
        self._bye, self._said_bye = asyncio.Event(), asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        # Not `stuck`-timed: a session waits on the broker for as long as it is connected.
        self._task = self.loops.task("mqtt", lambda heart: self._run(), stuck=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        """What is still buffered, then offline (retained), each try bounded on its own: a slow
        broker that takes the first try's time still hears the goodbye."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await self.flush()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    if self.connected:  # a clean stop says goodbye
                        self._bye.set()
                        self._status_due.set()
                        await self._said_bye.wait()
        finally:  # even when the caller's own deadline cut the last try short
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

    async def emit(self, event: Event) -> None:
        if len(self.buffer) >= self.settings.buffer:
            self.buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("mqtt_buffer_full_dropped_oldest", dropped_total=self.dropped)
        self.buffer.append(dumps(event).encode())
        self._drained.clear()
        self._ready.set()
        self._status_due.set()

    async def flush(self) -> None:
        """Until the broker has every event; at once while it is away (they wait in the
        buffer, and in the spool)."""
        if self.connected:
            await self._drained.wait()

    def _online(self, online: bool) -> bytes:
        doc: dict[str, Any] = {"online": online, "node": self.node, "ts": rfc3339(time.time())}
        if online:
            doc |= self.status()
        return json.dumps(doc, separators=(",", ":"), default=str).encode()

    async def _run(self) -> None:
        import aiomqtt

        s = self.settings
        tls = None
        if s.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file
            )
        will = aiomqtt.Will(self.status_topic, self._online(False), qos=1, retain=True)
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while True:
            try:
                async with aiomqtt.Client(
                    s.host or "localhost",
                    s.port,
                    username=s.username,
                    password=s.password,
                    identifier=f"node-health-{self.node}",
                    will=will,
                    keepalive=s.keepalive,
                    tls_params=tls,
                    timeout=10,
                ) as client:
                    for topic in self.command_topics:
                        await client.subscribe(topic, qos=1)
                    if not self.connected:
                        log.info("mqtt_connected", broker=f"{s.host}:{s.port}")
                    self.connected = True
                    backoff.reset()
                    # The status goes first, and only once connected is set: a stop that
                    # comes after a subscriber saw "online" is then always followed by
                    # "offline" (a clean disconnect suppresses the will).
                    self._status_due.set()
                    if self.buffer:  # what waited while the broker was away
                        self._ready.set()
                    try:
                        await self._session(client)
                    except* Exception as group:
                        if group.split(aiomqtt.MqttError)[1] is not None:
                            await self._offline(client)  # ours failed, not the connection
                        raise
            except* aiomqtt.MqttError as group:
                if backoff.failures == 0:  # said once a spell, not at every try
                    log.warning("mqtt_disconnected", error=str(group.exceptions[0]))
            except* Exception as group:  # a fault of ours: said, and a fresh session
                log.error(
                    "mqtt_session_failed", error=repr(group.exceptions[0]), retry_in=backoff.step
                )
            self.connected = False
            await asyncio.sleep(backoff.next())

    async def _session(self, client: Any) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._statuses(client))
            tg.create_task(self._publish(client))
            async for message in client.messages:
                # Only the command topics carry commands: amqtt was seen delivering our own
                # retained status here after a reconnect.
                if message.topic.value not in self.command_topics:
                    continue
                try:
                    await self._command(message.payload)
                except Exception as exc:  # the agent failed on it: the session goes on
                    log.error("mqtt_command_failed", error=repr(exc))

    async def _offline(self, client: Any) -> None:
        """Say offline before leaving a session that failed: leaving is a clean disconnect,
        after which the broker does not send the last will."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await client.publish(self.status_topic, self._online(False), qos=1, retain=True)

    async def _publish(self, client: Any) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()  # before draining: an event emitted meanwhile wakes us again
            while self.buffer:
                payload = self.buffer[0]
                await client.publish(self.events_topic, payload, qos=1)  # acknowledged (PUBACK)
                if self.buffer and self.buffer[0] is payload:
                    self.buffer.popleft()
            self._drained.set()

    async def _statuses(self, client: Any) -> None:
        """The retained status when something changed, at most every STATUS_EVERY; when the
        agent stops, offline (as the will says when it dies)."""
        while True:
            await self._status_due.wait()
            self._status_due.clear()
            online = not self._bye.is_set()
            await client.publish(self.status_topic, self._online(online), qos=1, retain=True)
            if not online:
                self._said_bye.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_EVERY):
                    await self._bye.wait()

    async def _command(self, payload: Any) -> None:
        """A command for the agent; anything unreadable is answered, never raised."""
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        try:
            cmd = parse_command(bytes(raw))
        except ValueError as exc:
            text = bytes(raw[:200]).decode(errors="replace")
            await self.on_command({"command": None, "error": str(exc), "payload": text})
            return
        await self.on_command(cmd)


def parse_command(raw: bytes) -> dict[str, Any]:
    """The command object in a payload, or a ValueError that says what is wrong with it. Size
    and nesting are bounded before parsing: a deep one would exhaust the parser's recursion."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise ValueError(f"{len(raw)} bytes, more than the {MAX_COMMAND_BYTES} a command may have")
    text = raw.decode()  # UnicodeDecodeError is a ValueError
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_COMMAND_DEPTH:
        raise ValueError(f"nested {deepest} deep, more than the {MAX_COMMAND_DEPTH} allowed")
    cmd = json.loads(text)
    if not isinstance(cmd, dict) or not isinstance(cmd.get("command"), str):
        raise ValueError('a command is a JSON object with a "command" string')
    return cmd
