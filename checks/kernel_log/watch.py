"""Wait for a log file to change: inotify on Linux, through libc (ctypes; no dependency), else
a short sleep.

The file's directory is watched, not the file: a write to the file, and the new file that
logrotate moves or creates in its place, are both events there. Only events that name the
file wake the follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
POLL_SECONDS = 0.25  # where inotify cannot be had
SAFETY_SECONDS = 5.0  # a look even without an event: a watch can miss (NFS, some overlays)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 - absent off Linux
    except (OSError, AttributeError):
        return None
    return libc


class FileWatch:
    """`await changed()` returns once the file may have changed (or after a while anyway)."""

    def __init__(self, path: Path) -> None:
        self.name = os.fsencode(path.name)
        self.fd: int | None = None
        libc = _libc()
        if libc is None:
            return
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return  # out of instances (fs.inotify.max_user_instances): poll
        if libc.inotify_add_watch(fd, os.fsencode(path.parent), MASK) < 0:
            os.close(fd)
            return
        self.fd = fd

    @property
    def kind(self) -> str:
        return "inotify" if self.fd is not None else "poll"

    async def changed(self) -> None:
        if self.fd is None:
            await asyncio.sleep(POLL_SECONDS)
            return
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            if self._drain() and not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, readable)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAFETY_SECONDS):
                    await ready
        finally:
            loop.remove_reader(self.fd)

    def _drain(self) -> bool:
        """Read every queued event; whether one named the file (or the queue overflowed)."""
        assert self.fd is not None
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            if not data:
                return hit
            at = 0
            while at + _EVENT.size <= len(data):
                wd, _mask, _cookie, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
                hit = hit or wd == -1 or name == self.name  # wd -1: IN_Q_OVERFLOW
                at += _EVENT.size + size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
