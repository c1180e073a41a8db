"""A proxy in front of moto that holds CloudWatch Logs to its real limits and misbehaves on
demand.

moto does not enforce PutLogEvents' limits (batch bytes with the 26-byte overhead, 10,000
events, chronological order, a 24-hour span, event size), so the proxy refuses a batch that
breaks one with AWS's own error (400 InvalidParameterException) and records it. On demand it
answers 400 ThrottlingException, 500/503, resets the connection, or holds a request.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from tests.httpbase import QuietHandler

PUT = "Logs_20140328.PutLogEvents"
MAX_BATCH_BYTES = 1_048_576
MAX_EVENTS = 10_000
MAX_SPAN_MS = 24 * 3600 * 1000
MAX_EVENT_BYTES = 1_048_576 - 26


def violations(body: dict[str, Any]) -> list[str]:
    """What in a PutLogEvents request CloudWatch would refuse."""
    events = body.get("logEvents") or []
    out = []
    size = sum(len(e["message"].encode()) + 26 for e in events)
    if size > MAX_BATCH_BYTES:
        out.append(f"batch of {size} bytes")
    if len(events) > MAX_EVENTS:
        out.append(f"{len(events)} events")
    stamps = [e["timestamp"] for e in events]
    if stamps != sorted(stamps):
        out.append("events not in chronological order")
    if stamps and max(stamps) - min(stamps) > MAX_SPAN_MS:
        out.append("batch spans more than 24 hours")
    if any(len(e["message"].encode()) > MAX_EVENT_BYTES for e in events):
        out.append("event too large")
    return out


def reject_by_age(body: dict[str, Any]) -> tuple[dict[str, int], bytes]:
    """As CloudWatch does one by one: events older than 14 days (tooOldLogEventEndIndex) or
    more than 2 hours ahead (tooNewLogEventStartIndex) are left out, the rest kept."""
    events = body.get("logEvents") or []
    now = time.time() * 1000
    old = [i for i, e in enumerate(events) if e["timestamp"] < now - 14 * 86400_000]
    new = [i for i, e in enumerate(events) if e["timestamp"] > now + 2 * 3600_000]
    info = {}
    if old:
        info["tooOldLogEventEndIndex"] = old[-1] + 1
    if new:
        info["tooNewLogEventStartIndex"] = new[0]
    keep = [e for i, e in enumerate(events) if i not in set(old) | set(new)]
    return info, json.dumps({**body, "logEvents": keep}).encode()


class LogsProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlparse(upstream)
        # throttle | 500 | 503 | denied | expired | reset | hold:<seconds>
        self.faults: deque[str] = deque()
        self.puts: list[dict[str, Any]] = []  # every PutLogEvents body that reached moto
        self.refused: list[str] = []
        self.inflight = threading.Event()  # a PutLogEvents is being held
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> LogsProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for body in self.puts for e in body["logEvents"]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.headers.get("X-Amz-Target", "")
                if target == PUT:
                    with proxy.lock:
                        fault = proxy.faults.popleft() if proxy.faults else None
                    if fault == "reset":
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                        self.connection.close()
                        return
                    if fault in ("throttle", "500", "503", "denied", "expired"):
                        code = 400 if fault in ("throttle", "denied", "expired") else int(fault)
                        kind = {
                            "throttle": "ThrottlingException",
                            "denied": "AccessDeniedException",
                            "expired": "ExpiredTokenException",
                            "500": "InternalFailure",
                        }.get(fault, "ServiceUnavailableException")
                        return self._answer(code, {"__type": kind, "message": "injected"})
                    if fault and fault.startswith("hold:"):
                        proxy.inflight.set()
                        time.sleep(float(fault.split(":")[1]))
                    body = json.loads(raw)
                    rejected, raw = reject_by_age(body)
                    if rejected and not json.loads(raw)["logEvents"]:  # all of them: nothing kept
                        return self._answer(200, {"rejectedLogEventsInfo": rejected})
                    if problems := violations(body):
                        with proxy.lock:
                            proxy.refused += problems
                        return self._answer(
                            400,
                            {"__type": "InvalidParameterException", "message": "; ".join(problems)},
                        )
                code, headers, data = self._forward(raw)
                if target == PUT and code == 200:
                    with proxy.lock:
                        proxy.puts.append(json.loads(raw))
                    if rejected:
                        data = json.dumps({"rejectedLogEventsInfo": rejected}).encode()
                self.send_response(code)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                up = proxy.upstream
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{up.hostname}:{up.port}"
                conn.request("POST", self.path, body=raw, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                return resp.status, resp.getheaders(), data

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                if "__type" in body:
                    self.send_header("x-amzn-ErrorType", body["__type"])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
