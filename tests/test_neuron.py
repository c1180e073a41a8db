"""Neuron checks on the Neuron docs' own neuron-ls and neuron-monitor outputs
(tests/fixtures/neuron, verbatim), with fake tools on the real subprocess path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checks.api import Action, CheckContext, Status
from checks.neuron import NeuronCheck, NeuronMonitorCheck, NeuronMonitorOptions, NeuronOptions
from checks.neuron_output import ReportJudge, judge_nccom, parse_neuron_ls, reports

FIXTURES = Path(__file__).parent / "fixtures" / "neuron"
FAKE = Path(__file__).parent / "bin" / "fake-tool"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def report(**changes: int) -> dict:
    """A neuron-monitor report put together from the docs' two fragments (the docs print the
    groups of a report one at a time), with device 0's counters changed as asked."""
    hardware = fixture("neuron-monitor-hardware-info-fragment.txt")
    counters = fixture("neuron-monitor-hw-counters-fragment.txt").rstrip().rstrip(",")
    doc = json.loads("{" + hardware + ', "system_data": {' + counters + "}}")
    doc["system_data"]["neuron_hw_counters"]["neuron_devices"][0].update(changes)
    return doc


@pytest.mark.parametrize(
    ("name", "devices"),
    [
        ("neuron-ls-trn2n-48xlarge.txt", list(range(16))),
        ("neuron-ls-trn2n-48xlarge-header.txt", list(range(16))),
        ("neuron-ls-inf1-6xlarge-procs.txt", [0, 1, 2, 3]),  # process rows are not devices
    ],
)
def test_neuron_ls_tables(name: str, devices: list[int]) -> None:
    assert parse_neuron_ls(fixture(name)) == devices


def test_neuron_ls_without_a_table() -> None:
    assert parse_neuron_ls("") is None
    assert parse_neuron_ls("\x00\x01 garbage | 3 |\n") is None


@pytest.fixture
def neuron_ls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "neuron-ls"
    exe.symlink_to(FAKE)
    return exe


@pytest.mark.parametrize(
    ("output", "itype", "rc", "mode", "status", "reason"),
    [
        (
            "neuron-ls-trn2n-48xlarge.txt",
            "trn2n.48xlarge",
            0,
            "",
            Status.OK,
            "NeuronDevicesPresent",
        ),
        (
            "neuron-ls-inf1-6xlarge-procs.txt",
            "trn2.48xlarge",
            0,
            "",
            Status.FAULT,
            "NeuronDeviceCountMismatch",
        ),
        ("neuron-ls-trn2n-48xlarge.txt", "trn2.48xlarge", 1, "", Status.UNKNOWN, "NeuronLsFailed"),
        ("neuron-ls-trn2n-48xlarge.txt", None, 0, "garbage", Status.UNKNOWN, "NeuronLsFailed"),
        # A short table from a neuron-ls that was killed or left a child is no count.
        (
            "neuron-ls-inf1-6xlarge-procs.txt",
            "trn2.48xlarge",
            0,
            "killed",
            Status.UNKNOWN,
            "NeuronLsFailed",
        ),
        (
            "neuron-ls-inf1-6xlarge-procs.txt",
            "trn2.48xlarge",
            0,
            "orphan",
            Status.UNKNOWN,
            "NeuronLsFailed",
        ),
    ],
)
async def test_neuron_check(
    neuron_ls: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: str,
    itype: str | None,
    rc: int,
    mode: str,
    status: Status,
    reason: str,
) -> None:
    monkeypatch.setenv("FAKE_NEURON_LS_OUTPUT", str(FIXTURES / output))
    monkeypatch.setenv("FAKE_NEURON_LS_RC", str(rc))
    monkeypatch.setenv("FAKE_NEURON_LS_MODE", mode)
    check = NeuronCheck(CheckContext(instance_type=itype), NeuronOptions(neuron_ls=str(neuron_ls)))
    [f] = await check.poll()
    assert (f.status, f.reason) == (status, reason)
    assert f.action is (Action.REBOOT if status is Status.FAULT else Action.NONE)


