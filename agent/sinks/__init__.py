"""Where events go. Each sink renders and ships an event dict; none reaches back into checks.

A sink is an async context manager with `emit` and `flush`. The daemon opens them in order and
closes them in reverse; the spool comes first so an event is on disk before anything ships it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, Self

import structlog

from agent.events import Event

log = structlog.get_logger("agent.sinks")


class Sink(Protocol):
    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def emit(self, event: Event) -> None: ...

    async def flush(self) -> None: ...


class Fanout:
    """Send each event to every sink; a failing sink is logged and counted, never fatal. A
    sink failing the same way event after event (a full disk) is logged once, and again when
    it recovers; every failure is counted."""

    def __init__(self, sinks: list[Sink], on_error: Callable[[str], None] | None = None) -> None:
        self.sinks = sinks
        self.on_error = on_error
        self._failing: dict[str, str] = {}  # sink -> its last error, while it fails

    async def emit(self, event: Event, sinks: list[Sink] | None = None) -> None:
        """To every sink, or to `sinks` of them."""
        for sink in self.sinks if sinks is None else sinks:
            try:
                await sink.emit(event)
            except Exception as exc:  # a sink must never take the daemon down
                if self._failing.get(sink.name) != repr(exc):
                    log.error("sink_emit_failed", sink=sink.name, error=repr(exc))
                self._failing[sink.name] = repr(exc)
                if self.on_error is not None:
                    self.on_error(sink.name)
            else:
                if self._failing.pop(sink.name, None) is not None:
                    log.info("sink_recovered", sink=sink.name)

    async def flush(self) -> None:
        for sink in self.sinks:
            try:
                await sink.flush()
            except Exception as exc:
                log.error("sink_flush_failed", sink=sink.name, error=repr(exc))
