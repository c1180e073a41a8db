"""heap.settle, where the C library has no malloc_trim (musl, macOS): the rest still runs."""

from __future__ import annotations

import gc
import weakref

from agent import heap


class Node:
    pass


def test_without_malloc_trim_cycles_are_still_freed_and_the_rest_frozen(monkeypatch) -> None:
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: object())  # a libc without it
    heap._malloc_trim.cache_clear()
    cycle = Node()
    cycle.me = cycle  # only the collector frees it
    freed = weakref.ref(cycle)
    del cycle
    try:
        heap.settle()
        assert freed() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        heap._malloc_trim.cache_clear()