def test_healthy_report() -> None:
    found = ReportJudge(16, 10).judge(report())
    assert [(f.component, f.status) for f in found] == [("neuron:0", Status.OK)]


@pytest.mark.parametrize("counter", ["mem_ecc_uncorrected", "sram_ecc_uncorrected"])
def test_uncorrected_ecc_means_replace(counter: str) -> None:
    [f] = ReportJudge(16, 10).judge(report(**{counter: 2}))
    assert (f.status, f.reason, f.action) == (
        Status.FAULT,
        "NeuronUncorrectableEcc",
        Action.REPLACE,
    )
    assert f.component == "neuron:0" and counter in f.message


def test_corrected_ecc_by_rate_not_by_count() -> None:
    now = [0.0]
    judge = ReportJudge(16, rate=10, clock=lambda: now[0])
    assert all(f.status is Status.OK for f in judge.judge(report(mem_ecc_corrected=5000)))
    now[0] = 60.0
    assert all(f.status is Status.OK for f in judge.judge(report(mem_ecc_corrected=5005)))
    now[0] = 120.0
    burst = [f for f in judge.judge(report(mem_ecc_corrected=5100)) if f.status is Status.FAULT]
    assert [(f.reason, f.action, f.temporary) for f in burst] == [
        ("NeuronCorrectedEccBurst", Action.NONE, True)
    ]


def test_device_count_and_errors() -> None:
    short = ReportJudge(32, 10).judge(report())
    assert ("NeuronDeviceCountMismatch", Action.REBOOT) in [(f.reason, f.action) for f in short]
    broken = report()
    broken["system_data"]["neuron_hw_counters"]["error"] = "failed to read counters"
    broken["neuron_hardware_info"]["error"] = "driver not loaded"
    found = ReportJudge(16, 10).judge(broken)
    assert {f.status for f in found} == {Status.UNKNOWN}


def test_reports_are_read_across_chunks_and_past_garbage() -> None:
    line = json.dumps(report()) + "\n"
    docs, rest = reports(line[:100])
    assert docs == [] and rest == line[:100]
    docs, rest = reports(rest + line[100:] + "not json {oops\n" + line)
    assert len(docs) == 2 and rest == ""


async def test_neuron_monitor_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "neuron-monitor"
    exe.symlink_to(FAKE)
    out = tmp_path / "reports.jsonl"
    out.write_text(json.dumps(report()) + "\n" + json.dumps(report(sram_ecc_uncorrected=1)) + "\n")
    monkeypatch.setenv("FAKE_NEURON_MONITOR_OUTPUT", str(out))
    check = NeuronMonitorCheck(
        CheckContext(instance_type="trn2.48xlarge"),
        NeuronMonitorOptions(neuron_monitor=str(exe)),
    )
    found = []
    with pytest.raises(OSError, match="exited 0"):  # it ended: the runner restarts it
        async for f in check.stream():
            found.append(f)
    assert [f.reason for f in found] == ["NeuronEccOk", "NeuronUncorrectableEcc"]


@pytest.mark.parametrize(
    ("name", "rc", "status", "reason"),
    [
        ("nccom-test-allr-2ranks.txt", 0, Status.OK, "NccomTestPassed"),
        ("nccom-test-failed.txt", 1, Status.FAULT, "NccomTestFailed"),
        ("nccom-test-driver-not-running.txt", 1, Status.UNKNOWN, "NccomTestError"),
    ],
)
def test_nccom_test_outputs(name: str, rc: int, status: Status, reason: str) -> None:
    f = judge_nccom(fixture(name), rc)
    assert (f.status, f.reason) == (status, reason)
    assert f.action is (Action.REPLACE if status is Status.FAULT else Action.NONE)
