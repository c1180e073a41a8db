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

import structlog

from checks.kernel_log.formats import KMSG, Stamp, journal_entry, kmsg_from_kernel, unescape_kmsg
from checks.kernel_log.watch import FileWatch
from checks.proc import reap, spawn

log = structlog.get_logger("checks.kernel_log")

POLL_SECONDS = 0.05  # for what cannot be waited on (a regular file, a FIFO with no writer)
CHUNK = 1024 * 1024  # bytes read at a time: a storm costs little memory
MAX_LINE = 64 * 1024  # bytes of a log line kept; the rest of a longer one is skipped
FINGERPRINT = 64  # bytes before the read position compared, to see a file truncated
JOURNAL_LINE_LIMIT = 1 << 20  # bytes of one `journalctl -o json` entry


@dataclass(frozen=True, slots=True)
class Record:
    text: str
    when: Stamp
    position: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes
    position: dict[str, Any]  # after the chunk
    start: int | None = None  # the file offset of data[0], when data is the file's own bytes

    def at(self, end: int) -> dict[str, Any]:
        """The position after data[:end]: where to resume after a record that ends there."""
        if self.start is None or end >= len(self.data):
            return self.position  # a line was cut in it: only its end is known
        return self.position | {"offset": self.start + end}


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
                    if not kmsg_from_kernel(m.group(1)):
                        continue  # written to /dev/kmsg by user space (systemd, echo)
                    usec = int(m.group(3)) / 1e6
                    wall = self.boot_time + usec if self.boot_time is not None else None
                    yield Record(unescape_kmsg(line[m.end() :]), Stamp(usec, wall), {"seq": seq})
        finally:
            os.close(fd)


class JournalSource:
    """`journalctl -k -b -o json [-f]`, resumed after a cursor: `-k` is `_TRANSPORT=kernel`."""

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
        self.entries_dropped = 0

    async def items(self, follow: bool) -> AsyncIterator[Item]:
        # --all: without it journalctl writes a field over 4,096 bytes as null, and a long
        # record's MESSAGE would be lost before it was parsed.
        argv = [self.journalctl, "-k", "-b", "-o", "json", "--all", "--no-pager"]
        if self.root is not None and self.root != Path("/"):
            argv += ["--root", str(self.root)]
        if self.after_cursor:
            argv += ["--after-cursor", self.after_cursor]
        if follow:
            argv.append("-f")
        try:
            proc = await spawn(argv, stderr=asyncio.subprocess.PIPE, limit=JOURNAL_LINE_LIMIT)
        except OSError as exc:
            raise SourceError(f"cannot run {self.journalctl}: {exc.strerror}") from None
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # an entry over the limit: dropped (its rest is not JSON)
                    self.entries_dropped += 1
                    if self.entries_dropped == 1:
                        log.warning("journal_entry_too_long", limit_bytes=JOURNAL_LINE_LIMIT)
                    continue
                if not line:
                    break
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
    """A log file followed like `tail -F`, woken by inotify (polled where there is none):
    through rotation (the renamed file is read to its
    end before the new one), truncation (copytruncate, also when the file has grown past where
    we were: the bytes before our position are compared) and re-creation.

    A line longer than `max_line` keeps its first `max_line` bytes (a fault's words come
    first); the rest is skipped, counted in `lines_cut` and said once, and reading goes on."""

    name = "file"

    def __init__(
        self, path: Path, inode: int | None = None, offset: int = 0, max_line: int = MAX_LINE
    ) -> None:
        self.path = path
        self.inode = inode
        self.offset = offset
        self.max_line = max_line
        self.lines_cut = 0
        self._skipping = False  # inside a cut line: skip to its end
        self._mark = b""  # the bytes just before our position, to see the file replaced

    async def items(self, follow: bool) -> AsyncIterator[Item]:
        fh = self._open(resume=True)
        watch = FileWatch(self.path) if follow else None
        try:
            while True:
                if self._truncated(fh):
                    fh.seek(0)
                    self._mark, self._skipping = b"", False
                if (chunk := self._read(fh)) is not None:
                    yield chunk
                    await asyncio.sleep(0)  # a backlog is read chunk by chunk, not at once
                    continue
                if watch is None:
                    return
                await watch.changed()
                if self._rotated():
                    while (chunk := self._read(fh, last=True)) is not None:
                        yield chunk  # what was written to the old file since the last read
                    fh.close()
                    fh = self._open(resume=False)
        finally:
            fh.close()
            if watch is not None:
                watch.close()

    def _read(self, fh: Any, last: bool = False) -> Chunk | None:
        """The next whole lines, long ones cut; None at the end of what is there. `last`: the
        file will not grow, so an unfinished last line counts as a line."""
        start = fh.tell()
        raw = fh.read(CHUNK)
        if not raw:
            return None
        data = raw
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                data = b""
            else:
                data, self._skipping = data[end + 1 :], False
                start += end + 1
        exact = True
        cut = data.rfind(b"\n") + 1
        body, tail = data[:cut], data[cut:]
        if len(tail) > self.max_line:  # no end in sight: keep its start, skip the rest
            body += tail + b"\n"
            self._skipping, tail, exact = True, b"", False
        elif last and tail:
            body, tail = body + tail + b"\n", b""
        if tail:
            fh.seek(-len(tail), os.SEEK_CUR)  # a partial last line, for later
            if not body and len(raw) == len(tail):
                return None
        if len(body) > self.max_line:
            cut = self._cut_long(body)
            exact, body = exact and cut is body, cut
        self._mark = (self._mark + raw[: len(raw) - len(tail)])[-FINGERPRINT:]
        position = {"inode": self.inode, "offset": fh.tell()}
        return Chunk(body, position, start if exact else None)

    def _cut_long(self, body: bytes) -> bytes:
        # A line over max_line holds a whole aligned window of half that without a newline;
        # looking for a newline in each window is cheap where lines are short.
        half = max(1, self.max_line // 2)
        if all(body.find(b"\n", i, i + half) >= 0 for i in range(0, len(body) - half + 1, half)):
            return body
        lines = body.split(b"\n")
        out = []
        for line in lines:
            if len(line) > self.max_line:
                line = line[: self.max_line]
                self.lines_cut += 1
                if self.lines_cut == 1:
                    log.warning(
                        "kernel_log_line_cut",
                        path=str(self.path),
                        kept_bytes=self.max_line,
                        why="longer lines keep their start; the rest is skipped and counted",
                    )
            out.append(line)
        return b"\n".join(out)

    def _open(self, resume: bool) -> Any:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed in items()
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
        st = os.fstat(fh.fileno())
        if resume and st.st_ino == self.inode and st.st_size >= self.offset:
            fh.seek(self.offset)
        self.inode = st.st_ino
        self._mark, self._skipping = b"", False
        return fh

    def _rotated(self) -> bool:
        """A new file at the path (logrotate's move and create)."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return False  # between rotation steps: keep draining the old one

    def _truncated(self, fh: Any) -> bool:
        """Cut under us (copytruncate): shorter than where we are, or, when new lines have
        already made it longer, no longer holding the bytes we read just before here."""
        pos = fh.tell()
        try:
            if os.fstat(fh.fileno()).st_size < pos:
                return True
            mark = self._mark
            return bool(mark) and os.pread(fh.fileno(), len(mark), pos - len(mark)) != mark
        except OSError:
            return False
