"""The counter-velocity table and its state file: what a bad row or a bad file does."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from checks.api import load_yaml
from checks.counters import Limit, Velocity, table
from checks.link_counters import LinkCountersOptions


def test_every_packaged_limit_loads_and_names_its_source() -> None:
    import importlib.resources

    text = importlib.resources.files("checks").joinpath("counters.yaml").read_text()
    sections = load_yaml(text)
    assert set(sections) == {"infiniband", "nvlink", "pcie"}
    for name, rows in sections.items():
        assert len(table(name)) == len(rows)
        assert all(row.get("source") for row in rows), name


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"counter": "x", "window": "1m"}, "exactly one of over, flaps"),
        ({"counter": "x", "window": "1m", "over": 1, "flaps": 2}, "exactly one of over, flaps"),
        ({"counter": "x", "over": 1}, "counter and window are required"),
        ({"counter": "x", "window": "soon", "over": 1}, "is not a duration"),
        ({"counter": "x", "window": "1m", "over": 1, "rate": 3}, "unknown field"),
    ],
)
def test_a_bad_limit_row_is_refused_with_its_reason(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limit.of(row)
    with pytest.raises(ValidationError, match=message):  # from the settings: a config error
        LinkCountersOptions(infiniband=[row])


def test_an_unreadable_state_file_is_a_new_baseline_and_an_unwritable_one_no_crash(
    tmp_path,
) -> None:
    limits = [Limit.of({"counter": "c", "over": 0, "window": "1m"})]
    state = tmp_path / "counters.json"
    state.write_text("{not json")
    v = Velocity(limits, state, "boot")
    assert v.observe(0.0, "k", "c", 100) == []  # a baseline, not a burst of 100
    v.save()
    assert Velocity(limits, state, "boot").observe(60.0, "k", "c", 101) != []
    blocked = tmp_path / "file"
    blocked.write_text("")
    v = Velocity(limits, blocked / "counters.json", "boot")  # its directory is a file
    v.observe(0.0, "k", "c", 1)
    v.save()


def test_a_struck_out_counter_growing_within_its_limit_stays_persistent_across_a_restart(
    tmp_path,
) -> None:
    limits = [Limit.of({"counter": "c", "over": 5, "window": "1m", "strikes": 1})]
    state = tmp_path / "counters.json"
    v = Velocity(limits, state, "boot")
    assert v.observe(0.0, "k", "c", 0) == []
    assert [(b.increase, b.permanent) for b in v.observe(60.0, "k", "c", 10)] == [(10, True)]
    assert [b.permanent for b in v.observe(120.0, "k", "c", 11)] == [True]  # 1/min now
    v.save()
    again = Velocity(limits, state, "boot")  # an agent restart in the same boot
    assert [b.permanent for b in again.observe(180.0, "k", "c", 12)] == [True]
    for t in (0.0, 60.0, 120.0, 180.0):  # another counter, growing within the limit: no breach
        assert again.observe(t, "other", "c", int(t / 60)) == []
    assert Velocity(limits, state, "boot-2").observe(240.0, "k", "c", 13) == []  # a reboot
