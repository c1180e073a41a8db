"""What the command line prints for a person and for a pipe: -h, --version, -o, NO_COLOR, the
`run --once` table on a terminal (JSON lines when piped), and a daemon without rich."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from agent import __version__
from tests.test_cli import config, node_health

QUIET = "checks:\n  hang: {enabled: false}\n"


def on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str]:
    """The command with its stdout on a pseudo-terminal, as a person runs it; what it wrote."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args],
        env=env | {"COLUMNS": "200"},
        stdout=child,
        stderr=subprocess.DEVNULL,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    return proc.wait(30), b"".join(chunks).decode().replace("\r\n", "\n")


def test_h_and_help_and_version_flag(cli_env) -> None:
    for args in (["-h"], ["run", "-h"], ["status", "--help"]):
        out = node_health(cli_env, *args)
        assert out.returncode == 0 and "Usage:" in out.stdout, args
    out = node_health(cli_env, "--version")
    assert out.returncode == 0 and out.stdout.startswith(f"node-health {__version__} (python")
    assert "--show-completion" in node_health(cli_env, "--help").stdout  # typer's completion


def test_version_takes_config_as_every_command_and_json(cli_env, tmp_path) -> None:
    out = node_health(cli_env, "version", "--config", config(tmp_path, QUIET))
    assert out.returncode == 0 and f"node-health {__version__}" in out.stdout
    as_json = json.loads(node_health(cli_env, "version", "-o", "json").stdout)
    assert as_json["version"] == __version__


def test_once_is_a_plain_flag(cli_env) -> None:
    out = node_health(cli_env, "run", "--help")
    assert "--once" in out.stdout and "--no-once" not in out.stdout
    bad = node_health(cli_env, "run", "--once=yes")
    assert bad.returncode == 2  # a flag takes no value


def test_once_prints_a_table_on_a_terminal_and_json_lines_when_piped(cli_env, tmp_path) -> None:
    cfg = config(tmp_path, QUIET)
    code, shown = on_a_terminal(cli_env | {"NO_COLOR": "1"}, "run", "--once", "-c", cfg)
    assert code == 0
    lines = shown.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "COMPONENT", "REASON", "MESSAGE"]
    memory = next(line for line in lines if line.startswith("memory "))
    assert memory.split()[1] == "ok"
    assert "\x1b[" not in shown  # NO_COLOR: no escape sequence at all
    piped = node_health(cli_env, "run", "--once", "-c", cfg)
    assert piped.returncode == 0
    assert {json.loads(line)["check"] for line in piped.stdout.splitlines()} >= {"memory"}
    forced = node_health(cli_env, "run", "--once", "-c", cfg, "-o", "table")
    assert forced.stdout.splitlines()[0].split()[:2] == ["CHECK", "STATUS"]
    code, as_json = on_a_terminal(cli_env, "run", "--once", "-c", cfg, "-o", "json")
    assert json.loads(as_json.splitlines()[0])["level"]


def test_the_table_heads_are_bold_on_a_terminal_without_no_color(cli_env, tmp_path) -> None:
    env = {k: v for k, v in cli_env.items() if k != "NO_COLOR"}
    code, shown = on_a_terminal(env, "checks", "list", "-c", config(tmp_path, QUIET))
    assert code == 0 and "\x1b[1m" in shown
    code, shown = on_a_terminal(env | {"NO_COLOR": "1"}, "checks", "list")
    assert code == 0 and "\x1b[" not in shown and shown.split()[:2] == ["CHECK", "RUNS"]


def test_checks_list_output_table_wide_json_and_the_old_json_flag(cli_env) -> None:
    table = node_health(cli_env, "checks", "list").stdout.splitlines()
    assert table[0].split() == ["CHECK", "RUNS", "TIMEOUT", "STATE"]
    wide = node_health(cli_env, "checks", "list", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["CHECK", "RUNS", "TIMEOUT", "STATE", "DESCRIPTION"]
    as_json = node_health(cli_env, "checks", "list", "--output", "json").stdout
    assert json.loads(as_json) == json.loads(
        node_health(cli_env, "checks", "list", "--json").stdout
    )
    bad = node_health(cli_env, "checks", "list", "-o", "yaml")
    assert bad.returncode == 2


def test_the_daemon_keeps_rich_out(cli_env, tmp_path) -> None:
    """Every module the daemon imports, up to its start (here stopped by its port in use)."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{held.getsockname()[1]}"}
        out = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "agent",
                "run",
                "-c",
                config(tmp_path, QUIET),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2 and "address already in use" in out.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert "agent.daemon" in imported and "structlog" in imported
    # `-X importtime` also lists each import of rich refused (structlog's try); a rich that
    # loads lists its modules (rich._extension, rich.console, ...)
    assert [m for m in imported if m.startswith("rich.")] == []


def test_the_daemon_keeps_requests_charset_detectors_out() -> None:
    """The kubernetes client's transport (requests comes with it) without charset_normalizer,
    and without requests' warning that it found no detector (-W error makes one fail)."""
    code = (
        "import sys\n"
        "from agent import cli\n"
        "cli._keep_unused_out()\n"
        "from agent.kube import lean\n"
        "lean.api().ApiClient(lean.api().Configuration())\n"
        "import requests\n"
        "print(sorted(m for m in sys.modules if m.startswith(('charset_normalizer', 'chardet'))"
        " and sys.modules[m] is not None))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and out.stderr == ""
