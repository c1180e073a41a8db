"""The `node-health` command as an operator runs it: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__


def node_health(
    env: dict[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_version(cli_env) -> None:
    out = node_health(cli_env, "version")
    assert out.returncode == 0 and f"node-health {__version__}" in out.stdout


def test_once_on_a_healthy_host_prints_events_and_exits_0(cli_env, tmp_path) -> None:
    cfg = config(tmp_path, "checks:\n  hang: {enabled: false}\n")
    out = node_health(cli_env, "run", "--once", "--config", cfg)
    assert out.returncode == 0, out.stderr
    by_check = {e["check"]: e for e in events(out.stdout)}
    assert by_check["memory"]["evidence"]["available_percent"] == 82.82
    assert by_check["fixed"]["status"] == "ok"
    assert not (tmp_path / "state").exists()  # --once changes nothing


def test_once_with_a_fault_exits_1(cli_env, tmp_path) -> None:
    cfg = config(
        tmp_path,
        "checks:\n  hang: {enabled: false}\n  memory:\n"
        "    available_min_percent: 90\n    polls: 1\n    action: reboot\n",
    )
    out = node_health(cli_env, "run", "--once", "-c", cfg)
    assert out.returncode == 1
    msgs = [e["msg"] for e in events(out.stdout)]
    assert any(m.startswith("Encountered FaultyInstance. Reboot the Instance.") for m in msgs)


def test_once_with_an_undecided_check_exits_2(cli_env) -> None:
    out = node_health(cli_env, "run", "--once")
    assert out.returncode == 2
    hang = [e for e in events(out.stdout) if e["check"] == "hang"]
    assert hang[0]["status"] == "unknown" and hang[0]["reason"] == "CheckTimeout"


def test_checks_list_shows_state_interval_and_what_is_missing(cli_env, tmp_path) -> None:
    cfg = config(tmp_path, "checks:\n  hang: {enabled: false}\n  memory: {interval: 2m}\n")
    out = node_health(cli_env, "checks", "list", "--config", cfg)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "every 120s" in rows["memory"] and "enabled" in rows["memory"]
    assert rows["hang"].endswith("disabled")
    assert (
        "skipped: dcgmi-not-on-this-machine not found, /dev/nvidia-not-here not found"
        in rows["needs"]
    )
    as_json = json.loads(node_health(cli_env, "checks", "list", "--json").stdout)
    assert {r["check"] for r in as_json} == {
        "memory",
        "kernel_log",
        "disk",
        "runtime",
        "nvml",
        "nvml_xid",
        "dcgm_health",
        "efa",
        "link_counters",
        "neuron",
        "neuron_monitor",
        "fixed",
        "hang",
        "needs",
        "broken",
    }
    assert "skipped: DCGM Python bindings not found" in rows["dcgm_health"]
    assert (
        "error: check 'broken': cannot load 'tests.plugins.no_such_module:Missing'"
        in (rows["broken"])
    )


def test_a_check_that_cannot_run_says_so_once_and_the_rest_runs(cli_env, tmp_path) -> None:
    cfg = config(tmp_path, "checks:\n  hang: {enabled: false}\n")
    out = node_health(cli_env, "run", "--once", "--config", cfg)
    assert out.returncode == 0
    logs = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(entry["event"], entry["check"]) for entry in logs] == [
        ("check_not_loaded", "broken"),
        ("check_skipped", "dcgm_health"),
        ("check_skipped", "disk"),
        ("check_skipped", "efa"),
        ("check_skipped", "kernel_log"),
        ("check_skipped", "link_counters"),
        ("check_skipped", "needs"),
        ("check_skipped", "neuron"),
        ("check_skipped", "neuron_monitor"),
        ("check_skipped", "nvml"),
        ("check_skipped", "nvml_xid"),
    ]
    assert logs[1]["missing"][0].startswith("DCGM Python bindings not found")
    assert logs[2]["missing"] == ["/proc/1/mountinfo not found"]
    assert logs[3]["missing"][0].startswith("no EFA here")
    assert "dev/kmsg: No such file or directory" in logs[4]["missing"][0]
    assert logs[5]["missing"] == ["no InfiniBand devices and no PCIe AER counters here"]
    assert logs[6]["missing"] == [
        "dcgmi-not-on-this-machine not found",
        "/dev/nvidia-not-here not found",
    ]
    assert {e["check"] for e in events(out.stdout)} == {"memory", "fixed"}


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("checks:\n  memory:\n    interval: soon\n", "checks.memory.interval: Input should be"),
        (
            "checks:\n  memory:\n    available_min_percent: 120\n",
            "checks.memory.available_min_percent: Input should be less than or equal to 100",
        ),
        ("checks:\n  memroy: {}\n", "checks.memroy: no such check"),
        ("spool:\n  max_segmnets: 3\n", "spool.max_segmnets: unknown setting"),
        ("policy:\n  rules:\n    - name: x\n      action: explode\n", "policy.rules.0.action:"),
        ("checks: [\n", "cannot read"),
    ],
)
def test_bad_config_exits_2_naming_the_key(cli_env, tmp_path, yaml_text, message) -> None:
    out = node_health(cli_env, "run", "--once", "--config", config(tmp_path, yaml_text))
    assert out.returncode == 2
    assert "configuration error" in out.stderr and message in out.stderr
    assert out.stdout == ""


def test_bad_environment_variable_exits_2(cli_env) -> None:
    out = node_health(cli_env | {"NODE_HEALTH_SPOOL__MAX_SEGMENTS": "lots"}, "checks", "list")
    assert out.returncode == 2 and "spool.max_segments" in out.stderr


def test_missing_config_file_exits_2(cli_env, tmp_path) -> None:
    out = node_health(cli_env, "run", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_the_example_config_is_valid(cli_env) -> None:
    example = Path(__file__).parent.parent / "deploy" / "config.example.yaml"
    out = node_health(cli_env, "checks", "list", "--config", str(example))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("garbage", "http_listen: Value error, 'garbage' is not host:port"),
        ("127.0.0.1:99999", "http_listen: Value error, port 99999 is out of range (0-65535)"),
        ("[not:v6]:80", "http_listen: Value error,"),
    ],
)
def test_a_bad_listen_address_is_one_line_and_exit_2(cli_env, listen: str, says: str) -> None:
    out = node_health(cli_env | {"NODE_HEALTH_HTTP_LISTEN": listen}, "run")
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(f"node-health: configuration error: {says}")


def test_a_port_in_use_is_one_line_and_exit_2(cli_env, tmp_path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = config(tmp_path, "checks:\n  hang: {enabled: false}\n")
        env = cli_env | {
            "NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}",
            "NODE_HEALTH_LOG_LEVEL": "error",
        }
        out = node_health(env, "run", "-c", cfg)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (
        f"node-health: configuration error: http_listen: cannot listen on 127.0.0.1:{port}: "
        "address already in use"
    )
    assert "Traceback" not in out.stderr + out.stdout


def test_a_state_dir_that_is_a_file_is_one_line_and_exit_2(cli_env, tmp_path) -> None:
    (tmp_path / "file").write_text("")
    out = node_health(cli_env | {"NODE_HEALTH_STATE_DIR": str(tmp_path / "file")}, "run")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "node-health: configuration error: state_dir: Value error, not a directory "
        f"(got '{tmp_path / 'file'}')"
    ]


def test_an_internal_error_is_one_line_and_exit_2_never_1(cli_env) -> None:
    code = (
        "import sys, agent.cli; agent.cli.main = lambda: 1 / 0; "
        "sys.argv = ['node-health', 'status']; "
        "from agent.entry import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "node-health: internal error: ZeroDivisionError: division by zero (at <string>:1)"
    ]


def test_usage_errors_exit_2(cli_env) -> None:
    assert node_health(cli_env, "run", "--no-such-option").returncode == 2
    assert node_health(cli_env, "no-such-command").returncode == 2


def test_a_full_stdout_is_one_line_and_exit_2(cli_env) -> None:
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [sys.executable, "-m", "agent", "version"],
            env=cli_env,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith("node-health: cannot write output: No space left on device")
