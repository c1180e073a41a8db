"""The kernel-log check when its state file cannot be written (a full or read-only state
directory): detection goes on, the failure is counted and said once."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.conftest import spooled, wait_for
from tests.kube.test_daemon_kube import metric
from tests.test_daemon import free_port, get
from tests.test_kernel_log_e2e import gpu_host, kernel_agent

XID = "NVRM: Xid (PCI:0000:{bus:02x}:00): 79, GPU has fallen off the bus."
SAVES = 'node_health_state_save_errors_total{file="kernel-log"}'


def test_a_kernel_log_state_that_cannot_be_saved_never_stops_detection(cli_env, tmp_path):
    root, state = gpu_host(tmp_path), tmp_path / "state"
    (state / ".kernel-log.json.tmp").mkdir(parents=True)  # every save of it fails
    port = free_port()
    proc = kernel_agent(cli_env, root, NODE_HEALTH_HTTP_LISTEN=f"127.0.0.1:{port}")
    writer = os.open(root / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    try:
        wait_for(lambda: (state / "node-state.json").exists())
        buses = [0xB1, 0xB2, 0xB3]
        for seq, bus in enumerate(buses):  # one at a time: each its own save
            os.write(writer, f"3,{900 + seq},{seq}000000,-;{XID.format(bus=bus)}\n".encode())
            wait_for(
                lambda b=bus: any(
                    e.get("component") == f"gpu:0000:{b:02x}:00" for e in spooled(state)
                )
            )
        wait_for(lambda: metric(get(f"http://127.0.0.1:{port}/metrics")[1], SAVES) >= 3)
        code, body = get(f"http://127.0.0.1:{port}/healthz")
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(writer)
    err = proc.stderr.read()
    assert proc.returncode == 0, err
    assert code == 200  # a restart would not mend it: the liveness probe must not fire
    assert body == (
        f"ok\nwarning: state file {state / 'kernel-log.json'}: Is a directory: kept in memory, "
        "tried again at the next change\n"
    )
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    failed = [e for e in logged if e["event"] == "check_state_save_failed"]
    assert [e["check"] for e in failed] == ["kernel_log"]  # said once, not at every save
    assert not [e for e in logged if e["event"] == "handle_failed"]


def test_a_state_dir_under_a_file_still_leaves_the_kernel_log_check_detecting(cli_env, tmp_path):
    """A path under a file stands for a read-only or full disk: every write there fails, the
    kernel-log state's among them, and each XID is reported all the same."""
    root = gpu_host(tmp_path)
    (tmp_path / "file").write_text("")
    proc = kernel_agent(
        cli_env,
        root,
        stdout=subprocess.PIPE,
        NODE_HEALTH_STATE_DIR=str(tmp_path / "file" / "state"),
    )
    writer = os.open(root / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    try:
        for seq, bus in enumerate([0xB1, 0xB2, 0xB3]):
            os.write(writer, f"3,{900 + seq},{seq}000000,-;{XID.format(bus=bus)}\n".encode())
        time.sleep(2.0)
    finally:
        proc.terminate()
        proc.wait(10)
        os.close(writer)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    found = {json.loads(line).get("component") for line in out.splitlines()}
    assert {"gpu:0000:b1:00", "gpu:0000:b2:00", "gpu:0000:b3:00"} <= found
    assert "Traceback" not in err
