"""Run an external tool the way checks must: no shell, bounded in time, never left behind.

Each command runs in its own process group so that a timeout or a cancellation (SIGTERM of the
agent, Ctrl-C of `deep-check`) kills the tool and every child it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None when it was killed on timeout
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


async def run_command(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    kill_grace: float = 2.0,
) -> CommandResult:
    """Run `argv` and collect its output; on timeout kill its process group and say so.

    Raises FileNotFoundError / PermissionError when the executable cannot be started.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
        start_new_session=True,
    )
    communicate = asyncio.ensure_future(proc.communicate())
    try:
        async with asyncio.timeout(timeout):  # (wait_for can swallow a cancellation on 3.11)
            out, err = await asyncio.shield(communicate)
    except TimeoutError:
        await _kill_group(proc, kill_grace)
        out, err = await communicate
        return CommandResult(tuple(argv), None, _text(out), _text(err), timed_out=True)
    except asyncio.CancelledError:
        await _kill_group(proc, kill_grace)
        with contextlib.suppress(Exception):
            await communicate
        raise
    return CommandResult(tuple(argv), proc.returncode, _text(out), _text(err))


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Make sure a long-running tool we started (a log follower, a monitor) and its children
    are gone: SIGKILL its process group unless it already exited."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _kill_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the group, then SIGKILL whatever is still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            continue
        # The leader is gone; its children may not be. Finish the group off.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")
