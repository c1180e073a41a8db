"""XIDs through NVML's event API, next to the kernel log.

A container that cannot read the host's kernel log still sees XIDs this way, and a kernel
log that lost records (ring-buffer overrun) is backed up. Each event is judged as the kernel
log's line for it would be (`NVRM: Xid (PCI:...): N, ...` through the same rules), so both
sources give the same finding; the policy counts the same fault reported by both once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from pydantic import BaseModel

from checks.api import CheckContext, Finding, StreamingCheck
from checks.kernel_log import rules as rules_module
from checks.kernel_log.classifier import Classifier
from checks.nvidia import nvml


class NvmlXidCheck(StreamingCheck):
    name = "nvml_xid"
    description = "critical XIDs through NVML's event API, judged by the kernel-log rules"

    def __init__(
        self,
        ctx: CheckContext,
        options: BaseModel | None = None,
        events: Callable[[], nvml.XidEvents] = nvml.PynvmlXidEvents,
    ) -> None:
        super().__init__(ctx, options)
        self.events = events
        self._classifier: Classifier | None = None

    def missing(self) -> list[str]:
        return nvml.missing_driver(lambda: self.events().close())

    def judge(self, event: nvml.XidEvent) -> Finding | None:
        if self._classifier is None:
            self._classifier = Classifier(rules_module.build())
        line = f"NVRM: Xid (PCI:{event.pci}): {event.xid}, reported through NVML's event API"
        return self._classifier.record(line, None)

    async def stream(self, follow: bool = True) -> AsyncIterator[Finding]:
        if not follow:  # events only come as they happen: nothing to read back
            return
        source = await asyncio.to_thread(self.events)
        waiting: asyncio.Future[nvml.XidEvent | None] | None = None
        try:
            while True:
                waiting = asyncio.ensure_future(asyncio.to_thread(source.wait, 1.0))
                event = await asyncio.shield(waiting)
                if event is not None and (f := self.judge(event)) is not None:
                    yield replace(f, evidence={**f.evidence, "source": "nvml"})
        finally:
            if waiting is not None and not waiting.done():
                await asyncio.wait([waiting])  # never free the event set under a waiting call
            await asyncio.to_thread(source.close)
