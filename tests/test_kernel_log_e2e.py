"""The daemon end to end: a kernel-log line on the host becomes an event and a node verdict."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FIXTURES, spooled, wait_for

LABEL = "sagemaker.amazonaws.com/node-health-status"
XID79 = "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."


def gpu_host(tmp_path: Path) -> Path:
    root = tmp_path / "gpu-host"
    shutil.copytree(FIXTURES / "hosts" / "kernel-doc", root)
    (root / "dev").mkdir()
    os.mkfifo(root / "dev/kmsg")
    (root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("8f5bd2d5-1b34-4c8b-9f0a-6b7d0c5e4e21\n")
    return root


QUIET = {f"NODE_HEALTH_CHECKS__{name}__ENABLED": "false" for name in ("HANG", "FIXED", "BROKEN")}


def kernel_agent(
    cli_env: dict[str, str], root: Path, stdout: int = subprocess.DEVNULL, **env: str
) -> subprocess.Popen[str]:
    """`node-health run` on `root` as the host, the tests' stand-in checks off; `env` more."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run"],
        env=cli_env | {"NODE_HEALTH_HOST_ROOT": str(root)} | QUIET | env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_xid_line_to_taint_and_no_repeat_after_restart(cli_env, tmp_path) -> None:
    root = gpu_host(tmp_path)
    state = tmp_path / "state"
    proc = kernel_agent(cli_env, root)
    writer = os.open(root / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    try:
        wait_for(lambda: (state / "node-state.json").exists())  # started and reconciled
        os.write(writer, f"3,812,1843308145,-;{XID79}\n".encode())
        node_state = state / "node-state.json"
        elapsed = wait_for(
            lambda: (
                LABEL in node_state.read_text() and "PendingReplacement" in node_state.read_text()
            )
        )
        assert elapsed < 1.0  # detection to (local) label: sub-second
        node = json.loads(node_state.read_text())
        assert node["taints"] == [
            {"key": LABEL, "value": "UnschedulablePendingReplacement", "effect": "NoSchedule"}
        ]
        events = spooled(state)
        xid = next(e for e in events if e.get("evidence", {}).get("xid") == "79")
        assert xid["check"] == "kernel_log" and xid["component"] == "gpu:0000:b9:00"
        assert (xid["reason"], xid["action"]) == ("XidHardwareFailure", "replace")
        assert xid["msg"].startswith(
            "NPD caught event: Node condition NvidiaGPUUnhealthy is now: True, "
            "reason: XidHardwareFailure, "
        )
        verdict = next(e for e in events if "verdict" in e)
        assert verdict["msg"].startswith("Encountered FaultyInstance. Replace the Instance.")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        os.close(writer)
    assert proc.returncode == 0, proc.stderr.read()

    def xid_and_verdicts() -> int:
        return sum(
            1 for e in spooled(state) if e.get("reason") == "XidHardwareFailure" or "verdict" in e
        )

    before = xid_and_verdicts()

    # The same boot, the record still in the buffer: a restart must not report it again.
    (root / "dev/kmsg").unlink()
    (root / "dev/kmsg").write_text(f"3,812,1843308145,-;{XID79}\n")
    proc = kernel_agent(cli_env, root, NODE_HEALTH_HTTP_LISTEN="127.0.0.1:0")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert xid_and_verdicts() == before == 2
    assert "PendingReplacement" in (state / "node-state.json").read_text()
