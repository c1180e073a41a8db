"""The base of the tests' in-process HTTP servers (the fake API server, the CloudWatch proxy)."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log, and no Nagle: as Go's net/http and AWS do; with
    Nagle a reply's body would wait on the client's delayed ACK (40 ms a request)."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: Any) -> None:
        return
