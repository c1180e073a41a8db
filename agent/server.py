"""`/healthz`, `/readyz` and `/metrics` over plain asyncio: no thread, no web framework.

A probe is a function that says why the agent is not alive (not ready), or None when it is;
the reason is the 503's body, so `curl` and `kubectl describe pod` show it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Self

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.config import ConfigError, parse_listen
from agent.metrics import Metrics

log = structlog.get_logger("agent.server")
Probe = Callable[[], str | None]
_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def serve_health(
    stack: contextlib.AsyncExitStack,
    listen: str,
    metrics: Metrics,
    live: Probe,
    ready: Probe,
    warnings: Callable[[], list[str]] = list,
) -> None:
    """Start the health server on `stack` (closed with it), unless `listen` is empty."""
    if listen:
        await stack.enter_async_context(HealthServer(listen, metrics, live, ready, warnings))


class HealthServer:
    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        live: Probe,
        ready: Probe,
        warnings: Callable[[], list[str]] = list,
    ) -> None:
        self.host, self.port = parse_listen(listen)
        self.metrics = metrics
        self.live = live
        self.ready = ready
        # Problems a restart would not mend (a full disk): said in the body, still 200, so
        # that the liveness probe does not restart the pod over and over for them.
        self.warnings = warnings
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:  # in use, no such address, not allowed: the operator's to fix
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ConfigError(
                f"http_listen: cannot listen on {self.host}:{self.port}: {why}"
            ) from None

        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http_listening", host=self.host, port=self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            code, ctype, body = self._route(method, path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {code} {_STATUS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a bad or slow client gets nothing; the agent carries on
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path in ("/healthz", "/readyz"):
            why = self.live() if path == "/healthz" else self.ready()
            if why is not None:
                return 503, text, f"{why}\n".encode()
            said = "".join(f"warning: {w}\n" for w in self.warnings())
            return 200, text, f"ok\n{said}".encode()
        return 404, text, b"not found\n"
