"""Node identity from settings and IMDSv2 (a fake on loopback), never from off-AWS hosts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from agent.identity import resolve

TOKEN = "AQAEAFake-token=="
METADATA = {
    "/latest/meta-data/instance-id": "i-0a1b2c3d4e5f67890",
    "/latest/meta-data/instance-type": "p5.48xlarge",
    "/latest/meta-data/placement/region": "us-east-2",
}


class FakeImds(BaseHTTPRequestHandler):
    """IMDSv2 as documented: PUT for a token (TTL header required), GETs need the token."""

    requests: ClassVar[list[str]] = []

    def do_PUT(self) -> None:
        self.requests.append(f"PUT {self.path}")
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self._reply(400, "")
        else:
            self._reply(200, TOKEN)

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self._reply(401, "")
        elif self.path in METADATA:
            self._reply(200, METADATA[self.path])
        else:
            self._reply(404, "")

    def _reply(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    FakeImds.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def ec2_dmi(host_root: Path) -> None:
    dmi = host_root / "sys/devices/virtual/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("Amazon EC2\n")


def test_settings_win_and_imds_fills_the_rest(settings_for, host_root, imds) -> None:
    ec2_dmi(host_root)
    s = settings_for(imds="auto", imds_endpoint=imds, instance_type="p4d.24xlarge", region=None)
    ident = resolve(s)
    assert ident.instance_id == "i-0a1b2c3d4e5f67890"
    assert ident.instance_type == "p4d.24xlarge"  # from the settings, not asked
    assert ident.region == "us-east-2"
    assert "GET /latest/meta-data/instance-type" not in FakeImds.requests


def test_auto_off_ec2_sends_nothing(settings_for, imds) -> None:
    ident = resolve(settings_for(imds="auto", imds_endpoint=imds, instance_type=None))
    assert ident.instance_type is None and FakeImds.requests == []


def test_absent_imds_is_silent_and_quick(settings_for) -> None:
    start = time.monotonic()
    ident = resolve(
        settings_for(imds="on", imds_endpoint="http://127.0.0.1:9", region=None, imds_timeout=0.5)
    )
    assert ident.region is None and ident.node_name == "node-a"
    assert time.monotonic() - start < 2


def test_node_name_comes_from_the_downward_api_variable(monkeypatch) -> None:
    monkeypatch.setenv("NODE_NAME", "ip-10-1-2-3.ec2.internal")
    from agent.config import load_settings

    assert resolve(load_settings(None, imds="off")).node_name == "ip-10-1-2-3.ec2.internal"
