"""Batches within PutLogEvents' limits and the spool cursor, without AWS."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from agent.ship.batch import (
    EVENT_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    TRUNCATED,
    Batch,
    LogEvent,
    fit,
    timestamp_ms,
)
from agent.ship.spoolreader import SpoolReader
from tests.test_events import huge_detection


def fill(events: list[LogEvent]) -> list[Batch]:
    out: list[Batch] = []
    for ev in events:
        if not out or not out[-1].fits(ev):
            out.append(Batch(ev.stream))
        out[-1].add(ev)
    return out


def ev(i: int, size: int = 100, ts: int = 1_700_000_000_000, stream: str = "s") -> LogEvent:
    return LogEvent(ts, "x" * size, stream, (1, i))


def test_a_burst_of_100k_small_events_takes_ten_calls() -> None:
    batches = fill([ev(i, size=50) for i in range(100_000)])
    assert [len(b.events) for b in batches] == [MAX_BATCH_EVENTS] * 10


def test_bytes_count_the_26_byte_overhead_and_never_pass_the_limit() -> None:
    size = 10_000 - EVENT_OVERHEAD  # 10,000 bytes an event with its overhead
    batches = fill([ev(i, size) for i in range(300)])
    assert [len(b.events) for b in batches] == [104, 104, 92]
    assert all(b.size <= MAX_BATCH_BYTES for b in batches)


def test_a_batch_spans_at_most_24_hours_and_one_stream() -> None:
    day = 24 * 3600 * 1000
    events = [ev(0, ts=0), ev(1, ts=day), ev(2, ts=day + 1), ev(3, ts=day + 2, stream="t")]
    assert [[e.end[1] for e in b.events] for b in fill(events)] == [[0, 1], [2], [3]]


def test_events_go_out_in_time_order() -> None:
    b = Batch("s")
    for i, ts in enumerate([3000, 1000, 2000, 1000]):
        b.add(LogEvent(ts, f"m{i}", "s", (1, i)))
    req = b.request("g")
    assert [e["message"] for e in req["logEvents"]] == ["m1", "m3", "m2", "m0"]
    assert (req["logGroupName"], req["logStreamName"]) == ("g", "s")


def test_an_oversized_event_stays_json_with_hyperpods_keys() -> None:
    # two bytes a character, quotes and a control character that JSON escapes: 4 x the limit
    text = 'é"\x01' * (MAX_EVENT_BYTES // 2)
    event = huge_detection(text)
    out = fit(event, json.dumps(event, ensure_ascii=False, separators=(",", ":")))
    assert len(out.encode()) <= MAX_EVENT_BYTES
    got = json.loads(out)
    assert list(got)[: len(event)] == list(event)  # every key, in order
    assert got["HealthMonitoringAgentDetectionEvent"] == "HealthEvent"
    assert (got["node"], got["check"], got["reason"]) == (
        "node-a",
        "kernel-log",
        "XidHardwareFailure",
    )
    assert got["details: "]["reason"] == "XidHardwareFailure"
    for where in got["truncated"]:  # each cut value is named and ends with the marker
        value = got
        for key in where.split("."):
            value = value[key]
        assert value.endswith(TRUNCATED)
    assert {"msg", "message", "details: .message", "evidence.line"} >= set(got["truncated"])
    assert got["message"].startswith('é"\x01é"')  # what is kept is the start


def test_an_event_of_many_small_values_gives_up_the_biggest_object() -> None:
    event = huge_detection("short")
    event["evidence"] = {f"k{i}": "v" * 40 for i in range(20_000)}  # about 1 MB of small values
    got = json.loads(fit(event, json.dumps(event)))
    assert got["evidence"].startswith(TRUNCATED) and got["truncated"] == ["evidence"]
    assert got["message"] == "short" and got["HealthMonitoringAgentDetectionEvent"]


def test_an_event_within_the_limit_is_left_as_it_is() -> None:
    line = json.dumps(huge_detection("x" * 1000))
    assert fit(json.loads(line), line) == line


def test_event_time_from_its_ts() -> None:
    assert timestamp_ms({"ts": "2024-08-21T18:35:35Z"}) == 1724265335000
    assert timestamp_ms({"ts": "garbage"}, fallback=5.0) == 5000


def write(directory, seq: int, lines: list[str], tail: str = "") -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{seq:010d}.jsonl").write_text("".join(line + "\n" for line in lines) + tail)


def test_the_cursor_resumes_and_a_half_written_line_waits(tmp_path) -> None:
    spool, cursor = tmp_path / "spool", tmp_path / "cursor"
    write(spool, 1, ['{"a":1}', '{"a":2}'], tail='{"a":')
    reader = SpoolReader(spool, cursor)
    got = list(reader.lines())
    assert [json.loads(line) for line, _ in got] == [{"a": 1}, {"a": 2}]
    reader.commit(got[0][1])
    again = SpoolReader(spool, cursor)  # a restart: from the cursor on
    assert [line for line, _ in again.lines()] == [b'{"a":2}\n']
    with (spool / "0000000001.jsonl").open("a") as f:
        f.write("3}\n")
    assert [line for line, _ in again.lines()][-1] == b'{"a":3}\n'
    assert again.depth() == len(b'{"a":2}\n{"a":3}\n')


def test_segments_in_order_and_one_the_spool_dropped_is_skipped(tmp_path) -> None:
    spool, cursor = tmp_path / "spool", tmp_path / "cursor"
    write(spool, 1, ['{"s":1}'])
    write(spool, 2, ['{"s":2}'])
    write(spool, 3, ['{"s":3}'])
    reader = SpoolReader(spool, cursor)
    first = next(reader.lines())
    reader.commit(first[1])
    os.unlink(spool / "0000000001.jsonl")
    os.unlink(spool / "0000000002.jsonl")  # dropped while the spool was full
    assert [json.loads(line) for line, _ in reader.lines()] == [{"s": 3}]


@pytest.mark.parametrize("segments", [[1], [1, 2]])
def test_a_spool_made_anew_under_the_cursor_is_shipped_from_its_start(tmp_path, segments):
    """The spool deleted (the cursor kept) and begun again from segment 1: what it holds was
    never shipped. Before, the cursor's segment 3 (or its offset) hid it, depth 0."""
    spool, cursor = tmp_path / "spool", tmp_path / "cursor"
    for n in (1, 2, 3):
        write(spool, n, [f'{{"old":{n}}}'] * 3)
    reader = SpoolReader(spool, cursor)
    reader.commit(list(reader.lines())[-1][1])  # all shipped: the cursor in segment 3
    shutil.rmtree(spool)
    for n in segments:
        write(spool, n, [f'{{"new":{n}}}'])
    again = SpoolReader(spool, cursor)
    assert [json.loads(line) for line, _ in again.lines()] == [{"new": n} for n in segments]
    assert again.depth() == sum(len(f'{{"new":{n}}}\n') for n in segments)


