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
