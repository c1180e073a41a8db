"""CloudWatch Logs, in SageMaker HyperPod's log group and streams, shipped from the spool.

Nothing is lost: `emit` only wakes the shipper; the shipper reads the spool (where every event
already is) from its cursor, and the cursor moves only after CloudWatch accepted the batch. An
outage, throttling, expired credentials or a `kill -9` lose nothing; a batch in flight at a
crash is sent again (at-least-once). Detection events go to
`SagemakerHealthMonitoringAgent/<node_group>/<instance_id>`, deep-check results to
`DeepHealthCheckResults/<id>`; group and streams are made when missing.

Retries: jittered exponential backoff on throttling, 5xx and connection errors; a batch
CloudWatch calls invalid is split until the bad event is alone, then counted as rejected and
skipped; events CloudWatch rejects one by one (too old, too new) are counted. Permanent
problems (access denied, an unknown region) are logged clearly, at most once a minute.

Timing: after an idle spell the first event goes out within IDLE_WINDOW (a first fault should
not wait for a batch to fill); once a round has shipped, the next waits until flush_interval
after it, so a burst still goes as full batches and a stream gets at most one round a
flush_interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path
from typing import Any, Self

import structlog

from agent.backoff import Backoff
from agent.events import Event
from agent.identity import Identity
from agent.metrics import Metrics
from agent.models import CloudWatchSettings
from agent.ship.batch import Batch, LogEvent, fit, parse_line, timestamp_ms
from agent.ship.spoolreader import SpoolReader
from agent.sinks.spool import is_checkpoint
from agent.supervise import Heart, Supervisor
from agent.threads import in_daemon_thread

log = structlog.get_logger("agent.cloudwatch")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 60.0
IDLE_WINDOW = 0.05  # enough for the rest of the same read to reach the spool
RETRYABLE = {
    "ThrottlingException",
    "ServiceUnavailableException",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    "ExpiredTokenException",  # the credential chain refreshes; try again
}
PERMANENT = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
}


def log_group(configured: str | None, cluster_name: str | None, cluster_id: str | None) -> str:
    """The configured group, else HyperPod's for the cluster."""
    return configured or f"/aws/sagemaker/Clusters/{cluster_name}/{cluster_id}"


def enabled(settings: CloudWatchSettings, ident: Identity) -> bool:
    if settings.enabled is not None:
        return settings.enabled
    return bool(ident.cluster_name and ident.cluster_id)


class ShipError(Exception):
    def __init__(self, code: str, message: str, retry: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.retry = code, retry


class CloudWatchSink:
    name = "cloudwatch"

    def __init__(
        self,
        settings: CloudWatchSettings,
        identity: Identity,
        spool_dir: Path,
        cursor: Path,
        metrics: Metrics,
        stream: str | None = None,
        loops: Supervisor | None = None,
    ) -> None:
        """`stream`: where events go (deep-check results aside); default the agent's own."""
        self.settings, self.identity, self.metrics = settings, identity, metrics
        self.loops = loops or Supervisor()
        self.group = log_group(settings.log_group, identity.cluster_name, identity.cluster_id)
        node_group = identity.node_group or "default"
        instance = identity.instance_id or identity.node_name
        self.stream = stream or f"SagemakerHealthMonitoringAgent/{node_group}/{instance}"
        self.reader = SpoolReader(spool_dir, cursor)
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._made: set[str] = set()  # streams known to exist
        self._said: dict[str, float] = {}  # error code -> when it was last logged
        self._unreadable: set[tuple[int, int]] = set()  # spool lines counted as unreadable

    async def __aenter__(self) -> Self:
        self._task = self.loops.task("cloudwatch-shipper", self._loop)
        self._wake.set()  # whatever the spool holds from before a restart
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):  # a last try; what is left ships after restart
                    await self.flush()
        finally:  # even when the caller's own deadline cut the last try short
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

    async def emit(self, event: Event) -> None:
        self._caught_up.clear()
        self._wake.set()

    async def flush(self) -> None:
        self._wake.set()
        await self._caught_up.wait()

    # -- the shipper ----------------------------------------------------------------------

    async def _loop(self, heart: Heart) -> None:
        clock, every = asyncio.get_running_loop().time, self.settings.flush_interval
        shipped_at = -math.inf  # when the last round that shipped anything ended
        while True:
            await self._wake.wait()
            due = max(clock() + min(IDLE_WINDOW, every), shipped_at + every)
            await asyncio.sleep(due - clock())  # idle: at once; in a burst: let the batch fill
            self._wake.clear()
            while batches := await asyncio.to_thread(self._batches):
                for batch in batches:
                    await self._ship(batch, heart)
                shipped_at = clock()
            self.metrics.cw_spool_depth.set(await asyncio.to_thread(self.reader.depth))
            self.metrics.cw_lag.set(0)
            if not self._wake.is_set():
                self._caught_up.set()
            heart.done()

    def _batches(self, limit: int = 64) -> list[Batch]:
        """The next batches after the cursor, each one stream's, in spool order."""
        out: list[Batch] = []
        skipped: tuple[int, int] | None = None
        for line, end in self.reader.lines():
            event = parse_line(line)
            if event is None:  # a line a crash cut short: nothing to send
                if end not in self._unreadable:  # read again until the cursor passes it
                    self._unreadable.add(end)
                    log.warning("spool_line_unreadable", at=end)
                    self.metrics.cw_rejected.inc()
                skipped = end
                continue
            if is_checkpoint(event):  # where a check resumes: the agent's, not an event
                skipped = end
                continue
            stream = self.stream
            run = event.get("deep_health_check_id")
            if run and "deep_health_check_status" in event and "level" in event:
                stream = f"DeepHealthCheckResults/{run}"
            text = fit(event, line.decode(errors="replace").rstrip("\n"))
            ev = LogEvent(timestamp_ms(event), text, stream, end)
            if not out or not out[-1].fits(ev):
                if len(out) == limit:
                    break
                out.append(Batch(stream))
            out[-1].add(ev)
        if not out and skipped is not None:  # only unreadable lines left: step past them
            self.reader.commit(skipped)
            self._unreadable.clear()
        return out

    async def _ship(self, batch: Batch, heart: Heart) -> None:
        """Until CloudWatch took `batch` (or refused it for good). While it has not, the backlog
        metrics say so: the spool's depth and the age of its oldest unshipped event grow."""
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX, spread=(0.5, 1.0))
        oldest = min(e.timestamp for e in batch.events) / 1000
        while True:
            heart.busy()
            self.metrics.cw_spool_depth.set(await asyncio.to_thread(self.reader.depth))
            self.metrics.cw_lag.set(max(0.0, time.time() - oldest))
            try:
                rejected = await in_daemon_thread(self._put, batch)
                break
            except ShipError as exc:
                if not exc.retry and len(batch.events) > 1:  # invalid: find the bad event
                    half = len(batch.events) // 2
                    for part in (batch.events[:half], batch.events[half:]):
                        sub = Batch(batch.stream)
                        for ev in part:
                            sub.add(ev)
                        await self._ship(sub, heart)
                    return
                if not exc.retry:
                    log.error("cloudwatch_event_rejected", error=str(exc))
                    self.metrics.cw_rejected.inc()
                    rejected = 0
                    break
                self._say(exc)
                self.metrics.cw_retries.inc()
                self.metrics.sink_errors.labels(self.name).inc()
                heart.done()  # waiting out an outage is not being stuck
                await asyncio.sleep(backoff.next())
        await asyncio.to_thread(self.reader.commit, batch.end)
        shipped = len(batch.events) - rejected
        self.metrics.cw_shipped.inc(shipped)
        self.metrics.cw_rejected.inc(rejected)
        self.metrics.cw_batches.inc()

    def _say(self, exc: ShipError) -> None:
        """A clear error, once a minute per kind: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._said.get(exc.code, -1e9) >= 60:
            self._said[exc.code] = now
            hint = (
                " (check the role's logs:PutLogEvents permission)" if exc.code in PERMANENT else ""
            )
            log.error("cloudwatch_ship_failed", error=str(exc) + hint, group=self.group)

    # -- AWS (in a thread) ----------------------------------------------------------------

    def _logs(self) -> Any:
        if self._client is None:
            from botocore.config import Config

            from agent.ship.aws import logs_client

            timeout = self.settings.request_timeout
            cfg = Config(
                retries={"max_attempts": 1, "mode": "standard"},  # our backoff, not botocore's
                connect_timeout=timeout,
                read_timeout=timeout,
            )
            region = self.settings.region or self.identity.region
            self._client = logs_client(region, cfg)
        return self._client

    def _put(self, batch: Batch) -> int:
        """PutLogEvents; the number of events CloudWatch rejected one by one."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._logs()
        try:
            if batch.stream not in self._made:
                self._make(client, batch.stream)
            answer = client.put_log_events(**batch.request(self.group))
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, status = err.get("Code", "Unknown"), exc.response.get("ResponseMetadata", {})
            if code == "ResourceNotFoundException":
                self._made.discard(batch.stream)  # deleted under us: make it again
                raise ShipError(code, err.get("Message", ""), retry=True) from None
            http = status.get("HTTPStatusCode") or 0
            retry = code in RETRYABLE or code in PERMANENT or http >= 500 or http == 429
            raise ShipError(code, err.get("Message", ""), retry) from None
        except BotoCoreError as exc:  # no connection, a timeout, no credentials
            raise ShipError(type(exc).__name__, str(exc), retry=True) from None
        info = answer.get("rejectedLogEventsInfo") or {}
        n = len(batch.events)
        bad = set()
        if (i := info.get("tooNewLogEventStartIndex")) is not None:
            bad |= set(range(i, n))
        # The API reference: tooNewLogEventStartIndex is inclusive, tooOldLogEventEndIndex
        # exclusive (the events before it); expiredLogEventEndIndex is read the same way.
        for key in ("tooOldLogEventEndIndex", "expiredLogEventEndIndex"):
            if (i := info.get(key)) is not None:
                bad |= set(range(0, i))
        if bad:
            log.warning("cloudwatch_events_rejected", count=len(bad), info=info)
        return len(bad)

    def _make(self, client: Any, stream: str) -> None:
        for call, kw in (
            (client.create_log_group, {"logGroupName": self.group}),
            (client.create_log_stream, {"logGroupName": self.group, "logStreamName": stream}),
        ):
            with contextlib.suppress(client.exceptions.ResourceAlreadyExistsException):
                call(**kw)
        self._made.add(stream)
