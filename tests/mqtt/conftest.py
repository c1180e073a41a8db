"""A real MQTT broker per test: mosquitto where it is installed, amqtt (pip) otherwise."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(
        self, workdir: Path, users: dict[str, str] | None = None, tls: bool = False
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.users, self.tls = users, tls
        self.proc: subprocess.Popen | None = None
        # TEST_MQTT_BROKER=amqtt tries the fallback where mosquitto is installed too.
        wanted = os.environ.get("TEST_MQTT_BROKER")
        self.kind = wanted or ("mosquitto" if self._mosquitto() else "amqtt")

    @staticmethod
    def _mosquitto() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
            None,
        )

    def start(self) -> None:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            # As the user running the tests: mosquitto started as root would switch to its own
            # user, who cannot read the test's files.
            text = f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\npersistence false\n"
            if self.users:
                pw = self.workdir / "passwords"
                for i, (user, password) in enumerate(self.users.items()):
                    flags = ["-b", "-c"] if i == 0 else ["-b"]
                    subprocess.run(
                        ["mosquitto_passwd", *flags, str(pw), user, password], check=True
                    )
                text += f"allow_anonymous false\npassword_file {pw}\n"
            else:
                text += "allow_anonymous true\n"
            if self.tls:
                ca, cert, key = make_certs(self.workdir)
                text += f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
            conf.write_text(text)
            argv = [self._mosquitto(), "-c", str(conf)]
        else:
            conf = self.workdir / "amqtt.yaml"
            conf.write_text(
                f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            amqtt = Path(sys.executable).with_name("amqtt")
            argv = [str(amqtt), "-c", str(conf)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < end, f"{self.kind} did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed (openssl)."""
    ca_key, ca, key, csr, cert = (
        d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    ssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return ca, cert, key
