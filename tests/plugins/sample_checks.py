"""Checks used by the tests: they hang, raise, block, or report what their options say."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from checks.api import Action, Finding, PollingCheck, Status, StreamingCheck


class FixedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Status = Status.OK
    action: Action = Action.NONE
    condition: str = "SampleCondition"
    component: str = "sample"
    reason: str = "SampleReason"
    script: Path | None = None  # a JSON list of statuses, one per poll (then the last repeats)


class FixedCheck(PollingCheck):
    """Reports one finding; with `script`, a different status each poll."""

    name = "fixed"
    interval = 0.05
    timeout = 5
    Options: ClassVar[type[BaseModel]] = FixedOptions
    polls = 0

    def collect(self) -> list[Finding]:
        opts: FixedOptions = self.options  # type: ignore[assignment]
        status = opts.status
        if opts.script is not None:
            steps = json.loads(opts.script.read_text())
            status = Status(steps[min(self.polls, len(steps) - 1)])
        self.polls += 1
        action = opts.action if status is Status.FAULT else Action.NONE
        return [
            Finding(
                opts.component,
                opts.condition,
                status,
                opts.reason,
                f"{opts.condition} is {status}",
                action,
            )
        ]


class HangCheck(PollingCheck):
    name = "hang"
    interval = 0.05
    timeout = 0.2

    async def poll(self) -> list[Finding]:
        await asyncio.sleep(3600)
        return []


class BlockingCheck(PollingCheck):
    """Blocks its worker thread far past its timeout."""

    name = "blocking"
    interval = 0.05
    timeout = 0.2

    def collect(self) -> list[Finding]:
        time.sleep(1.0)
        return []


class BoomCheck(PollingCheck):
    name = "boom"
    interval = 0.05
    timeout = 1

    def collect(self) -> list[Finding]:
        raise RuntimeError("sensor exploded")


class NeedsCheck(PollingCheck):
    name = "needs"
    needs_executables = ("dcgmi-not-on-this-machine",)
    needs_paths = ("/dev/nvidia-not-here",)

    def collect(self) -> list[Finding]:
        raise AssertionError("a check with missing needs must not run")


class FlakyStream(StreamingCheck):
    """Yields one temporary fault, then its source breaks."""

    name = "flaky-stream"

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        yield Finding(
            "gpu:0",
            "SampleXid",
            Status.FAULT,
            "XidUserAppError",
            "a line",
            Action.RESTART_APP,
            temporary=True,
        )
        if follow:
            raise OSError("source went away")
