"""Giving the OS back what start-up used and no longer needs.

Importing and parsing (the settings, the rule tables, the kubernetes and botocore modules and
data) leave the heap larger than what stays in use: the interpreter keeps freed objects'
memory for reuse and glibc keeps freed blocks, in each thread's arena, until trimmed. After
start-up, and after the one-time work of a sink's first use, the cycles are collected, what is
left is frozen out of the collector's scans (it lives as long as the process), and glibc
returns its free pages (`malloc_trim`; other C libraries: nothing to do).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable


def settle() -> None:
    gc.collect()
    gc.freeze()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
