"""Blocking network calls from the event loop, in threads that never hold up the agent's exit."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


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
