"""The daemon when its state directory fails it: the node decision is still written, the
failure is logged and counted, and SIGTERM still exits 0."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.daemon import Agent
from agent.identity import Identity
from checks.api import Action, Finding, PollingCheck, Status
from tests.conftest import planned, spooled, wait_for
from tests.kube.test_daemon_kube import metric
from tests.test_daemon import LABEL, _answers, faulty, free_port, get, start, stop

CONFIG = """
checks:
  fixed: {enabled: false}
  hang: {enabled: false}
  needs: {enabled: false}
  kernel_log: {source: file}
"""
# The recorded XID 79 line (tests/fixtures/kernel/syslog), on two GPUs.
XIDS = [
    f"Jun 01 20:11:11 isaac-Predator-PO5-650 kernel: NVRM: Xid (PCI:0000:0{bus}:00): 79, "
    "GPU has fallen off the bus.\n"
    for bus in (1, 2)
]


def test_a_policy_state_that_cannot_be_saved_never_holds_the_node_state(cli_env, tmp_path):
    state = tmp_path / "state"
    (state / ".policy-state.json.tmp").mkdir(parents=True)  # every save of it fails
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", faulty(tmp_path, action="replace"))
    try:
        wait_for(lambda: (state / "node-state.json").exists())
        wait_for(lambda: any("verdict" in e for e in spooled(state)))
        wait_for(lambda: _answers(port))
        saves = 'node_health_state_save_errors_total{file="policy-state"}'
        wait_for(lambda: metric(get(f"http://127.0.0.1:{port}/metrics")[1], saves) >= 3)
        metrics = get(f"http://127.0.0.1:{port}/metrics")[1]
    finally:
        assert stop(proc) < 10
    assert proc.returncode == 0
    node = json.loads((state / "node-state.json").read_text())
    assert node["labels"][LABEL] == "UnschedulablePendingReplacement"
    # Every failed save counted; said once, not at every event (a full disk filled the log).
    assert proc.stderr.read().count("policy_state_save_failed") == 1
    assert metric(metrics, saves) >= 3
    assert not (state / "policy-state.json").exists()


def test_a_spool_that_cannot_be_written_never_holds_the_node_decision(cli_env, tmp_path):
    """A kernel-log fault, with `spool` a file in the state dir (every spool write fails): the
    node is taken out all the same, and the failure is counted and said once."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool").write_text("")
    kern = tmp_path / "host" / "var/log/kern.log"
    kern.parent.mkdir(parents=True, exist_ok=True)
    kern.write_text("")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: _answers(port))
        with kern.open("a") as fh:
            fh.writelines(XIDS)
        node = state / "node-state.json"
        wait_for(lambda: node.exists() and "PendingReplacement" in node.read_text(), 20)
        errors = 'node_health_sink_errors_total{sink="spool"}'
        wait_for(lambda: metric(get(f"http://127.0.0.1:{port}/metrics")[1], errors) >= 2)
        # The disk back: the events it refused are spooled with the next batch's, in order.
        (state / "spool").unlink()
        with kern.open("a") as fh:
            fh.write(XIDS[0].replace("0000:01:00", "0000:03:00"))
        gpus = ["gpu:0000:01:00", "gpu:0000:02:00", "gpu:0000:03:00"]
        wait_for(
            lambda: (
                [e["component"] for e in spooled(state) if "xid" in e.get("evidence", {})] == gpus
            )
        )
    finally:
        assert stop(proc) < 10
    assert proc.returncode == 0
    assert json.loads(node.read_text())["labels"][LABEL] == "UnschedulablePendingReplacement"
    stderr = proc.stderr.read()
    failed = [line for line in stderr.splitlines() if "sink_emit_failed" in line]
    assert len(failed) == 1 and '"spool"' in failed[0]
    assert "sink_recovered" in stderr


class PathEvidence(PollingCheck):
    """A plugin's fault whose evidence holds a value JSON has no type for (a Path)."""

    name = "path_evidence"
    interval = 0.05
    timeout = 5

    def collect(self) -> list[Finding]:
        return [
            Finding(
                "gpu:0",
                "PluginFault",
                Status.FAULT,
                "PluginSaysReboot",
                "the plugin found a fault",
                Action.REBOOT,
                {"log": Path("/var/log/plugin.log")},
            )
        ]


async def test_evidence_the_state_file_cannot_hold_never_stops_the_decision(settings_for):
    """The event renders any evidence (as text); the policy's state must too: a save that
    cannot serialise a tracker would lose the batch's events and the node decision."""
    settings = settings_for()
    daemon = Agent(settings, Identity("node-a"), [planned(PathEvidence)])
    task = asyncio.create_task(daemon.serve())
    node = settings.state_dir / "node-state.json"
    try:
        async with asyncio.timeout(10):
            while not (node.exists() and "PendingReboot" in node.read_text()):
                await asyncio.sleep(0.02)
    finally:
        daemon.stop()
        await task
    faults = [e for e in spooled(settings.state_dir) if e.get("reason") == "PluginSaysReboot"]
    assert [e["evidence"] for e in faults] == [{"log": "/var/log/plugin.log"}]
    saved = json.loads((settings.state_dir / "policy-state.json").read_text())
    [tracker] = [t for t in saved["trackers"] if t["check"] == "path_evidence"]
    assert tracker["evidence"] == {"log": "/var/log/plugin.log"}


def test_what_the_spool_refused_is_kept_to_a_bound_of_whole_lines() -> None:
    from agent.daemon import newest_lines

    lines = [b'{"e":%d}\n' % i for i in range(10)] + [b'{"checkpoint":{"batch":3}}\n']
    data = b"".join(lines)
    assert newest_lines(data, len(data)) == (data, 0)
    kept, lost = newest_lines(data, len(lines[-1]) + len(lines[-2]) + 3)
    assert kept == lines[-2] + lines[-1] and lost == 9  # events left out; the checkpoint kept
    assert newest_lines(data, 5) == (b"", 10)  # no whole line fits: every event counted
