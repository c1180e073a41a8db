"""The daemon as it runs on a node: events, node state, restarts, SIGTERM, health endpoints."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import spooled, wait_for

LABEL = "sagemaker.amazonaws.com/node-health-status"


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    start_t = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=10)
    return time.monotonic() - start_t


def faulty(tmp_path: Path, action: str = "reboot") -> str:
    cfg = tmp_path / "faulty.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        f"  fixed:\n    status: fault\n    action: {action}\n"
        "    condition: NvidiaGPUUnhealthy\n    component: gpu:0\n"
        "    reason: XidHardwareFailure\n"
    )
    return str(cfg)


def test_fault_reaches_spool_stdout_and_node_state_and_sigterm_exits_0(cli_env, tmp_path):
    state = tmp_path / "state"
    proc = start(cli_env, "--config", faulty(tmp_path))
    wait_for(lambda: any("verdict" in e for e in spooled(state)))
    assert stop(proc) < 5
    assert proc.returncode == 0
    stdout = [json.loads(line) for line in proc.stdout.read().splitlines()]
    events = spooled(state)
    assert events == stdout  # the same events, spooled before shipping
    verdict = next(e for e in events if "verdict" in e)
    assert verdict["verdict"] == "UnschedulablePendingReboot"
    assert verdict["msg"].startswith("Encountered FaultyInstance. Reboot the Instance.")
    node = json.loads((state / "node-state.json").read_text())
    assert node["labels"][LABEL] == "UnschedulablePendingReboot"
    assert node["taints"] == [
        {"key": LABEL, "value": "UnschedulablePendingReboot", "effect": "NoSchedule"}
    ]
    gpu = next(c for c in node["conditions"] if c["type"] == "NvidiaGPUUnhealthy")
    assert (gpu["status"], gpu["reason"]) == ("True", "XidHardwareFailure")
    details = json.loads(node["annotations"]["sagemaker.amazonaws.com/fault-details"])
    assert details[0]["type"] == "NvidiaGPUUnhealthy"
    assert "agent_stopped" in proc.stderr.read()


def test_restart_keeps_the_verdict_and_reports_nothing_twice(cli_env, tmp_path):
    state = tmp_path / "state"
    cfg = faulty(tmp_path, action="replace")
    port = free_port()
    proc = start(cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}, "--config", cfg)
    wait_for(lambda: any("verdict" in e for e in spooled(state)))
    # Every check's first round in (a stop cuts short what is still being decided).
    wait_for(lambda: _answers(port) and get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
    stop(proc)
    first = len(spooled(state))
    proc = start(cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}, "--config", cfg)
    wait_for(lambda: _answers(port) and get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
    time.sleep(1.0)  # twenty more polls of the same fault
    stop(proc)
    assert len(spooled(state)) == first
    node = json.loads((state / "node-state.json").read_text())
    assert node["labels"][LABEL] == "UnschedulablePendingReplacement"


def test_sigint_also_flushes_and_exits_0(cli_env, tmp_path):
    proc = start(cli_env, "--config", faulty(tmp_path))
    wait_for(lambda: any("verdict" in e for e in spooled(tmp_path / "state")))
    stop(proc, signal.SIGINT)
    assert proc.returncode == 0


def test_dry_run_reports_but_changes_nothing_on_the_node(cli_env, tmp_path):
    state = tmp_path / "state"
    proc = start(cli_env, "--config", faulty(tmp_path), "--dry-run")
    wait_for(lambda: any("verdict" in e for e in spooled(state)))
    stop(proc)
    assert all(e["dry_run"] for e in spooled(state))
    assert not (state / "node-state.json").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_readiness_and_metrics_endpoints(cli_env, tmp_path):
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", faulty(tmp_path))
    try:
        wait_for(lambda: _answers(port))
        wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        code, body = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert 'node_health_verdict{verdict="UnschedulablePendingReboot"} 1.0' in body
        assert 'node_health_check_runs_total{check="fixed",result="fault"}' in body
        # What the alerts and the dashboard (deploy/monitoring/) read.
        assert (
            'node_health_faults_active{action="reboot",check="fixed",'
            'condition="NvidiaGPUUnhealthy",reason="XidHardwareFailure"} 1.0'
        ) in body
        assert 'node_health_check_result{check="fixed",result="fault"} 1.0' in body
        assert 'node_health_check_result{check="fixed",result="ok"} 0.0' in body
        assert "node_health_spool_limit_bytes 6.7108864e+07" in body
        assert re.search(r"^node_health_spool_bytes [1-9]", body, re.M)
        assert re.search(r'^node_health_agent_info\{instance_type="[^"]*",version="', body, re.M)
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        stop(proc)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (SigCgt in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))[7:], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_sigterm_while_starting_still_stops_cleanly(cli_env, tmp_path):
    proc = start(cli_env, "--config", faulty(tmp_path))
    # The moment the entry point catches SIGTERM, long before the daemon's own handlers: the
    # interpreter's start before that is no program's to handle (a fixed sleep raced it).
    wait_for(lambda: catches_sigterm(proc.pid), timeout=30)
    assert stop(proc) < 10
    assert proc.returncode == 0, proc.stderr.read()


DEEP = "sagemaker.amazonaws.com/deep-health-check-status"
FIX = Path(__file__).parent / "fixtures"


def node_state(state: Path) -> dict:
    try:
        return json.loads((state / "node-state.json").read_text())
    except (OSError, ValueError):
        return {}


def with_tools(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with a PATH of fake dcgmi and stress-ng (tests/bin/fake-tool) and nothing else."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dcgmi", "stress-ng"):
        (tools / tool).symlink_to(Path(__file__).parent / "bin" / "fake-tool")
    return env | {"PATH": str(tools)}


def test_deep_check_on_first_start(cli_env, tmp_path):
    """A new node runs the deep check once its first round of checks is in: a failed DCGM
    test takes it out through the policy; the result survives a restart and is not rerun."""
    env = with_tools(cli_env, tmp_path) | {
        "FAKE_DCGMI_OUTPUT": str(FIX / "dcgm" / "deployment-row-remap-pending.txt"),
        "FAKE_TOOL_CALLS": str(tmp_path / "calls"),
    }
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        "deep_check: {on_first_start: true, level: 1}\n"
    )
    state = tmp_path / "state"
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: node_state(state).get("labels", {}).get(DEEP) == "Failed", timeout=30)
    finally:
        stop(proc)
    labels = node_state(state)["labels"]
    assert labels[LABEL] == "UnschedulablePendingReboot"  # DCGM's pending row remap
    events = spooled(state)
    result = next(e for e in events if e.get("deep_health_check_status"))
    assert result["msg"].startswith("Encountered FaultyInstance. Reboot the Instance.")
    assert any(e.get("reason") == "DcgmDiagFailed" for e in events)
    # A restart keeps the label and does not run the deep check again.
    calls = (tmp_path / "calls").read_text().count("diag -r 1 -j")
    proc = start(env, "--config", str(cfg))
    time.sleep(3)  # long enough for its first round and, were it to run, the deep check
    stop(proc)
    assert "deep_check_started" not in proc.stderr.read()
    assert node_state(state)["labels"][DEEP] == "Failed"
    assert (tmp_path / "calls").read_text().count("diag -r 1 -j") == calls == 1


def test_deep_check_after_the_reboot_that_remediated_a_fault(cli_env, tmp_path, host_root):
    """Fault -> UnschedulablePendingReboot; the node reboots (a new boot id); the node stays
    out, with the deep check in progress, until it passes; then Schedulable."""
    boot_id = host_root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text("boot-1\n")
    state = tmp_path / "state"
    proc = start(cli_env, "--config", faulty(tmp_path))
    wait_for(lambda: node_state(state).get("labels", {}).get(LABEL) == "UnschedulablePendingReboot")
    stop(proc)
    boot_id.write_text("boot-2\n")
    env = with_tools(cli_env, tmp_path) | {
        "FAKE_DCGMI_OUTPUT": str(FIX / "dcgm" / "r3-3.0.4-skips-truncated.txt"),
        "FAKE_DCGMI_MODE": "hang",
        "FAKE_DCGMI_PIDFILE": str(tmp_path / "dcgmi.pid"),
    }
    cfg = tmp_path / "healed.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        "deep_check: {after_remediation: true, level: 1, deadline: 3s}\n"
    )
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: (tmp_path / "dcgmi.pid").exists(), timeout=30)
        during = node_state(state)["labels"]
        assert during == {LABEL: "Unschedulable", DEEP: "InProgress"}
        # The diag hangs past the deadline: could not judge, so no label of its own, and the
        # node is back to what the policy says.
        wait_for(lambda: DEEP not in node_state(state).get("labels", {}), timeout=30)
    finally:
        stop(proc)
    assert node_state(state)["labels"] == {LABEL: "Schedulable"}


def test_policy_asks_for_a_deep_check_and_its_findings_decide(cli_env, tmp_path):
    """A policy rule with `deep_check` (recurring application-class GPU errors) leaves the node
    Schedulable and has the daemon run the deep check; its failed DCGM test takes the node
    out."""
    env = with_tools(cli_env, tmp_path) | {
        "FAKE_DCGMI_OUTPUT": str(FIX / "dcgm" / "deployment-row-remap-pending.txt"),
    }
    cfg = tmp_path / "recurring.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        "  fixed:\n    status: fault\n    action: restart_app\n"
        "    condition: NvidiaGPUUnhealthy\n    component: gpu:0\n    reason: XidUserAppError\n"
        "deep_check: {level: 1}\n"
        "policy:\n  rules:\n    - {name: look, match: {component: 'gpu:*'}, deep_check: true}\n"
    )
    state = tmp_path / "state"
    proc = start(env, "--config", str(cfg))
    try:
        wait_for(lambda: node_state(state).get("labels", {}).get(DEEP) == "Failed", timeout=30)
    finally:
        stop(proc)
    events = spooled(state)
    wanted = next(e for e in events if e.get("reason") == "DeepCheckWanted")
    assert wanted["component"] == "gpu:0" and wanted["cause"] == "XidUserAppError"
    assert node_state(state)["labels"][LABEL] == "UnschedulablePendingReboot"


def test_a_state_dir_that_cannot_be_written_is_one_clear_error_and_detection_goes_on(
    cli_env, tmp_path
):
    # A path under a file stands for a read-only or full disk: every write there fails.
    (tmp_path / "file").write_text("")
    port = free_port()
    env = cli_env | {
        "NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}",
        "NODE_HEALTH_STATE_DIR": str(tmp_path / "file" / "state"),
    }
    proc = start(env, "--config", faulty(tmp_path))
    try:
        wait_for(lambda: _answers(port))
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200  # a restart would not mend it: the liveness probe must not fire
        assert body == (
            f"ok\nwarning: state_dir {tmp_path / 'file' / 'state'}: Not a directory: "
            "state and events are not kept on disk\n"
        )
        time.sleep(1.0)  # twenty more polls, each an event the spool cannot take
    finally:
        stop(proc)
    out, err = proc.stdout.read(), proc.stderr.read()
    assert '"reason":"XidHardwareFailure"' in out  # detected and decided all the same
    logged = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert logged.count("state_dir_unwritable") == 1
    assert logged.count("sink_emit_failed") == 1


def test_the_state_dir_problem_clears_once_it_can_be_written(tmp_path):
    from structlog.testing import capture_logs

    from agent.statedir import StateDir

    (tmp_path / "disk").write_text("")  # in the way, until a person removes it
    now = [0.0]
    probe = StateDir(tmp_path / "disk" / "state", every=60, clock=lambda: now[0])
    with capture_logs() as logs:
        assert probe.check() == "Not a directory"
        (tmp_path / "disk").unlink()
        assert probe.check() == "Not a directory"  # asked again within a minute: not probed
        now[0] = 61
        assert probe.warnings() == []
    assert [e["event"] for e in logs] == ["state_dir_unwritable", "state_dir_writable"]
    assert list((tmp_path / "disk" / "state").iterdir()) == []  # the probe leaves nothing


def test_the_same_fault_after_a_reboot_it_cost_is_a_replace_by_the_hardware_history(
    cli_env, tmp_path, host_root
):
    """The history outlives the agent and the boot: the fault that cost gpu:0 a reboot comes
    back (the policy's own escalation off) and the history rule asks for a replace; the
    node's hardware annotation counts the fault and the reboot."""
    boot_id = host_root / "proc/sys/kernel/random/boot_id"
    boot_id.parent.mkdir(parents=True, exist_ok=True)
    boot_id.write_text("boot-1\n")
    cfg = Path(faulty(tmp_path))
    cfg.write_text(
        cfg.read_text()
        + "policy:\n  rules: [{name: once, match: {component: 'gpu:*'}, escalate: false}]\n"
        + "  history: {same_fault_reboots: 1, lemon_remediations: 0}\n"
    )
    state = tmp_path / "state"
    proc = start(cli_env, "--config", str(cfg))
    wait_for(lambda: node_state(state).get("labels", {}).get(LABEL) == "UnschedulablePendingReboot")
    stop(proc)
    port = free_port()  # an agent restart, the same boot: ready once its first round is in
    proc = start(cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}, "--config", str(cfg))
    wait_for(lambda: _answers(port) and get(f"http://127.0.0.1:{port}/readyz")[0] == 200)
    stop(proc)
    assert node_state(state)["labels"][LABEL] == "UnschedulablePendingReboot"
    boot_id.write_text("boot-2\n")
    proc = start(cli_env, "--config", str(cfg))
    want = "UnschedulablePendingReplacement"
    try:
        wait_for(lambda: node_state(state).get("labels", {}).get(LABEL) == want)
    finally:
        stop(proc)
    hardware = json.loads(node_state(state)["annotations"]["node-health-agent.io/hardware"])
    [gpu] = hardware["devices"]
    assert (gpu["id"], gpu["faults"], gpu["reboots"]) == ("gpu:0", 2, 1)
    assert hardware["remediations"] == 1
    verdict = [e for e in spooled(state) if e.get("verdict") == want]
    assert "XidHardwareFailure on gpu:0 again after 1 reboots" in verdict[0]["msg"]
