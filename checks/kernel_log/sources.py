"""Where kernel-log records come from: /dev/kmsg, journalctl, or plain log files.

Each source is an async iterator of `Record`s (one record, from a live source) and `Chunk`s
(many whole lines at once, from a file's backlog, for the bulk classifier), starting after
a remembered position and, with `follow`, waiting for more.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checks.kernel_log.formats import KMSG, Stamp, journal_entry, unescape_kmsg
from checks.proc import reap, spawn

POLL_SECONDS = 0.05  # for what cannot be waited on (a regular file, a FIFO with no writer)
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Record:
    text: str
    when: Stamp
    position: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes
    position: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Gap:
    """Records the kernel overwrote before we read them (EPIPE on /dev/kmsg)."""

    lost: int


class SourceError(OSError):
    """A source that cannot be read; the message says which and why."""


Item = Record | Chunk | Gap


async def _readable(fd: int) -> None:
    """Wait until `fd` has data; poll where the event loop cannot watch it."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    try:
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    except (PermissionError, OSError):  # a regular file: epoll refuses it
        await asyncio.sleep(POLL_SECONDS)
        return
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class KmsgSource:
    """/dev/kmsg: one record per read, "<prio>,<seq>,<usec>,<flags>;<message>", then
    continuation lines (" KEY=value") that carry no message text."""

    name = "kmsg"

    def __init__(
        self, path: Path, after_seq: int | None = None, boot_time: float | None = None
    ) -> None:
        self.path = path
        self.after_seq = after_seq
        self.boot_time = boot_time

    async def items(self, follow: bool) -> AsyncIterator[Item]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        pending = b""
        last_seq: int | None = None
        overrun = False
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    if not follow:
                        return
                    await _readable(fd)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EPIPE:
                        raise
                    overrun = True  # the ring buffer wrapped past us; reading goes on
                    continue
                if not data:  # end of a plain file, or a FIFO with no writer yet
                    if not follow:
                        return
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    m = KMSG.match(line)
                    if m is None:
                        continue  # a continuation line, or not a record at all
                    seq = int(m.group(2))
                    if overrun and last_seq is not None and seq > last_seq + 1:
                        yield Gap(seq - last_seq - 1)
                    overrun = False
                    last_seq = seq
                    if self.after_seq is not None and seq <= self.after_seq:
                        continue
                    usec = int(m.group(3)) / 1e6
                    wall = self.boot_time + usec if self.boot_time is not None else None
                    yield Record(unescape_kmsg(line[m.end() :]), Stamp(usec, wall), {"seq": seq})
        finally:
            os.close(fd)


class JournalSource:
    """`journalctl -k -b -o json [-f]`, resumed after a cursor."""

    name = "journal"

    def __init__(
        self,
        journalctl: str = "journalctl",
        after_cursor: str | None = None,
        root: Path | None = None,
    ) -> None:
        self.journalctl = journalctl
        self.after_cursor = after_cursor
        self.root = root  # the host's journal, when the agent runs with the host elsewhere

    async def items(self, follow: bool) -> AsyncIterator[Item]:
        argv = [self.journalctl, "-k", "-b", "-o", "json", "--no-pager"]
        if self.root is not None and self.root != Path("/"):
            argv += ["--root", str(self.root)]
        if self.after_cursor:
            argv += ["--after-cursor", self.after_cursor]
        if follow:
            argv.append("-f")
        try:
            proc = await spawn(argv, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise SourceError(f"cannot run {self.journalctl}: {exc.strerror}") from None
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while line := await proc.stdout.readline():
                entry = journal_entry(line.decode("utf-8", "replace"))
                if entry is not None:
                    text, when, cursor = entry
                    yield Record(text, when, {"cursor": cursor} if cursor else {})
            code = await proc.wait()
            if code != 0:
                err = (await proc.stderr.read()).decode("utf-8", "replace").strip()
                raise SourceError(f"{self.journalctl} exited {code}: {err[:300]}")
        finally:
            await reap(proc)


class FileSource:
    """A log file followed like `tail -F`: through rotation, truncation and re-creation."""

    name = "file"

    def __init__(self, path: Path, inode: int | None = None, offset: int = 0) -> None:
        self.path = path
        self.inode = inode
        self.offset = offset

    async def items(self, follow: bool) -> AsyncIterator[Item]:
        fh = self._open(resume=True)
        try:
            while True:
                data = fh.read(CHUNK)
                cut = data.rfind(b"\n") + 1
                if cut:
                    fh.seek(cut - len(data), os.SEEK_CUR)  # keep a partial last line for later
                    yield Chunk(data[:cut], {"inode": self.inode, "offset": fh.tell()})
                    continue
                if data:
                    fh.seek(-len(data), os.SEEK_CUR)
                if not follow:
                    return
                await asyncio.sleep(POLL_SECONDS * 5)
                if self._replaced(fh):
                    fh.close()
                    fh = self._open(resume=False)
        finally:
            fh.close()

    def _open(self, resume: bool) -> Any:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed in items()
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        st = os.fstat(fh.fileno())
        if resume and st.st_ino == self.inode and st.st_size >= self.offset:
            fh.seek(self.offset)
        self.inode = st.st_ino
        return fh

    def _replaced(self, fh: Any) -> bool:
        """Rotated (a new file at the path) or truncated (shorter than what we read)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # between rotation steps: keep draining the old one
        return st.st_ino != self.inode or st.st_size < fh.tell()
