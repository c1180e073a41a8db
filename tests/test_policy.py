"""The verdict: thresholds, windows, latching, escalation, hysteresis, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.policy import (
    Cleared,
    DeepCheckWanted,
    Policy,
    PolicyRule,
    PolicySettings,
    RebootSeen,
    Reported,
    StateCorruptError,
    Verdict,
    VerdictChanged,
    builtin_rules,
    coalesce,
    rule_table,
)
from checks.api import Action, Finding, Status


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def xid(
    code: int,
    gpu: str = "gpu:0000:b9:00",
    action: Action = Action.RESTART_APP,
    pid: str | None = None,
) -> Finding:
    return Finding(
        gpu,
        "NvidiaXid",
        Status.FAULT,
        "XidUserAppError" if action is Action.RESTART_APP else "XidHardwareFailure",
        f"NVRM: Xid {code}",
        action,
        evidence={"xid": str(code)} | ({"pid": pid} if pid else {}),
        temporary=True,
        check="kernel-log",
    )


def deep_checks(changes: list) -> list[DeepCheckWanted]:
    return [c for c in changes if isinstance(c, DeepCheckWanted)]


def poll(status: Status, action: Action = Action.REBOOT, component: str = "gpu:0") -> Finding:
    return Finding(
        component,
        "GpuHealth",
        status,
        "Bad" if status is Status.FAULT else "Good",
        f"gpu is {status}",
        action if status is Status.FAULT else Action.NONE,
        check="nvml",
    )


def verdicts(changes: list) -> list[Verdict]:
    return [c.new for c in changes if isinstance(c, VerdictChanged)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(
    clock: Clock,
    path: Path | None = None,
    boot: str | None = "boot-1",
    rules: list[PolicyRule] | None = None,
    **settings,
) -> Policy:
    ps = PolicySettings(**settings)
    return Policy(rules or rule_table(ps), ps, path, boot, clock=clock)


def test_reboot_class_fault_takes_the_node_out_at_once(clock: Clock) -> None:
    policy = make(clock)
    changes = policy.observe([poll(Status.FAULT, Action.REBOOT)])
    assert verdicts(changes) == [Verdict.PENDING_REBOOT]
    assert isinstance(changes[0], Reported) and changes[0].tracker.active


def test_replace_outranks_reboot(clock: Clock) -> None:
    policy = make(clock)
    policy.observe([poll(Status.FAULT, Action.REBOOT, "gpu:0")])
    changes = policy.observe([poll(Status.FAULT, Action.REPLACE, "gpu:1")])
    assert verdicts(changes) == [Verdict.PENDING_REPLACEMENT]


def test_app_xids_recurring_on_one_gpu_ask_for_a_deep_check_not_a_reboot(clock) -> None:
    # Three XID 13 incidents in ten minutes on one GPU: NVIDIA's catalog asks for diagnostics.
    policy = make(clock)
    for _ in range(2):
        assert deep_checks(policy.observe([xid(13)])) == []
        clock.now += 240
    changes = policy.observe([xid(13)])
    (wanted,) = deep_checks(changes)
    assert wanted.tracker.component == "gpu:0000:b9:00" and "3 occurrences" in wanted.why
    assert verdicts(changes) == [] and policy.verdict is Verdict.SCHEDULABLE
    clock.now += 240  # still recurring: the one request stands, no second one
    assert deep_checks(policy.observe([xid(13)])) == []


def test_one_incident_of_several_app_xid_codes_is_one_occurrence(clock) -> None:
    # XIDs 13, 31 and 43 printed for one fault within seconds are one occurrence, however
    # many lines and codes: no deep check, no reboot.
    policy = make(clock)
    for code in (13, 31, 43, 13, 31):
        assert deep_checks(policy.observe([xid(code)])) == []
        clock.now += 2
    assert policy.verdict is Verdict.SCHEDULABLE


def test_a_crash_looping_job_is_looked_at_never_rebooted_by_count(clock) -> None:
    # The same process's XIDs minutes apart are one incident; a restarted job (a new pid)
    # recurring is looked at with a deep check, and the node stays Schedulable.
    policy = make(clock)
    for _ in range(4):
        assert deep_checks(policy.observe([xid(31, pid="4242")])) == []
        clock.now += 120
    changes: list = []
    for pid in ("5001", "5002"):
        changes += policy.observe([xid(31, pid=pid)])
        clock.now += 120
    assert len(deep_checks(changes)) == 1
    assert policy.verdict is Verdict.SCHEDULABLE


def test_occurrences_outside_the_window_do_not_add_up(clock: Clock) -> None:
    policy = make(clock)
    for _ in range(5):
        assert verdicts(policy.observe([xid(13)])) == []
        clock.now += 301  # two occurrences at most within any 10 minutes
    assert policy.verdict is Verdict.SCHEDULABLE


def test_the_same_xid_on_other_gpus_is_counted_per_gpu(clock: Clock) -> None:
    policy = make(clock)
    for gpu in ("gpu:0000:b9:00", "gpu:0000:ba:00", "gpu:0000:bb:00"):
        policy.observe([xid(13, gpu)])
    assert policy.verdict is Verdict.SCHEDULABLE


def test_each_temporary_fault_is_reported_even_when_it_repeats(clock: Clock) -> None:
    policy = make(clock)
    reported = []
    for _ in range(3):
        reported += [c for c in policy.observe([xid(13)]) if isinstance(c, Reported)]
        clock.now += 20  # the second is part of the first's incident, the third is not
    assert len(reported) == 3
    assert [len(c.tracker.occurrences) for c in reported] == [1, 1, 2]


def test_flapping_finding_does_not_flap_the_verdict(clock: Clock) -> None:
    rule = PolicyRule(name="flappy", match={"check": "nvml"}, latch=False, clean_polls=3)
    policy = make(clock, rules=[rule])
    seen = []
    for status in [Status.FAULT, Status.OK, Status.FAULT, Status.OK, Status.OK, Status.FAULT]:
        seen += verdicts(policy.observe([poll(status)]))
        clock.now += 30
    assert seen == [Verdict.PENDING_REBOOT]
    for _ in range(2):
        assert verdicts(policy.observe([poll(Status.OK)])) == []
    changes = policy.observe([poll(Status.OK)])
    assert isinstance(changes[0], Cleared)
    assert changes[0].why == "3 clean polls in a row"
    assert verdicts(changes) == [Verdict.SCHEDULABLE]


def test_repeated_identical_polls_report_once(clock: Clock) -> None:
    policy = make(clock)
    assert len(policy.observe([poll(Status.OK)])) == 1  # the condition's first state
    assert policy.observe([poll(Status.OK)]) == []
    assert len(policy.observe([poll(Status.FAULT)])) == 2  # the fault and the verdict
    assert policy.observe([poll(Status.FAULT)]) == []


def test_reboot_verdict_latches_until_the_node_reboots(clock: Clock) -> None:
    policy = make(clock)
    policy.observe([poll(Status.FAULT, Action.REBOOT)])
    for _ in range(5):
        policy.observe([poll(Status.OK)])
    assert policy.verdict is Verdict.PENDING_REBOOT
    condition = policy.trackers["nvml\tGpuHealth\tgpu:0"]
    assert not condition.active  # the condition itself cleared after three clean polls


def test_unknown_is_never_a_fault_nor_a_clean_poll(clock: Clock) -> None:
    rule = PolicyRule(name="r", match={}, latch=False, clean_polls=2)
    policy = make(clock, rules=[rule])
    changes = policy.observe([poll(Status.UNKNOWN)])
    assert verdicts(changes) == [] and policy.verdict is Verdict.SCHEDULABLE
    policy.observe([poll(Status.FAULT)])
    for _ in range(4):
        policy.observe([poll(Status.UNKNOWN)])
    assert policy.verdict is Verdict.PENDING_REBOOT  # unknown polls did not clear it


def test_event_only_fault_clears_after_its_ttl(clock: Clock) -> None:
    rule = PolicyRule(name="r", match={}, latch=False, ttl=600)
    policy = make(clock, rules=[rule])
    policy.observe([xid(79, action=Action.REBOOT)])
    assert policy.verdict is Verdict.PENDING_REBOOT
    assert policy.next_deadline() == clock.now + 600
    clock.now += 599
    assert policy.expire() == []
    clock.now += 1
    changes = policy.expire()
    assert isinstance(changes[0], Cleared)
    assert verdicts(changes) == [Verdict.SCHEDULABLE]


def test_restart_keeps_the_verdict_and_does_not_report_again(clock: Clock, tmp_path) -> None:
    path = tmp_path / "policy.json"
    first = make(clock, path)
    first.observe([poll(Status.FAULT, Action.REPLACE)])
    first.save()
    again = make(clock, path)
    assert again.verdict is Verdict.PENDING_REPLACEMENT
    assert again.observe([poll(Status.FAULT, Action.REPLACE)]) == []


def test_reboot_clears_the_latch_after_the_first_round_and_escalates_a_relapse(
    clock: Clock, tmp_path
) -> None:
    path = tmp_path / "policy.json"
    before = make(clock, path, boot="boot-1")
    before.observe([poll(Status.FAULT, Action.REBOOT)])
    before.save()
    clock.now += 600
    after = make(clock, path, boot="boot-2")
    changes = after.observe([])
    assert isinstance(changes[0], RebootSeen)
    assert after.verdict is Verdict.PENDING_REBOOT  # held until the first round of checks
    after.observe([poll(Status.OK)])
    assert verdicts(after.release_hold()) == [Verdict.SCHEDULABLE]
    clock.now += 3600
    relapse = after.observe([poll(Status.FAULT, Action.REBOOT)])
    assert verdicts(relapse) == [Verdict.PENDING_REPLACEMENT]
    assert relapse[0].tracker.escalated


def test_hold_after_reboot_survives_an_agent_restart(clock: Clock, tmp_path) -> None:
    path = tmp_path / "policy.json"
    p = make(clock, path, boot="boot-1")
    p.observe([poll(Status.FAULT)])
    p.save()
    p = make(clock, path, boot="boot-2")
    p.observe([])
    p.save()
    p = make(clock, path, boot="boot-2")
    assert p.verdict is Verdict.PENDING_REBOOT
    assert verdicts(p.release_hold()) == [Verdict.SCHEDULABLE]


def test_escalation_is_forgotten_after_its_window(clock: Clock, tmp_path) -> None:
    path = tmp_path / "policy.json"
    p = make(clock, path, boot="boot-1", escalation_window=3600)
    p.observe([poll(Status.FAULT)])
    p.save()
    p = make(clock, path, boot="boot-2", escalation_window=3600)
    p.release_hold()
    clock.now += 3601
    assert verdicts(p.observe([poll(Status.FAULT)])) == [Verdict.PENDING_REBOOT]


def test_corrupt_state_is_moved_aside_not_fatal(clock: Clock, tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    with pytest.raises(StateCorruptError):
        make(clock, path)
    assert path.with_suffix(".corrupt").exists()
    assert make(clock, path).verdict is Verdict.SCHEDULABLE


def _saved(clock: Clock, tmp_path: Path) -> dict:
    path = tmp_path / "saved.json"
    p = make(clock, path)
    p.observe([poll(Status.FAULT)])
    p.save()
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: [],
        lambda s: s | {"trackers": {}},
        lambda s: s | {"hold": "Maybe"},
        lambda s: s | {"latched_keys": 5},
        lambda s: s | {"rebooted_for": ["x"]},
        lambda s: s | {"boot_id": 7},
        lambda s: s | {"trackers": [5]},
        lambda s: s | {"trackers": [s["trackers"][0] | {"occurrences": ["soon"]}]},
        lambda s: s | {"trackers": [s["trackers"][0] | {"changed": "now"}]},
        lambda s: s | {"trackers": [s["trackers"][0] | {"clean": "1"}]},
        lambda s: s | {"trackers": [s["trackers"][0] | {"evidence": []}]},
        lambda s: "[" * 100_000,
    ],
)
def test_state_of_any_wrong_shape_is_moved_aside_and_the_next_start_is_fresh(
    clock: Clock, tmp_path: Path, damage
) -> None:
    path = tmp_path / "policy-state.json"
    bad = damage(_saved(clock, tmp_path))
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(StateCorruptError, match=r"moved to policy-state\.corrupt,"):
        make(clock, path)
    assert not path.exists() and path.with_suffix(".corrupt").exists()
    fresh = make(clock, path)
    assert fresh.verdict is Verdict.SCHEDULABLE and fresh.trackers == {}
    fresh.observe([poll(Status.FAULT)])
    fresh.save()
    assert make(clock, path).verdict is Verdict.PENDING_REBOOT


def test_a_directory_in_place_of_the_state_is_moved_aside(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "policy-state.json"
    path.mkdir()
    path.with_suffix(".corrupt").mkdir()  # an earlier one, in the way
    (path.with_suffix(".corrupt") / "x").write_text("")
    with pytest.raises(StateCorruptError, match=r"moved to policy-state\.corrupt\.\d+"):
        make(clock, path)
    p = make(clock, path)
    p.observe([poll(Status.FAULT)])
    p.save()
    assert path.is_file()


def test_rules_from_settings_win_over_the_packaged_table(clock: Clock) -> None:
    ps = PolicySettings(
        rules=[PolicyRule(name="ignore-gpu0", match={"component": "gpu:0"}, action=Action.NONE)]
    )
    policy = Policy(rule_table(ps), ps, None, None, clock=clock)
    policy.observe([poll(Status.FAULT, Action.REPLACE, "gpu:0")])
    assert policy.verdict is Verdict.SCHEDULABLE
    policy.observe([poll(Status.FAULT, Action.REPLACE, "gpu:1")])
    assert policy.verdict is Verdict.PENDING_REPLACEMENT


def test_packaged_table_ends_with_a_catch_all() -> None:
    rules = builtin_rules()
    assert rules[-1].match.patterns() == []
    assert json.dumps([r.name for r in rules])


def test_packaged_table_is_what_pydantic_validates() -> None:
    # The packaged table is built directly (no pydantic on the scan path); the settings'
    # rules go through pydantic. Both roads must give the same rules.
    from importlib import resources

    from pydantic import TypeAdapter

    from checks.api import load_yaml

    raw = load_yaml(resources.files("agent").joinpath("policy.yaml").read_text())["rules"]
    assert TypeAdapter(list[PolicyRule]).validate_python(raw) == builtin_rules()


def test_bad_policy_rules_are_refused() -> None:
    from pydantic import TypeAdapter, ValidationError

    for bad in (
        {"name": "x", "count": 0},
        {"name": "x", "window": "soon"},
        {"name": "x", "surprise": 1},
        {"name": "x", "action": "explode"},
    ):
        with pytest.raises(ValidationError):
            TypeAdapter(PolicyRule).validate_python(bad)


def test_a_batch_of_one_rule_on_one_component_is_one_event_with_a_count(clock) -> None:
    policy = make(clock)
    burst = [xid(13, pid=str(i)) for i in range(40)] + [xid(13, gpu="gpu:0000:ba:00")]
    burst[5] = Finding(**{**_fields(burst[5]), "evidence": {"pid": "5", "repeated": "9"}})
    changes = coalesce(policy.observe(burst))
    reported = [c for c in changes if isinstance(c, Reported)]
    assert [c.tracker.component for c in reported] == ["gpu:0000:b9:00", "gpu:0000:ba:00"]
    first = reported[0]
    assert first.finding.evidence["pid"] == "0"  # the first line's, as it was printed
    assert first.finding.evidence["repeated"] == str(39 + 9)  # the others, and their folds
    # Only the reporting is folded: the policy counted each as it would one by one.
    alone = make(clock)
    for f in burst:
        alone.observe([f])
    assert alone.trackers == policy.trackers


def test_a_change_in_between_keeps_the_events_apart(clock) -> None:
    policy = make(clock)
    fault, ok = poll(Status.FAULT), poll(Status.OK)
    changes = coalesce(policy.observe([fault, ok, ok, ok, fault]))
    kinds = [type(c).__name__ for c in changes if not isinstance(c, VerdictChanged)]
    assert kinds == ["Reported", "Cleared", "Reported"]  # not folded across the clearing


def _fields(f: Finding) -> dict:
    return {name: getattr(f, name) for name in Finding.__slots__}
