"""Exactly once across SIGKILL: the daemon killed mid-burst and restarted, twice, reports each
fault of the kernel log once: the events and the position they were read up to are committed
in one write. And killed at any point of one batch's commit (agent.commit), it reports, counts
and decides that batch once: spool, policy state, hardware history and node state as an
uninterrupted run leaves them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tests.conftest import spooled, wait_for
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


# One fault on one GPU three times (the recorded line, ten minutes apart: the kernel-log rules
# fold repeats within five), and a rule that takes three for a reboot; and a probe on another
# GPU after each, to know when the policy has taken in everything before it.
RECORDED = "Jun 01 20:{min}:11 isaac-Predator-PO5-650 kernel: NVRM: Xid (PCI:0000:{bus}:00): 79, GPU has fallen off the bus.\n"  # noqa: E501
STRIKES = [RECORDED.format(min=11 + 10 * i, bus="01") for i in range(3)]
PROBES = [RECORDED.format(min=15 + 10 * i, bus=f"0{2 + i}") for i in range(3)]
GPU = "gpu:0000:01:00"
THRICE = """
checks:
  fixed: {enabled: false}
  hang: {enabled: false}
  needs: {enabled: false}
  kernel_log: {source: file}
policy:
  rules:
    - {name: xid79-thrice, match: {xid: "79"}, count: 3, window: 1h, action: reboot}
"""
# The daemon, killed with SIGKILL at one point of the batch that holds a marker: just before or
# just after the spool's write of its events, or just after a state file's atomic replace.
KILLER = """
import os, runpy, signal, sys
from agent.sinks import spool

point, marker = os.environ["KILL_AT"].split("|", 1)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
write = spool.SpoolSink._write


def _write(self, data):
    hit = marker.encode() in data
    if hit and point == "before-spool":
        die()
    write(self, data)
    if hit and point == "spool":
        die()


replace = os.replace


def _replace(src, dst, *args, **kwargs):
    name = os.path.basename(dst)
    hit = point == name and marker.encode() in open(src, "rb").read()
    replace(src, dst, *args, **kwargs)
    if hit:
        die()


spool.SpoolSink._write, os.replace = _write, _replace
sys.argv = ["node-health", "run", "--config", sys.argv[1]]
runpy.run_module("agent", run_name="__main__")
"""


def node_label(state) -> str | None:
    try:
        node = json.loads((state / "node-state.json").read_text())
    except (OSError, ValueError):
        return None
    return node["labels"].get("sagemaker.amazonaws.com/node-health-status")


def trackers(state) -> dict[str, dict]:
    """The kernel log's trackers in the saved policy state, by component."""
    try:
        saved = json.loads((state / "policy-state.json").read_text())
    except (OSError, ValueError):
        return {}
    return {t["component"]: t for t in saved["trackers"] if t["check"] == "kernel_log"}


@pytest.mark.parametrize(
    ("point", "strike"),
    [
        (None, None),  # uninterrupted: what every killed run must end with
        ("spool", 2),  # the batch's events spooled, the policy's state not saved
        ("spool", 3),  # ... for the strike that takes the node out
        ("before-spool", 3),
        ("policy-state.json", 3),  # the policy's state saved, nothing after it
        ("hardware-history.json", 3),  # the fault in the hardware history, nothing after it
    ],
)
def test_sigkill_at_any_point_of_a_batch_reports_counts_and_decides_it_once(
    cli_env, tmp_path, point, strike
):
    state = tmp_path / "state"
    kern = tmp_path / "host" / "var/log/kern.log"
    kern.parent.mkdir(parents=True, exist_ok=True)
    kern.write_text("")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(THRICE)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    log = tmp_path / "agent.log"

    def launch(kill: str | None) -> subprocess.Popen:
        if kill is None:
            return start(cli_env, cfg, log)
        argv = [sys.executable, str(killer), str(cfg)]
        env = cli_env | {"KILL_AT": kill}
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))

    def append(line: str) -> None:
        with kern.open("a") as fh:
            fh.write(line)

    # The history holds no line: it is written once, when the third strike takes the GPU out.
    history = point == "hardware-history.json"
    marker = STRIKES[strike - 1].split(" kernel:")[0] if strike and not history else ""
    proc = launch(f"{point}|{marker}" if point else None)
    try:
        for i, (line, probe) in enumerate(zip(STRIKES, PROBES, strict=True), 1):
            append(line)
            if i == strike:
                assert proc.wait(20) == -signal.SIGKILL
                proc = launch(None)
            append(probe)
            # The probe's tracker saved: the policy has taken in everything before it.
            wait_for(lambda i=i: f"gpu:0000:0{1 + i}:00" in trackers(state), 30)
            counted = len(trackers(state)[GPU]["occurrences"])
            assert counted == i, f"strike {i} counted {counted} times in all"
            want = "UnschedulablePendingReboot" if i == 3 else "Schedulable"
            wait_for(lambda w=want: node_label(state) == w, 10)
    finally:
        stop(proc)
    assert node_label(state) == "UnschedulablePendingReboot"
    lines = Counter(
        e["evidence"]["line"] for e in spooled(state) if e.get("reason") == "XidHardwareFailure"
    )
    assert lines == Counter(line.rstrip("\n") for line in STRIKES + PROBES)  # each once
    saved = json.loads((state / "hardware-history.json").read_text())
    faults = [d for d in saved["devices"].values() if d["identity"]["component"] == GPU]
    assert [len(d["faults"]) for d in faults] == [1]  # the fault that took it out, once