def test_a_segment_shorter_than_the_cursor_is_read_from_its_start(tmp_path) -> None:
    spool, cursor = tmp_path / "spool", tmp_path / "cursor"
    write(spool, 1, ['{"old":1}'] * 5)
    reader = SpoolReader(spool, cursor)
    reader.commit(list(reader.lines())[-1][1])
    write(spool, 1, ['{"new":1}'])  # the spool deleted, its first segment written again
    assert [json.loads(line) for line, _ in SpoolReader(spool, cursor).lines()] == [{"new": 1}]


def test_unreadable_spool_lines_are_counted_once_and_stepped_over(tmp_path) -> None:
    from agent.identity import Identity
    from agent.metrics import Metrics
    from agent.models import CloudWatchSettings
    from agent.sinks.cloudwatch import CloudWatchSink

    spool, cursor = tmp_path / "spool", tmp_path / "cursor"
    write(spool, 1, ['{"level":"info","ts":"2026-11-23T10:00:00Z","msg":"ok"}', '{"level":"in'])
    metrics = Metrics()
    sink = CloudWatchSink(CloudWatchSettings(), Identity(node_name="n"), spool, cursor, metrics)
    [batch] = sink._batches()
    sink.reader.commit(batch.end)  # as after CloudWatch took it
    assert sink._batches() == [] and sink._batches() == []
    rejected = metrics.registry.get_sample_value("node_health_cloudwatch_rejected_events_total")
    assert rejected == 1  # counted once, though read twice
