"""Find the lines worth a closer look, in bulk: every anchor of every rule, in one pass.

Hyperscan runs all anchors over a whole buffer at once, in C; where it cannot be imported
(it is built for x86-64 only), one Python regex alternation does the same job, about six
times slower on a 76 MB log (see benchmarks/kernel_log.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Prefilter = Callable[[bytes], list[int]]
Locator = Callable[[bytes], list[tuple[int, int]]]


def build(anchors: list[str], engine: str = "auto") -> tuple[str, Prefilter]:
    """(engine name, function returning the end offset of every anchor found in a buffer)."""
    if engine in ("auto", "hyperscan"):
        try:
            return "hyperscan", _hyperscan(anchors)
        except ImportError:
            if engine == "hyperscan":
                raise
    return "re", _regex(anchors)


def _hyperscan(anchors: list[str]) -> Prefilter:
    import hyperscan

    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    expressions = [re.escape(a).encode() for a in anchors]
    db.compile(expressions=expressions, ids=list(range(len(anchors))), elements=len(anchors))

    def scan(buf: bytes) -> list[int]:
        ends: list[int] = []
        if buf:
            db.scan(buf, match_event_handler=lambda _id, _from, to, _flags, _ctx: ends.append(to))
        ends.sort()
        return ends

    return scan


def _regex(anchors: list[str]) -> Prefilter:
    alternation = re.compile(b"|".join(re.escape(a.encode()) for a in anchors))

    def scan(buf: bytes) -> list[int]:
        return [m.end() for m in alternation.finditer(buf)]

    return scan


def locate(words: list[bytes]) -> Locator | None:
    """Where each of `words` ends in a buffer, every occurrence of every word, overlapping ones
    too: sorted (end offset, word's index). One pass of hyperscan over the buffer, against one
    `find` pass a word; None where hyperscan cannot be imported (the caller finds its own)."""
    try:
        import hyperscan
    except ImportError:
        return None
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(
        expressions=[re.escape(w) for w in words], ids=list(range(len(words))), elements=len(words)
    )

    def scan(buf: bytes) -> list[tuple[int, int]]:
        hits: list[tuple[int, int]] = []
        if buf:
            db.scan(buf, match_event_handler=lambda i, _from, to, _f, _c: hits.append((to, i)))
        hits.sort()
        return hits

    return scan
