"""Run an external tool the way checks must: no shell, bounded in time, never left behind.

Every subprocess of the agent starts here. Each runs in its own session (and so its own process
group); a timeout or a cancellation (SIGTERM of the agent, Ctrl-C of `deep-check`) kills the
group, every descendant still known (a `setsid` child too) and whoever still holds the tool's
output pipes. The agent never waits on a pipe a stray child keeps open.

What a tool printed is evidence only when it ran to completion: `CommandResult.failure` says
why not (timed out, killed by a signal, left a process holding its output), and a check that
sees one reports `unknown` with it, never a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None when it was killed on timeout; -N: killed by signal N
    stdout: str
    stderr: str
    timed_out: bool = False
    left_behind: bool = False  # it exited, but a process it started kept its output open

    @property
    def failure(self) -> str | None:
        """Why the tool did not run to completion, in words; None when it did."""
        name = Path(self.argv[0]).name if self.argv else "tool"
        if self.timed_out:
            return f"{name} did not finish in time and was killed"
        if self.returncode is not None and self.returncode < 0:
            try:
                sig = signal.Signals(-self.returncode).name
            except ValueError:
                sig = f"signal {-self.returncode}"
            return f"{name} was killed by {sig}"
        if self.left_behind:
            return f"{name} left a process behind that held its output"
        return None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failure is None


async def run_command(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    kill_grace: float = 2.0,
) -> CommandResult:
    """Run `argv` and collect its output; on timeout kill it and all it started, and say so.

    Raises FileNotFoundError / PermissionError when the executable cannot be started.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    files = [os.fdopen(fd, "rb", buffering=0) for fd in (out_r, err_r)]  # they own the fds
    pipes: list[_Pipe] = []
    timed_out = left_behind = False
    try:
        for file in files:
            pipes.append(await _Pipe.open(file))
        try:
            async with asyncio.timeout(timeout):  # (wait_for can swallow a cancellation on 3.11)
                await proc.wait()
        except TimeoutError:
            timed_out = True
        if not timed_out:
            # Its output ends when the last holder of the pipes exits: a child it left running
            # could hold them for ever.
            try:
                async with asyncio.timeout(kill_grace):
                    await asyncio.gather(*(p.eof() for p in pipes))
            except TimeoutError:
                left_behind = True
    finally:
        for file in files[len(pipes) :]:  # a stop came before it was read from
            file.close()
        await _kill_all(proc, pipes, kill_grace)
    out, err = (p.close() for p in pipes)
    return CommandResult(
        tuple(argv),
        None if timed_out else proc.returncode,
        out,
        err,
        timed_out=timed_out,
        left_behind=left_behind,
    )


class _Pipe:
    """The read end of a tool's stdout or stderr: what arrived so far, whatever happens next."""

    def __init__(self, file: BinaryIO, reader: asyncio.StreamReader) -> None:
        self.inode = os.fstat(file.fileno()).st_ino
        self.reader = reader
        self.data = bytearray()
        self.transport: asyncio.ReadTransport | None = None
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, file: BinaryIO) -> _Pipe:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        pipe = cls(file, reader)
        try:
            pipe.transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), file
            )
        except BaseException:
            pipe._task.cancel()
            raise
        return pipe

    async def _read(self) -> None:
        while chunk := await self.reader.read(65536):
            self.data += chunk

    @property
    def ended(self) -> bool:
        return self._task.done()

    async def eof(self) -> None:
        await asyncio.shield(self._task)

    def close(self) -> str:
        self._task.cancel()
        if self.transport is not None:
            self.transport.close()
        return self.data.decode("utf-8", errors="replace")


async def spawn(
    argv: Sequence[str], *, stderr: int = asyncio.subprocess.DEVNULL, limit: int = 1 << 20
) -> asyncio.subprocess.Process:
    """Start a long-running tool (a log follower, a monitor) in a session of its own, its
    stdout a stream; end it with `reap`, whatever happened."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        limit=limit,
    )


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Make sure a long-running tool we started (a log follower, a monitor) and its children
    are gone: SIGKILL its process group and descendants unless it already exited."""
    if proc.returncode is None:
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await _exited(proc, 2.0)


async def _kill_all(proc: asyncio.subprocess.Process, pipes: list[_Pipe], grace: float) -> None:
    """The tool, its group, its descendants and whoever holds its pipes: SIGTERM, then after
    `grace` seconds SIGKILL; then the pipes are closed, so that nothing waits on them."""
    try:
        if proc.returncode is None:
            _signal_all(proc, pipes, signal.SIGTERM)
            await _exited(proc, grace)
        _signal_all(proc, pipes, signal.SIGKILL)
        await _exited(proc, grace)
        with contextlib.suppress(TimeoutError):  # what they wrote before they died, read
            async with asyncio.timeout(min(grace, 0.5)):
                await asyncio.gather(*(p.eof() for p in pipes))
    finally:
        for p in pipes:
            p.close()


async def _exited(proc: asyncio.subprocess.Process, seconds: float) -> None:
    """Wait for the leader, but not for ever: one stuck in the kernel (D state) outlives even
    SIGKILL until its system call returns, and must not hold up the agent's stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await proc.wait()


def _signal_all(proc: asyncio.subprocess.Process, pipes: list[_Pipe], sig: int) -> None:
    holders: set[int] = set()
    if not all(p.ended for p in pipes):  # someone still holds them: find who (a few ms)
        holders = _holding({p.inode for p in pipes})
    # Its pid is another's once it has been reaped: only a live leader's children are its.
    children = _descendants(proc.pid) if proc.returncode is None else []
    for pid in {*children, *holders} - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` now, in its group or not (a `setsid` child is not)."""
    children: dict[int, list[int]] = {}
    for child, parent in _processes():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _processes() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process in our own /proc (not psutil's: the memory check
    points psutil at the host's)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()  # after the command name
                out.append((int(entry.name), int(fields[1])))
    return out


def _holding(inodes: set[int]) -> set[int]:
    """The processes that hold one of these pipes open (one whose parent exited is no one's
    descendant any more). /proc/<pid>/fd names a pipe `pipe:[<inode>]`."""
    names = {f"pipe:[{i}]" for i in inodes}
    found = set()
    for pid, _ in _processes():
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in names:
                        found.add(pid)
                        break
    return found
