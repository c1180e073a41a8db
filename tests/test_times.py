"""The one duration grammar (settings, rules, --deadline, --since) and the one parser of ISO 8601
times (events' `ts`, Kubernetes' creationTimestamp, --since): every form accepted, and refused."""

from __future__ import annotations

import pytest

from agent import logs_tail as lt
from agent.controller.requests import _created
from agent.events import parse_time, rfc3339
from agent.models import ControllerSettings, DeepCheckSettings
from agent.ship.batch import timestamp_ms
from checks.api import seconds

T = 1795428000.0  # 2026-11-23T10:00:00Z


@pytest.mark.parametrize(
    "text, expected",
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("2w", 1209600.0),
        (" 5 m ", 300.0),
        (90, 90.0),
    ],
)
def test_every_duration_reads_the_same_in_settings_rules_and_options(text, expected) -> None:
    assert seconds(text, "--deadline") == expected
    assert DeepCheckSettings(deadline=text).deadline == expected
    if isinstance(text, str) and not text.replace(".", "").strip().isdigit():  # bare: a time
        assert lt.since_ms(text, now=T) == int((T - expected) * 1000)


@pytest.mark.parametrize("text", ["", "soon", "5h30m", "1y", "-5m", "0", "0s", "1e3", "m"])
def test_what_is_no_duration_is_refused_naming_the_option(text) -> None:
    with pytest.raises(ValueError, match=r"--deadline: .* is not a duration"):
        seconds(text, "--deadline")


@pytest.mark.parametrize("text", [0, "0", "0s"])
def test_a_period_whose_zero_means_never_takes_zero_and_a_duration_does_not(text) -> None:
    assert ControllerSettings(scan=text).scan == 0  # the README: `controller.scan` 0: never
    with pytest.raises(ValueError, match="greater than 0"):
        DeepCheckSettings(deadline=text)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ControllerSettings(scan=-1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-23T10:00:00Z", T),  # what rfc3339() writes, and Kubernetes
        ("2026-11-23T10:00:00.250Z", T + 0.25),
        ("2026-11-23T12:00:00+02:00", T),
        ("2026-11-23T05:00:00-0500", T),
        ("2026-11-23T10:00:00", T),  # no offset: UTC, as every time the agent writes
        ("2026-11-23 10:00:00", T),
        ("2026-11-23", T - 36000),
        (" 2026-11-23T10:00:00Z ", T),
    ],
)
def test_iso_times_with_offsets_are_read_by_every_parser(text, expected) -> None:
    assert parse_time(text) == expected
    assert timestamp_ms({"ts": text}) == int(expected * 1000)
    assert _created({"metadata": {"creationTimestamp": text}}) == expected
    assert lt.since_ms(text) == int(expected * 1000)


@pytest.mark.parametrize(
    "value", ["", "yesterday", "2026-13-01T00:00:00Z", "2026-02-30", "10:00:00", "23/11/2026", None]
)
def test_what_is_no_time_is_refused_by_every_parser(value) -> None:
    with pytest.raises(ValueError):
        parse_time(value)
    assert timestamp_ms({"ts": value}, fallback=7.0) == 7000  # an event keeps its place: now
    assert _created({"metadata": {"creationTimestamp": value}}) is None
    if isinstance(value, str):
        with pytest.raises(ValueError, match=r"--since: .* neither a duration"):
            lt.since_ms(value)


def test_rfc3339_and_parse_time_round_trip() -> None:
    assert parse_time(rfc3339(T)) == T


def test_since_a_bare_number_is_epoch_seconds_as_aws_reads_it() -> None:
    assert lt.since_ms("1795428000") == int(T * 1000)
    assert lt.since_ms("1795428000.5") == int(T * 1000) + 500
