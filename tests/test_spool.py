"""The spool: on disk before anything ships, rotated by size, bounded, kept across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.sinks.spool import SpoolSink


def lines(directory: Path) -> list[dict]:
    out = []
    for seg in sorted(directory.glob("*.jsonl")):
        out += [json.loads(line) for line in seg.read_text().splitlines()]
    return out


async def test_events_are_json_lines_in_order(tmp_path: Path) -> None:
    async with SpoolSink(tmp_path, 4096, 4) as spool:
        for i in range(3):
            await spool.emit({"level": "info", "ts": "t", "msg": f"m{i}"})
    assert [e["msg"] for e in lines(tmp_path)] == ["m0", "m1", "m2"]


async def test_rotates_by_size_and_drops_the_oldest_counting_them(tmp_path: Path) -> None:
    event = {"level": "info", "msg": "x" * 1000}
    async with SpoolSink(tmp_path, 4096, 3) as spool:
        for i in range(20):
            await spool.emit(event | {"i": i})
        segments = spool.segments()
    assert len(segments) == 3
    assert all(s.stat().st_size <= 4096 for s in segments)
    kept = [e["i"] for e in lines(tmp_path)]
    assert kept == list(range(20 - len(kept), 20))  # the newest, in order
    assert spool.dropped_events == 20 - len(kept)


async def test_a_restart_appends_after_what_is_there(tmp_path: Path) -> None:
    async with SpoolSink(tmp_path, 4096, 4) as spool:
        await spool.emit({"msg": "before"})
    async with SpoolSink(tmp_path, 4096, 4) as spool:
        await spool.emit({"msg": "after"})
    assert [e["msg"] for e in lines(tmp_path)] == ["before", "after"]


async def test_a_batch_and_its_checkpoint_land_whole_or_not_at_all(tmp_path: Path) -> None:
    async with SpoolSink(tmp_path, 1 << 20, 4) as spool:
        spool.hold()
        await spool.emit({"msg": "a"})
        spool.write(spool.take({"kernel_log": {"commit": 1}}, batch=1))
        spool.hold()
        await spool.emit({"msg": "b"})
        spool.write(spool.take({}, batch=2))  # a batch of no streaming check's
        spool.hold()
        assert spool.take({}, batch=3) == b""  # nothing to write
        spool.hold()
        for msg in ("c", "d", "e"):
            await spool.emit({"msg": msg})
        spool.write(spool.take({"kernel_log": {"commit": 2}}, batch=3))
    seg = spool.segments()[-1]
    whole = seg.read_bytes()
    seg.write_bytes(whole[: whole.rindex(b'{"msg":"d"') + 5])  # killed mid-write
    spool = SpoolSink(tmp_path, 1 << 20, 4)
    # The torn batch is gone, and with it its checkpoint: it counts as not written (its state's
    # outbox writes it again, or its events come again from the source, from the last whole
    # checkpoint).
    assert spool.last_batch() == 2
    assert spool.last_checkpoints() == {"kernel_log": {"commit": 1}}
    assert [e["msg"] for e in lines(tmp_path) if "msg" in e] == ["a", "b"]


async def test_a_segment_that_cannot_be_made_leaves_no_stale_descriptor(
    tmp_path: Path, monkeypatch
) -> None:
    """Rotation closes the full segment, then makes the next; where that fails (a disk gone
    read-only), the writes after must not use the closed descriptor's number (write to it,
    fsync and close it at the next rotation), which the process may have given to another
    file since."""
    import os

    import agent.sinks.spool

    spool_dir, other = tmp_path / "spool", tmp_path / "other-file"
    event = {"level": "info", "msg": "x" * 100}
    async with SpoolSink(spool_dir, 150, 4) as spool:
        await spool.emit(event | {"i": 0})
        real_open = os.open

        def read_only(path, flags, *args):
            if str(path).endswith("0000000002.jsonl"):
                raise OSError(30, "Read-only file system")
            return real_open(path, flags, *args)

        monkeypatch.setattr(agent.sinks.spool.os, "open", read_only)
        with pytest.raises(OSError):  # the daemon counts it and goes on
            await spool.emit(event | {"i": 1})
        monkeypatch.setattr(agent.sinks.spool.os, "open", real_open)
        fd = os.open(other, os.O_WRONLY | os.O_CREAT)  # the lowest free number: the closed one's
        try:
            await spool.emit(event | {"i": 2})
        finally:
            os.close(fd)
    assert other.read_bytes() == b""
    assert [e["i"] for e in lines(spool_dir)][-1] == 2
