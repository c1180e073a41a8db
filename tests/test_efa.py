"""The EFA check: fi_info (a fake replaying real outputs), port state and counter rates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checks.api import Action, CheckContext, Status
from checks.efa import EfaCheck, EfaOptions
from checks.efa_output import judge_loopback, parse_fi_info, parse_pingpong

FIX = Path(__file__).parent / "fixtures" / "efa"
BIN = Path(__file__).parent / "bin"
P4DE = ["rdmap16s27", "rdmap32s27", "rdmap144s27", "rdmap160s27"]


@pytest.fixture
def fake_fi_info(monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin")

    def use(output: str, mode: str = "", rc: int = 0) -> None:
        monkeypatch.setenv("FAKE_FI_INFO_OUTPUT", str(FIX / output))
        monkeypatch.setenv("FAKE_FI_INFO_MODE", mode)
        monkeypatch.setenv("FAKE_FI_INFO_RC", str(rc))

    return use


def sysfs(root: Path, devices: list[str], state: str = "4: ACTIVE", **counters: int) -> None:
    for dev in devices:
        port = root / "sys/class/infiniband" / dev / "ports" / "1"
        (port / "hw_counters").mkdir(parents=True, exist_ok=True)
        (root / "sys/class/infiniband" / dev / "device").mkdir(exist_ok=True)
        (root / "sys/class/infiniband" / dev / "device" / "vendor").write_text("0x1d0f\n")
        (port / "state").write_text(state + "\n")
        for name, value in counters.items():
            (port / "hw_counters" / name).write_text(f"{value}\n")


def efa(root: Path, instance_type: str | None = "p4de.24xlarge", **options) -> EfaCheck:
    return EfaCheck(
        CheckContext(host_root=root, instance_type=instance_type), EfaOptions(**options)
    )


def faults(found):
    return [(f.component, f.reason, f.action) for f in found if f.status is Status.FAULT]


def test_fi_info_outputs_parse_to_devices() -> None:
    assert parse_fi_info((FIX / "fi_info-p4de-4-devices.txt").read_text()) == P4DE
    assert parse_fi_info((FIX / "fi_info-libfabric5689-1-device.txt").read_text()) == ["efa_0"]
    assert parse_fi_info((FIX / "fi_info-no-efa.txt").read_text()) == []


async def test_healthy_p4de(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    sysfs(tmp_path, P4DE, rx_drops=10)
    found = await efa(tmp_path).poll()
    assert faults(found) == []
    count = next(f for f in found if f.condition == "EfaDevices")
    assert count.evidence["devices"] == P4DE and count.evidence["expected"] == 4


async def test_missing_devices_on_a_p5(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    found = await efa(tmp_path, "p5.48xlarge").poll()
    assert faults(found) == [("node", "EfaDeviceCountMismatch", Action.REBOOT)]
    assert "4 of 32 EFA devices" in found[0].message


async def test_no_provider_where_efa_is_expected_and_where_not(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-no-efa.txt", rc=61)  # -FI_ENODATA, as fi_info exits
    assert faults(await efa(tmp_path).poll()) == [("node", "EfaDeviceCountMismatch", Action.REBOOT)]
    (f,) = await efa(tmp_path, instance_type="g5.xlarge").poll()
    assert (f.status, f.reason) == (Status.UNKNOWN, "NoEfaProvider")


@pytest.mark.parametrize(
    ("mode", "rc", "why"),
    [
        ("garbage", 0, "fi_info printed no device list (exit 0: "),
        ("killed", 0, "fi_info was killed by SIGKILL"),
        ("", 137, "fi_info printed no device list (exit 137)"),  # a wrapper saw it killed
        ("hang", 0, "fi_info did not finish in time and was killed"),
        ("orphan", 0, "fi_info left a process behind that held its output"),
    ],
)
async def test_a_broken_fi_info_is_unknown_never_a_reboot(
    tmp_path, fake_fi_info, monkeypatch, mode, rc, why
) -> None:
    """Only a finished fi_info run that lists devices (or answers "no data") is evidence."""
    import checks.efa

    real = checks.efa.run_command
    monkeypatch.setattr(checks.efa, "run_command", lambda argv, timeout: real(argv, 1))
    fake_fi_info("fi_info-p4de-4-devices.txt" if mode != "" else "fi_info-no-efa.txt", mode, rc)
    if mode == "":
        monkeypatch.setenv("FAKE_FI_INFO_OUTPUT", "/dev/null")
    (f,) = await efa(tmp_path, "p5.48xlarge").poll()
    assert (f.status, f.reason) == (Status.UNKNOWN, "FiInfoFailed")
    assert f.message.startswith(why)


async def test_port_down(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    sysfs(tmp_path, P4DE)
    sysfs(tmp_path, ["rdmap32s27"], state="1: DOWN")
    assert faults(await efa(tmp_path).poll()) == [
        ("efa:rdmap32s27/1", "EfaPortDown", Action.REBOOT)
    ]


async def test_error_counters_by_rate_not_by_value(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    sysfs(tmp_path, P4DE, rdma_read_wr_err=5000, rx_drops=900000)  # a long life's totals
    clock = iter([100.0, 160.0, 220.0])
    check = efa(tmp_path)
    check.clock = lambda: next(clock)
    assert faults(await check.poll()) == []  # big counters, no rate yet
    assert faults(await check.poll()) == []  # unchanged for a minute
    sysfs(tmp_path, ["rdmap144s27"], rdma_read_wr_err=5003, rx_drops=900050)
    found = await check.poll()
    assert faults(found) == [("efa:rdmap144s27", "EfaErrorBurst", Action.NONE)]
    burst = next(f for f in found if f.status is Status.FAULT)
    assert "rdma_read_wr_err 3/min" in burst.message and "rx_drops" not in burst.message


async def test_counter_reset_is_not_a_burst(tmp_path, fake_fi_info) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    sysfs(tmp_path, P4DE, unresponsive_remote_events=50)
    clock = iter([0.0, 60.0])
    check = efa(tmp_path)
    check.clock = lambda: next(clock)
    await check.poll()
    sysfs(tmp_path, P4DE, unresponsive_remote_events=0)  # driver reloaded
    assert faults(await check.poll()) == []


async def test_no_devices_from_a_pod_without_their_device_nodes_is_unknown(
    tmp_path, fake_fi_info
) -> None:
    # fi_info in a pod that was given no EFA devices: libibverbs cannot open them, so
    # libfabric answers "no data" while /sys shows every device. No reboot for that.
    fake_fi_info("fi_info-no-efa.txt", rc=61)
    sysfs(tmp_path, P4DE)
    for n, dev in enumerate(P4DE):
        verbs = tmp_path / "sys/class/infiniband" / dev / "device" / "infiniband_verbs"
        (verbs / f"uverbs{n}").mkdir(parents=True)
    check = efa(tmp_path)
    check.verbs_dir = tmp_path / "pod-dev/infiniband"
    found = await check.poll()
    assert faults(found) == []
    (count,) = [f for f in found if f.condition == "EfaDevices"]
    assert (count.status, count.reason) == (Status.UNKNOWN, "EfaDevicesUnreachable")
    assert count.evidence["unreachable"] == sorted(P4DE)
    # With the nodes there, "no data" is fi_info's word on the devices: a fault.
    check.verbs_dir.mkdir(parents=True)
    for n in range(len(P4DE)):
        (check.verbs_dir / f"uverbs{n}").touch()
    assert faults(await check.poll()) == [("node", "EfaDeviceCountMismatch", Action.REBOOT)]


def test_nothing_efa_here_is_skipped(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert efa(tmp_path, fi_info_paths=[]).missing() == [
        "no EFA here (fi_info not found, /sys/class/infiniband absent)"
    ]


def test_pingpong_tables_and_the_loopback_verdict() -> None:
    server = (FIX / "fi_pingpong-server-2node.txt").read_text()
    assert parse_pingpong(server)[-1] == (1 << 20, 2185.67, 479.75)
    ok = judge_loopback("rdmap0s29", server, 0)
    assert ok.status is Status.OK
    assert ok.message.startswith(
        "EFA Loopback check passed for device: rdmap0s29 . Output summary is MaxBw: 2185.670000"
    )
    failed = judge_loopback("rdmap0s29", "fi_getinfo: -61\n", 1)
    assert (failed.status, failed.action) == (Status.FAULT, Action.REBOOT)
    timed_out = "fi_pingpong did not finish in time and was killed"
    assert judge_loopback("rdmap0s29", "", None, timed_out).status is Status.UNKNOWN
    killed = judge_loopback("rdmap0s29", "", -9, "fi_pingpong was killed by SIGKILL")
    assert (killed.status, killed.message) == (
        Status.UNKNOWN,
        "EFA Loopback check for device: rdmap0s29 did not finish: "
        "fi_pingpong was killed by SIGKILL",
    )
    assert judge_loopback("rdmap0s29", "\x00garbage\n", 0).status is Status.UNKNOWN


async def test_a_burst_while_the_agent_restarted_counts_and_a_reboot_starts_afresh(
    tmp_path, fake_fi_info
) -> None:
    fake_fi_info("fi_info-p4de-4-devices.txt")
    sysfs(tmp_path, P4DE, rdma_write_wr_err=10)
    (tmp_path / "proc/sys/kernel/random").mkdir(parents=True)
    boot = tmp_path / "proc/sys/kernel/random/boot_id"
    boot.write_text("boot-1\n")

    def restarted(now: float) -> EfaCheck:
        ctx = CheckContext(tmp_path, "p4de.24xlarge", state_dir=tmp_path / "state")
        check = EfaCheck(ctx, EfaOptions())
        check.clock = lambda: now
        return check

    assert faults(await restarted(0.0).poll()) == []
    sysfs(tmp_path, ["rdmap32s27"], rdma_write_wr_err=14)
    assert faults(await restarted(30.0).poll()) == [
        ("efa:rdmap32s27", "EfaErrorBurst", Action.NONE)
    ]
    boot.write_text("boot-2\n")
    sysfs(tmp_path, ["rdmap32s27"], rdma_write_wr_err=90)
    assert faults(await restarted(5.0).poll()) == []


async def test_a_port_that_cannot_be_read_has_its_device_listed_again(tmp_path) -> None:
    """The ports are kept between polls; a port whose state is gone (its device re-created
    between two polls, with another port) is unknown, and the new port is read next."""
    sysfs(tmp_path, ["rdmap16s27"])
    check = efa(tmp_path, instance_type=None)
    assert faults(check._sysfs(check.options)) == []
    dev = tmp_path / "sys/class/infiniband/rdmap16s27"
    (dev / "ports/1").rename(dev / "ports/2")
    (dev / "ports/2/state").write_text("1: DOWN\n")
    [port] = [f for f in check._sysfs(check.options) if f.condition == "EfaPort"]
    assert (port.component, port.status, port.reason) == (
        "efa:rdmap16s27/1",
        Status.UNKNOWN,
        "PortStateUnreadable",
    )
    assert faults(check._sysfs(check.options)) == [
        ("efa:rdmap16s27/2", "EfaPortDown", Action.REBOOT)
    ]


def test_a_device_listed_before_its_ports_has_them_read_once_they_are_there(tmp_path) -> None:
    """The kernel adds a device's ports/ directory, then each port (ib_setup_port_attrs): a
    poll between the two finds none, and the ports that follow are read, a port down seen."""
    sysfs(tmp_path, ["rdmap16s27"], state="1: DOWN")
    ports = tmp_path / "sys/class/infiniband/rdmap16s27/ports"
    (ports / "1").rename(tmp_path / "port-1")
    check = efa(tmp_path, instance_type=None)
    assert faults(check._sysfs(check.options)) == []  # registering: no port yet
    (tmp_path / "port-1").rename(ports / "1")
    assert faults(check._sysfs(check.options)) == [
        ("efa:rdmap16s27/1", "EfaPortDown", Action.REBOOT)
    ]
