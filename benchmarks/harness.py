"""What the daemon benchmarks share: a host whose kernel log is a FIFO, the daemon's
environment on it, and waiting for a condition."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fifo_host(tmp: Path) -> Path:
    """A host root with /dev/kmsg as a FIFO (write kernel-log records into it) and a boot id."""
    root = tmp / "host"
    (root / "dev").mkdir(parents=True)
    os.mkfifo(root / "dev/kmsg")
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("bench-boot\n")
    return root


def daemon_env(tmp: Path, root: Path, node: str) -> dict[str, str]:
    """The environment without the caller's NODE_HEALTH_*, with the DaemonSet's MALLOC_*, and
    with no host tools on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_HEALTH_")}
    return (
        env
        | runtime_env()
        | {
            "NODE_HEALTH_HOST_ROOT": str(root),
            "NODE_HEALTH_STATE_DIR": str(tmp / "state"),
            "NODE_HEALTH_NODE_NAME": node,
            "PATH": str(tmp / "no-tools"),
        }
    )


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.001)


def _agent_container() -> dict:
    import yaml

    manifest = (REPO / "deploy" / "daemonset.yaml").read_text()
    spec = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "DaemonSet")
    return next(c for c in spec["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")


def daemon_command() -> list[str]:
    """`node-health run` as deploy/daemonset.yaml runs it (`python` with its flags), here."""
    agent = _agent_container()
    assert agent["command"][0] == "python", agent["command"]
    return [sys.executable, *agent["command"][1:], *agent["args"]]


def runtime_env() -> dict[str, str]:
    """The C library's settings deploy/daemonset.yaml gives the daemon (MALLOC_*)."""
    env = _agent_container()["env"]
    return {e["name"]: e["value"] for e in env if e["name"].startswith("MALLOC_")}


def compile_for_daemon() -> None:
    """Bytecode at the daemon's optimization level, as the image holds it (Dockerfile): a
    module compiled at its first import would count the compiler's memory."""
    paths = [sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"), REPO / "agent"]
    levels = ["-o", "0", "-o", "2"]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *levels, *map(str, paths), str(REPO / "checks")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_daemon(
    config: Path, env: dict[str, str], log: Path, wrap: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int]:
    """`node-health run` on `config` as deployed (under the command `wrap`, which execs it),
    its log to `log`; and the FIFO's write end."""
    agent = subprocess.Popen(
        [*wrap, *daemon_command(), "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    kmsg = os.open(Path(env["NODE_HEALTH_HOST_ROOT"]) / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    return agent, kmsg
