"""Exactly once across SIGKILL: the daemon killed mid-burst and restarted, twice, reports each
fault of the kernel log once: the events and the position they were read up to are committed
in one write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from tests.conftest import wait_for
from tests.test_daemon import stop

LINE = "Jun 11 09:44:44 gpu-7 kernel: NVRM: Xid (PCI:0000:{bus:02x}:{dev:02x}): 79, GPU has fallen off the bus.\n"  # noqa: E501
FAULTS = [LINE.format(bus=b, dev=d) for b in range(250) for d in range(4)]
CONFIG = """
checks:
  fixed: {enabled: false}
  hang: {enabled: false}
  needs: {enabled: false}
  kernel_log: {source: file}
"""


def start(env: dict[str, str], cfg, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,  # a thousand events: no pipe to fill
        stderr=log.open("a"),
    )


def xids(state) -> Counter:
    """The XID events in the spool, but for a line being written as we read."""
    events = []
    for seg in sorted((state / "spool").glob("*.jsonl")):
        events += [json.loads(line) for line in seg.read_bytes().split(b"\n")[:-1]]
    return Counter(
        e["component"]
        for e in events
        if e.get("reason") == "XidHardwareFailure" and e["evidence"].get("xid") == "79"
    )


def test_sigkill_mid_burst_and_restart_reports_each_fault_exactly_once(cli_env, tmp_path):
    state, root = tmp_path / "state", cli_env["NODE_HEALTH_HOST_ROOT"]
    kern = tmp_path / "host" / "var/log/kern.log"
    assert str(kern).startswith(root)
    kern.parent.mkdir(parents=True, exist_ok=True)
    kern.write_text("")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)

    def burst() -> None:  # a quarter of the faults at a time, as a flood comes
        for i in range(4):
            with kern.open("a") as fh:
                fh.writelines(FAULTS[i * 250 : (i + 1) * 250])
            time.sleep(0.3)

    writer = threading.Thread(target=burst)
    proc = start(cli_env, cfg, tmp_path / "agent.log")
    writer.start()
    try:
        for seen in (30, 400):  # killed twice, each time while events are being spooled
            wait_for(lambda s=seen: sum(xids(state).values()) >= s, 60)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start(cli_env, cfg, tmp_path / "agent.log")
        writer.join()
        wait_for(lambda: len(xids(state)) == len(FAULTS), 60)
    finally:
        stop(proc)
    counts = xids(state)
    assert len(counts) == len(FAULTS)  # none lost
    assert [c for c, n in counts.items() if n > 1] == []  # none twice
