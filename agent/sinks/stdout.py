"""Events as JSON lines on standard output (the agent's own logs go to standard error)."""

from __future__ import annotations

import sys
from typing import Self, TextIO

from agent.events import Event, dumps


class StdoutSink:
    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()

    async def emit(self, event: Event) -> None:
        stream = self.stream or sys.stdout
        stream.write(dumps(event) + "\n")
        stream.flush()

    async def flush(self) -> None:
        (self.stream or sys.stdout).flush()
