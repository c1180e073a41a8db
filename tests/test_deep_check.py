"""`node-health deep-check` on a node whose tools are fakes replaying real outputs
(tests/bin/fake-tool; outputs from tests/fixtures/dcgm and tests/fixtures/nccl)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import deepcheck
from tests.conftest import wait_for, whole_table
from tests.test_cli import node_health

BIN = Path(__file__).parent / "bin"
FIXTURES = Path(__file__).parent / "fixtures"
HEALTH = "sagemaker.amazonaws.com/node-health-status"
DEEP = "sagemaker.amazonaws.com/deep-health-check-status"
P5 = ("--instance-type", "p5.48xlarge")


@pytest.fixture
def node(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with dcgmi, all_reduce_perf and stress-ng on PATH, all passing."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dcgmi", "all_reduce_perf", "stress-ng"):
        (tools / tool).symlink_to(BIN / "fake-tool")
    return cli_env | {
        "PATH": str(tools),
        "FAKE_DCGMI_OUTPUT": str(whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt")),
        "FAKE_ALL_REDUCE_PERF_OUTPUT": str(FIXTURES / "nccl" / "p5-2node-mpirun.txt"),
        "FAKE_TOOL_CALLS": str(tmp_path / "calls"),
    }


def deep_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return node_health(env, "deep-check", *args, timeout=60)


def node_state(env: dict[str, str]) -> dict:
    return json.loads((Path(env["NODE_HEALTH_STATE_DIR"]) / "node-state.json").read_text())


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_healthy_node_passes(node: dict[str, str], tmp_path: Path) -> None:
    out = deep_check(node, *P5)
    assert out.returncode == 0, out.stderr
    *tests, result = lines(out.stdout)
    assert [(t["test"], t["result"]) for t in tests] == [
        ("stress-ng", "passed"),
        ("dcgm-diag", "passed"),
        ("nccl-allreduce", "passed"),
    ]
    assert result["deep_health_check_status"] == "Passed"
    assert result["msg"].startswith("Deep health check passed.")
    state = node_state(node)
    assert state["labels"] == {HEALTH: "Schedulable", DEEP: "Passed"}
    assert state["taints"] == []
    calls = (tmp_path / "calls").read_text()
    assert "diag -r 2 -j" in calls and "-g 8" in calls  # p5.48xlarge: 8 GPUs
    # The on-node log of the run: one line per test and the result.
    [log] = (Path(node["NODE_HEALTH_STATE_DIR"]) / "deep-health-check").glob("*.jsonl")
    assert lines(log.read_text())[-1]["deep_health_check_id"] == log.stem


def test_a_failed_dcgm_test_fails_the_node_with_its_action(
    node: dict[str, str], tmp_path: Path
) -> None:
    node["FAKE_DCGMI_OUTPUT"] = str(whole_table(tmp_path, "r2-gpu-memory-fail.txt"))
    node["FAKE_DCGMI_RC"] = "226"
    out = deep_check(node, *P5, "--level", "3")
    assert out.returncode == 1
    result = lines(out.stdout)[-1]
    assert result["msg"].startswith("Encountered FaultyInstance. Replace the Instance.")
    assert "GPU Memory failed on GPU 0" in result["msg"]
    assert node_state(node)["labels"] == {HEALTH: "UnschedulablePendingReplacement", DEEP: "Failed"}


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("killed", "dcgmi was killed by SIGKILL"),
        ("orphan", "dcgmi left a process behind that held its output"),
    ],
)
def test_a_failed_dcgm_output_from_a_run_that_did_not_finish_is_unknown(
    node: dict[str, str], mode: str, why: str
) -> None:
    """The same failing report, but dcgmi was killed (the OOM killer) or left a child holding
    its output: what it printed may be cut short, and is not evidence."""
    node["FAKE_DCGMI_OUTPUT"] = str(FIXTURES / "dcgm" / "r2-gpu-memory-fail.txt")
    node["FAKE_DCGMI_MODE"] = mode
    out = deep_check(node, *P5, "--level", "3")
    assert out.returncode == 2
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert (tests["dcgm-diag"]["result"], tests["dcgm-diag"]["message"]) == ("unknown", why)
    assert node_state(node)["labels"] == {}  # the node as it was: nothing judged


def test_low_nccl_bandwidth_is_reported_in_hyperpods_words(node: dict[str, str]) -> None:
    node["FAKE_ALL_REDUCE_PERF_OUTPUT"] = str(FIXTURES / "nccl" / "p4de-2node-srun.txt")
    # This table has no summary lines: our own run must end with one, so it proves nothing.
    out = deep_check(node, *P5)
    assert out.returncode == 2
    assert lines(out.stdout)[-1]["msg"].startswith("Encountered UnknownError.")


def test_a_diagnostic_that_crashed_is_unknown_and_labels_go_back(node: dict[str, str]) -> None:
    before = {
        "labels": {HEALTH: "Schedulable", "team": "a"},
        "taints": [],
        "annotations": {},
        "conditions": [],
    }
    state_dir = Path(node["NODE_HEALTH_STATE_DIR"])
    state_dir.mkdir(parents=True)
    (state_dir / "node-state.json").write_text(json.dumps(before))
    node["FAKE_DCGMI_MODE"] = "garbage"
    node["FAKE_DCGMI_RC"] = "226"
    out = deep_check(node, *P5)
    assert out.returncode == 2
    tests = {t["test"]: t["result"] for t in lines(out.stdout)[:-1]}
    assert tests["dcgm-diag"] == "unknown"
    assert node_state(node) == before


def test_dcgm_json_of_the_wrong_shape_is_unknown_and_the_record_ends(
    node: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "dcgmi.json"
    bad.write_text(json.dumps({"metadata": "4.2.3", "DCGM GPU Diagnostic": {}}))
    node["FAKE_DCGMI_OUTPUT"] = str(bad)
    out = deep_check(node, *P5)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert {t["test"]: t["result"] for t in lines(out.stdout)[:-1]}["dcgm-diag"] == "unknown"
    [log] = (Path(node["NODE_HEALTH_STATE_DIR"]) / "deep-health-check").glob("*.jsonl")
    assert lines(log.read_text())[-1]["deep_health_check_status"] == "Unknown"


def test_an_internal_error_ends_the_record_and_puts_labels_back(node: dict[str, str]) -> None:
    # Whatever fails in our own code, the run's record must not stay InProgress.
    code = (
        "import sys, agent.deepcheck as d\n"
        "def boom(*a, **k): raise RuntimeError('kaboom')\n"
        "d.verdict = boom\n"
        "sys.argv = ['node-health', 'deep-check', '--instance-type', 'p5.48xlarge']\n"
        "from agent.entry import main; main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=node, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "deep check stopped: internal error: RuntimeError: kaboom" in out.stderr
    [log] = (Path(node["NODE_HEALTH_STATE_DIR"]) / "deep-health-check").glob("*.jsonl")
    last = lines(log.read_text())[-1]
    assert last["deep_health_check_status"] == "Unknown" and "kaboom" in last["msg"]
    assert node_state(node)["labels"].get(DEEP) != "InProgress"


@pytest.mark.parametrize(
    ("rc", "result", "code"),
    [(2, "failed", 1), (3, "unknown", 2)],  # stress-ng.h: 2 a stressor failed, 3 no resources
)
def test_stress_ng_exit_status(node: dict[str, str], rc: int, result: str, code: int) -> None:
    node["FAKE_STRESS_NG_RC"] = str(rc)
    out = deep_check(node, *P5)
    assert out.returncode == code
    assert lines(out.stdout)[0] == lines(out.stdout)[0] | {"test": "stress-ng", "result": result}


def test_missing_tools_are_skipped_and_nothing_run_is_not_a_pass(
    cli_env: dict[str, str],
) -> None:
    out = deep_check(cli_env, *P5, "--suite", "all")
    assert out.returncode == 2
    *tests, result = lines(out.stdout)
    assert {t["result"] for t in tests} == {"skipped"}
    assert "dcgmi not found" in {t["message"] for t in tests}
    assert result["deep_health_check_status"] == "Unknown"


def test_dry_run_changes_no_label(node: dict[str, str]) -> None:
    out = deep_check(node, *P5, "--dry-run")
    assert out.returncode == 0
    assert not (Path(node["NODE_HEALTH_STATE_DIR"]) / "node-state.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_labels_while_running_then_ctrl_c_stops_every_child(
    node: dict[str, str], tmp_path: Path, sig: int
) -> None:
    pidfile = tmp_path / "dcgmi.pid"
    node |= {"FAKE_DCGMI_MODE": "hang", "FAKE_DCGMI_PIDFILE": str(pidfile)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "deep-check", *P5],
        env=node,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30)
        assert node_state(node)["labels"] == {HEALTH: "Unschedulable", DEEP: "InProgress"}
        assert node_state(node)["taints"][0]["value"] == "Unschedulable"
        child = int(pidfile.read_text())
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "stopped" in proc.stderr.read()
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10)
    assert node_state(node)["labels"] == {}


def test_the_deadline_stops_a_hung_test(node: dict[str, str]) -> None:
    node["FAKE_DCGMI_MODE"] = "hang"
    start = time.monotonic()
    out = deep_check(node, *P5, "--deadline", "3s")
    assert out.returncode == 2 and time.monotonic() - start < 30
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert tests["dcgm-diag"]["result"] == "unknown"
    assert "timed out" in tests["dcgm-diag"]["message"]
    assert tests["nccl-allreduce"]["result"] == "skipped"


def test_on_a_terminal_progress_and_a_summary_table(node: dict[str, str]) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "deep-check", *P5],
        env=node,
        stdout=secondary,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data.decode())
    proc.wait(timeout=30)
    os.close(primary)
    screen = "".join(chunks)
    assert proc.returncode == 0
    assert "dcgm-diag running" in proc.stderr.read()
    assert "TEST" in screen and "RESULT" in screen and "nccl-allreduce" in screen
    assert "deep-health-check-status: Passed" in screen


def test_plan_without_tools_or_gpus() -> None:
    steps, skipped = deepcheck.plan(deepcheck.Options(), which=lambda tool: None)
    assert steps == []
    assert {s.name: s.message for s in skipped} == {
        "stress-ng": "stress-ng not found",
        "dcgm-diag": "dcgmi not found",
        "nccl-allreduce": "no GPU count (--gpus or a known type)",
    }


def test_on_a_neuron_type_dcgm_is_skipped_though_installed() -> None:
    """The deep-check image carries dcgmi for every node: on Trainium it would only fail to
    find GPUs, and that unknown would keep the node from ever passing."""
    opts = deepcheck.Options(instance_type="trn1.32xlarge")
    steps, skipped = deepcheck.plan(opts, which=lambda tool: f"/usr/bin/{tool}")
    assert [s.name for s in steps] == ["stress-ng", "nccom-test"]
    assert {s.name: s.message for s in skipped}["dcgm-diag"] == "no GPUs on a Neuron type"
    steps, _ = deepcheck.plan(deepcheck.Options(), which=lambda tool: f"/usr/bin/{tool}")
    assert "dcgm-diag" in [s.name for s in steps]  # an unknown type: run it


@pytest.mark.parametrize(
    ("rc", "result", "code"),
    [(0, "passed", 0), (1, "failed", 1)],
)
def test_suite_all_adds_efa_devices_and_loopback(
    node: dict[str, str], tmp_path: Path, rc: int, result: str, code: int
) -> None:
    tools = Path(node["PATH"])
    for tool in ("fi_info", "fi_pingpong"):
        (tools / tool).symlink_to(BIN / "fake-tool")
    node |= {
        "FAKE_FI_INFO_OUTPUT": str(FIXTURES / "efa" / "fi_info-p4de-4-devices.txt"),
        "FAKE_FI_PINGPONG_OUTPUT": str(FIXTURES / "efa" / "fi_pingpong-client-2node-cut.txt"),
        "FAKE_FI_PINGPONG_RC": str(rc),
    }
    if rc:  # a failing fi_pingpong prints no table
        node["FAKE_FI_PINGPONG_OUTPUT"] = str(FIXTURES / "efa" / "fi_info-no-efa.txt")
    out = deep_check(node, "--instance-type", "p4de.24xlarge", "--suite", "all", "--gpus", "8")
    assert out.returncode == code, out.stdout
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert tests["efa-devices"]["result"] == "passed"
    assert tests["efa-loopback"]["result"] == result
    calls = (tmp_path / "calls").read_text()
    assert calls.count("fi_pingpong -e rdm -p efa -d") == 8  # server and client, 4 devices
    assert tests["efa-loopback"]["message"].startswith(
        "EFA Loopback check passed for device: rdmap" if rc == 0 else "EFA Loopback check failed"
    )


def test_on_trainium_nccom_test_runs_and_nccl_does_not(node: dict[str, str]) -> None:
    (Path(node["PATH"]) / "nccom-test").symlink_to(BIN / "fake-tool")
    node["FAKE_NCCOM_TEST_OUTPUT"] = str(FIXTURES / "neuron" / "nccom-test-failed.txt")
    node["FAKE_NCCOM_TEST_RC"] = "1"
    out = deep_check(node, "--instance-type", "trn2n.48xlarge")
    assert out.returncode == 1
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert tests["nccl-allreduce"]["result"] == "skipped"
    assert tests["nccom-test"]["result"] == "failed"
    assert node_state(node)["labels"][HEALTH] == "UnschedulablePendingReplacement"


def test_busy_neuron_devices_stop_the_run_unless_forced(node: dict[str, str]) -> None:
    (Path(node["PATH"]) / "neuron-ls").symlink_to(BIN / "fake-tool")
    node["FAKE_NEURON_LS_OUTPUT"] = str(FIXTURES / "neuron" / "neuron-ls-inf1-6xlarge-procs.txt")
    out = deep_check(node, *P5)
    assert out.returncode == 2 and out.stdout == ""
    assert "processes 23518, 23531, 23595, 23608 are using the Neuron devices" in out.stderr
    assert not (Path(node["NODE_HEALTH_STATE_DIR"]) / "node-state.json").exists()
    assert deep_check(node, *P5, "--force").returncode == 0


async def test_busy_gpus_are_counted_through_nvml() -> None:
    busy = await deepcheck.accelerators_in_use(which=lambda tool: None, gpu_processes=lambda: 3)
    assert busy == "3 processes are using the GPUs"
    idle = await deepcheck.accelerators_in_use(which=lambda tool: None, gpu_processes=lambda: 0)
    assert idle is None


def test_the_record_tells_a_daemon_what_a_run_says(tmp_path: Path) -> None:
    """The newest run that says something: a running one (its process alive), else the last
    Passed or Failed; a run that judged nothing, a dry run or a killed one say nothing."""
    from agent import deeprecord
    from agent.identity import Identity

    records, ident = tmp_path / "records", Identity(node_name="node-a")
    assert deeprecord.latest_record(records) is None
    deeprecord.start_record(records, "20261101T000000Z-a", ident)
    failed = {"test": "dcgm-diag", "result": "failed", "action": "reboot", "message": "row"}
    deeprecord.write_results(
        records, "20261101T000000Z-a", [failed, {"deep_health_check_status": "Failed"}]
    )
    record = deeprecord.latest_record(records)
    assert (record.run_id, record.status) == ("20261101T000000Z-a", "Failed")
    [f] = deeprecord.record_findings(record)
    assert (f.action, f.component, f.check) == (
        deepcheck.Action.REBOOT,
        "deep_check:dcgm-diag",
        "deep_check",
    )
    for run_id, last in [
        ("20261102T000000Z-b", {"deep_health_check_status": "Unknown"}),
        ("20261103T000000Z-c", {"deep_health_check_status": "Passed", "dry_run": True}),
        ("20261104T000000Z-d", {"deep_health_check_status": "InProgress", "pid": 2**22 + 7}),
    ]:
        deeprecord.write_results(records, run_id, [last])
    assert deeprecord.latest_record(records).run_id == "20261101T000000Z-a"
    deeprecord.start_record(records, "20261105T000000Z-e", ident)  # this process: alive
    assert deeprecord.latest_record(records).status == "InProgress"


def test_a_run_whose_process_is_gone_says_nothing_whatever_its_pid(tmp_path: Path) -> None:
    """A run in a Job's pod records its PID in that pod's namespace (node-health is PID 1
    there): to the daemon that PID is some live process of its own. Only the run's lock on
    its record says it is going: a killed run, or one whose PID is alive but not the run,
    says nothing; a run still going, from another process, is seen."""
    import signal
    import subprocess
    import sys

    from agent import deeprecord

    records = tmp_path / "records"
    deeprecord.write_results(
        records, "20261101T000000Z-a", [{"deep_health_check_status": "InProgress", "pid": 1}]
    )
    assert deeprecord.latest_record(records) is None
    run = (
        "import sys, time; from pathlib import Path; from agent import deeprecord; "
        "from agent.identity import Identity; "
        "deeprecord.start_record(Path(sys.argv[1]), '20261102T000000Z-b', Identity('node-a')); "
        "print('started', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", run, str(records)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        assert deeprecord.latest_record(records).status == "InProgress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert deeprecord.latest_record(records) is None
    finally:
        proc.kill()


def test_a_run_beside_the_daemon_keeps_its_labels_and_reaches_the_policy(
    node: dict[str, str], tmp_path: Path
) -> None:
    """`node-health deep-check` in the daemon's pod: the daemon keeps the run's labels and
    takes a failed run into its policy, so they survive the daemon's next write."""
    from tests.test_daemon import start, stop

    state = Path(node["NODE_HEALTH_STATE_DIR"])
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    daemon = start(node, "--config", str(cfg))
    try:
        wait_for(lambda: (state / "node-state.json").exists())
        node["FAKE_DCGMI_OUTPUT"] = str(FIXTURES / "dcgm" / "deployment-row-remap-pending.txt")
        out = deep_check(node, *P5, "--level", "1", "--force")
        assert out.returncode == 1, out.stderr
        wait_for(lambda: _verdict(state) is not None)
    finally:
        stop(daemon)
    assert _verdict(state) == "UnschedulablePendingReboot"
    labels = node_state(node)["labels"]
    assert (labels[HEALTH], labels[DEEP]) == ("UnschedulablePendingReboot", "Failed")
    assert labels["sagemaker.amazonaws.com/fault-types"] == "DeepHealthCheck"
    assert "deep_check_record" in daemon.stderr.read()


def _verdict(state: Path) -> str | None:
    from tests.conftest import spooled

    return next((e["verdict"] for e in spooled(state) if "verdict" in e), None)


def test_efa_loopback_without_fi_info_says_what_is_missing(node: dict[str, str]) -> None:
    (Path(node["PATH"]) / "fi_pingpong").symlink_to(BIN / "fake-tool")
    out = deep_check(node, *P5, "--suite", "all")
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert tests["efa-devices"]["result"] == "skipped"
    assert tests["efa-loopback"]["result"] == "unknown"
    assert tests["efa-loopback"]["message"] == (
        "fi_info not found: it lists the EFA devices to loop back over"
    )
    assert out.returncode == 2


def test_dcgm_diag_s_figures_are_in_the_record_and_the_node_s_figures(
    node: dict[str, str],
) -> None:
    """dcgmi's JSON with PCIe bandwidth and latency per GPU (and a failing sm_stress): the
    test line carries the worst GPU's figures, and the figures the node publishes have them
    next to NCCL's."""
    from agent import deeprecord

    node["FAKE_DCGMI_OUTPUT"] = str(FIXTURES / "dcgm" / "nvvs-per-gpu.json")
    out = deep_check(node, *P5)
    assert out.returncode == 1, out.stderr  # sm_stress failed: the figures are kept anyway
    tests = {t["test"]: t for t in lines(out.stdout)[:-1]}
    assert tests["dcgm-diag"]["result"] == "failed"
    assert tests["dcgm-diag"]["figures"]["dcgm_pcie_h2d_gb_s"] == 12.13
    assert tests["dcgm-diag"]["figures"]["dcgm_pcie_bidir_usec"] == 7.482
    published = deeprecord.latest_figures(Path(node["NODE_HEALTH_STATE_DIR"]) / "deep-health-check")
    assert published is not None
    assert published["figures"]["dcgm_pcie_d2h_gb_s"] == 13.07
    assert published["figures"]["nccl_busbw_1073741824"] == 313.29
