"""Blocking calls from the event loop, in threads that never hold up the agent's exit.

A thread blocked in a read of a hung file (NFS, a FIFO, a wedged sysfs attribute) or on the
network cannot be stopped. The loop's own executor threads are joined at exit (by asyncio.run
and by the interpreter), so one such thread would keep a stopped agent alive; daemon threads
are not joined.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any


class DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """The daemon's default executor (`asyncio.to_thread`, `getaddrinfo`): one daemon thread
    per call, and a shutdown that waits for none. (A ThreadPoolExecutor only because asyncio
    accepts nothing else as the default.)"""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        name = getattr(fn, "__name__", "call")
        threading.Thread(target=call, daemon=True, name=f"to_thread-{name}").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: a call still running ends with the process."""


async def in_daemon_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a daemon thread: a request blocked on the network never holds up the
    agent's exit (the loop's executor threads would: asyncio.run joins them)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def call() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: the agent has stopped
            loop.call_soon_threadsafe(_settle, done, result, error)

    threading.Thread(target=call, daemon=True, name=getattr(fn, "__name__", "call")).start()
    return await done


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # cancelled while the call went on
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
