"""External tools run without a shell and never outlive their timeout, children included."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from checks.proc import run_command


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def test_output_and_exit_code_come_back(tmp_path: Path) -> None:
    tool = script(tmp_path, "tool", 'echo "out $1"; echo err >&2; exit 3\n')
    result = await run_command([str(tool), "a b; rm -rf /"], timeout=5)
    assert result.returncode == 3 and not result.ok
    assert result.stdout == "out a b; rm -rf /\n"  # an argument, never a shell
    assert result.stderr == "err\n"


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    tool = script(tmp_path, "hang", f"sleep 300 &\necho $! > {pidfile}\necho started\nwait\n")
    start = time.monotonic()
    result = await run_command([str(tool)], timeout=0.5, kill_grace=0.5)
    assert result.timed_out and result.returncode is None
    assert result.stdout == "started\n"
    assert time.monotonic() - start < 3
    child = int(pidfile.read_text())
    for _ in range(50):
        if not alive(child):
            break
        await asyncio.sleep(0.02)
    assert not alive(child)


async def test_tool_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    tool = script(tmp_path, "stubborn", "trap '' TERM\nwhile :; do sleep 0.05; done\n")
    start = time.monotonic()
    result = await run_command([str(tool)], timeout=0.2, kill_grace=0.3)
    assert result.timed_out and time.monotonic() - start < 2


async def test_cancellation_kills_the_tool(tmp_path: Path) -> None:
    pidfile = tmp_path / "self.pid"
    tool = script(tmp_path, "long", f"echo $$ > {pidfile}\nexec sleep 300\n")
    task = asyncio.create_task(run_command([str(tool)], timeout=60, kill_grace=0.5))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(int(pidfile.read_text()))


async def test_missing_tool_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run_command([str(tmp_path / "no-such-tool")], timeout=1)


async def test_garbage_bytes_do_not_break_decoding(tmp_path: Path) -> None:
    tool = script(tmp_path, "garbage", r"printf 'ok\377\376\n'" + "\n")
    result = await run_command([str(tool)], timeout=5)
    assert result.ok and result.stdout.startswith("ok")


BIN = Path(__file__).parent / "bin"


def fake_tool(monkeypatch, tmp_path: Path, mode: str, output: str = "done\n") -> Path:
    """tests/bin/fake-tool as `fake-tool`, misbehaving as `mode` says; its child's pidfile."""
    (tmp_path / "out.txt").write_text(output)
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_FAKE_TOOL_OUTPUT", str(tmp_path / "out.txt"))
    monkeypatch.setenv("FAKE_FAKE_TOOL_MODE", mode)
    monkeypatch.setenv("FAKE_FAKE_TOOL_PIDFILE", str(pidfile))
    return pidfile


def session_of(pid: int) -> list[int]:
    """Every live process in `pid`'s session (what a tool started and did not take away)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == pid:  # state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


async def gone(pid: int) -> bool:
    for _ in range(100):
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_tool_killed_by_a_signal_did_not_finish(monkeypatch, tmp_path: Path) -> None:
    fake_tool(monkeypatch, tmp_path, "killed")
    result = await run_command([str(BIN / "fake-tool")], timeout=5)
    assert result.returncode == -9 and result.stdout == "done\n"
    assert not result.ok and result.failure == "fake-tool was killed by SIGKILL"


async def test_a_tool_that_finished_has_no_failure(monkeypatch, tmp_path: Path) -> None:
    fake_tool(monkeypatch, tmp_path, "")
    monkeypatch.setenv("FAKE_FAKE_TOOL_RC", "3")
    result = await run_command([str(BIN / "fake-tool")], timeout=5)
    assert (result.returncode, result.failure, result.stdout) == (3, None, "done\n")


async def test_a_setsid_child_holding_the_pipe_is_killed_and_not_waited_for(
    monkeypatch, tmp_path: Path
) -> None:
    """The tool exits at once; the child it left in a session of its own keeps stdout open."""
    pidfile = fake_tool(monkeypatch, tmp_path, "orphan")
    start = time.monotonic()
    result = await run_command([str(BIN / "fake-tool")], timeout=30, kill_grace=0.5)
    assert time.monotonic() - start < 3
    assert result.returncode == 0 and result.stdout == "done\n"
    assert result.left_behind and not result.ok
    assert result.failure == "fake-tool left a process behind that held its output"
    assert await gone(int(pidfile.read_text()))


async def test_a_timed_out_tool_leaves_no_process_in_its_group_or_session(
    monkeypatch, tmp_path: Path
) -> None:
    pidfile = fake_tool(monkeypatch, tmp_path, "setsid-hang")
    result = await run_command([str(BIN / "fake-tool")], timeout=0.5, kill_grace=0.5)
    assert result.timed_out and result.failure == "fake-tool did not finish in time and was killed"
    child = int(pidfile.read_text())
    assert await gone(child)
    assert session_of(child) == []


async def test_a_cancelled_tool_and_its_setsid_child_go_at_once(
    monkeypatch, tmp_path: Path
) -> None:
    pidfile = fake_tool(monkeypatch, tmp_path, "setsid-hang")
    task = asyncio.create_task(run_command([str(BIN / "fake-tool")], timeout=60, kill_grace=0.5))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.02)
    child = int(pidfile.read_text())
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - start < 2
    assert await gone(child)


def test_every_subprocess_starts_in_checks_proc() -> None:
    """One place starts processes (in their own session, killed with their group): a call
    to subprocess, asyncio's subprocess functions or os.system/popen anywhere else in the
    agent would start a tool that a timeout or a stop leaves behind."""
    import ast

    from tests.conftest import REPO

    starters = {
        ("subprocess", name) for name in ("run", "Popen", "call", "check_call", "check_output")
    }
    starters |= {("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell")}
    starters |= {("os", "system"), ("os", "popen"), ("os", "spawnv"), ("os", "fork")}
    found = []
    for path in sorted([*(REPO / "agent").rglob("*.py"), *(REPO / "checks").rglob("*.py")]):
        if path == REPO / "checks" / "proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
                found.append(f"{path.relative_to(REPO)}: from subprocess import")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in starters
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []
