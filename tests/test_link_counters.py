"""InfiniBand port counters and PCIe AER by rate, on sysfs trees in the kernel's layout.

Counter sequences are written into a temporary host root between polls, with a fake clock;
the state file lives in a temporary state dir, and the boot id in the tree's /proc.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.models import NodeKeys
from agent.nodestate import desired
from agent.policy import Policy, PolicySettings, Verdict, rule_table
from checks.api import Action, CheckContext, Status
from checks.link_counters import LinkCountersCheck, LinkCountersOptions, aer_total
from checks.registry import BUILTIN, load

FIX = Path(__file__).parent / "fixtures" / "sysfs"
BOOT_1 = "7b1c2a4e-5f7d-4a3b-9a51-0c1d2e3f4a5b"
BOOT_2 = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"


class Host:
    """A host root with /sys/class/infiniband, /sys/bus/pci/devices and a boot id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.boot(BOOT_1)

    def boot(self, boot_id: str) -> None:
        path = self.root / "proc/sys/kernel/random/boot_id"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(boot_id + "\n")

    def ib(self, dev: str, sub: str = "counters", port: str = "1", **counters: int) -> None:
        base = self.root / "sys/class/infiniband" / dev / "ports" / port / sub
        base.mkdir(parents=True, exist_ok=True)
        for name, value in counters.items():
            (base / name).write_text(f"{value}\n")

    def aer(self, dev: str, total: int) -> None:
        base = self.root / "sys/bus/pci/devices" / dev
        base.mkdir(parents=True, exist_ok=True)
        text = (FIX / "aer_dev_correctable").read_text()
        text = text.replace("Receiver Error 2", f"Receiver Error {total}")
        (base / "aer_dev_correctable").write_text(
            text.replace("TOTAL_ERR_COR 2", f"TOTAL_ERR_COR {total}")
        )


def check(host: Host, state: Path, times: list[float], **options) -> LinkCountersCheck:
    ctx = CheckContext(host_root=host.root, state_dir=state)
    c = LinkCountersCheck(ctx, LinkCountersOptions(**options))
    clock = iter(times)
    c.clock = lambda: next(clock)
    return c


def faults(found):
    return [(f.component, f.condition, f.reason) for f in found if f.status is Status.FAULT]


def test_the_check_is_registered() -> None:
    assert load("link_counters", BUILTIN["link_counters"]) is LinkCountersCheck


def test_aer_fixture_parses_to_its_total() -> None:
    assert aer_total(FIX / "aer_dev_correctable") == 2


def test_lifetime_totals_are_not_a_fault_their_growth_is(tmp_path) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", symbol_error=1_000_000, link_error_recovery=400, port_rcv_errors=50)
    c = check(host, tmp_path / "state", [100.0, 160.0, 220.0, 280.0])
    assert faults(c.collect()) == []  # huge totals from a long life: no rate yet
    host.ib("mlx5_0", symbol_error=1_000_100, link_error_recovery=403)
    assert faults(c.collect()) == []  # within 600/min and 5/min
    host.ib("mlx5_0", symbol_error=1_000_800, link_error_recovery=409)
    found = c.collect()
    assert faults(found) == [("ib:mlx5_0/1", "NetworkDegraded", "SymbolErrorRate")]
    (f,) = [f for f in found if f.status is Status.FAULT]
    assert f.action is Action.NONE
    assert "symbol_error 700/min (limit >600/min)" in f.message
    assert "symbol_error 800/h (limit >120/h)" in f.message  # IBTA's bit error rate, too
    assert "link_error_recovery 6/min (limit >5/min)" in f.message
    # a quiet minute later the per-minute rates are within limits; the hourly one is not
    assert faults(c.collect()) == [("ib:mlx5_0/1", "NetworkDegraded", "SymbolErrorBer")]


def test_a_link_down_is_a_fault_and_two_within_six_hours_are_a_flapping_link(tmp_path) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_3", link_downed=2)
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0, 3600.0, 7200.0, 9000.0])
    c.collect()
    host.ib("mlx5_3", link_downed=3)
    assert faults(c.collect()) == [("ib:mlx5_3/1", "NetworkDegraded", "LinkDowned")]
    assert faults(c.collect()) == []  # one flap: gone once its minute has passed
    host.ib("mlx5_3", link_downed=4)
    found = c.collect()
    assert faults(found) == [("ib:mlx5_3/1", "NetworkDegraded", "LinkFlappingPersistent")]
    # strikes: 1 for flapping: it holds, quiet or not, for the rest of this boot
    assert faults(c.collect()) == [("ib:mlx5_3/1", "NetworkDegraded", "LinkFlappingPersistent")]
    host.boot(BOOT_2)  # a reboot: new counters, the strike is forgotten
    host.ib("mlx5_3", link_downed=0)
    c2 = check(host, tmp_path / "state", [10.0])
    assert faults(c2.collect()) == []


def test_a_counter_reset_is_a_new_baseline_not_a_burst(tmp_path) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", port_rcv_errors=90_000)
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0])
    c.collect()
    host.ib("mlx5_0", port_rcv_errors=3)  # the driver reloaded (or perfquery -R)
    assert faults(c.collect()) == []
    host.ib("mlx5_0", port_rcv_errors=700)
    assert faults(c.collect()) == [("ib:mlx5_0/1", "NetworkDegraded", "PortRcvErrorRate")]


def test_an_agent_restart_keeps_the_baseline_and_a_reboot_drops_it(tmp_path) -> None:
    host, state = Host(tmp_path / "host"), tmp_path / "state"
    host.ib("mlx5_1", excessive_buffer_overrun_errors=7)
    check(host, state, [0.0]).collect()
    host.ib("mlx5_1", excessive_buffer_overrun_errors=8)  # while the agent restarted
    assert faults(check(host, state, [30.0]).collect()) == [
        ("ib:mlx5_1/1", "NetworkDegraded", "BufferOverrun")
    ]
    host.boot(BOOT_2)
    host.ib("mlx5_1", excessive_buffer_overrun_errors=50)  # a new boot's counters
    assert faults(check(host, state, [5.0]).collect()) == []


def test_efa_ports_are_read_for_standard_counters_only(tmp_path) -> None:
    host = Host(tmp_path / "host")
    dev = host.root / "sys/class/infiniband/rdmap16s27/device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1d0f\n")
    host.ib("rdmap16s27", sub="hw_counters", rnr_nak_retry_err=1)
    c = check(host, tmp_path / "state", [0.0, 60.0])
    assert c.collect() == []  # no counters/ here, and hw_counters are the efa check's
    host.ib("rdmap16s27", sub="hw_counters", rnr_nak_retry_err=9)
    assert c.collect() == []


def test_unreadable_or_garbled_counters_are_no_evidence(tmp_path) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", symbol_error=5)
    (host.root / "sys/class/infiniband/mlx5_0/ports/1/counters/link_downed").write_text("N/A\n")
    (host.root / "sys/class/infiniband/mlx5_0/ports/1/counters/port_rcv_errors").mkdir()
    c = check(host, tmp_path / "state", [0.0, 60.0])
    assert faults(c.collect()) == []
    assert faults(c.collect()) == []


def test_aer_correctable_errors_by_rate_and_only_devices_in_breach_reported(tmp_path) -> None:
    host = Host(tmp_path / "host")
    for dev in ("0000:00:1c.0", "0000:53:00.0", "0000:54:00.0"):
        host.aer(dev, 2)
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0, 180.0])
    assert c.collect() == []
    host.aer("0000:53:00.0", 5)
    assert c.collect() == []  # +3 in a minute is within limits, and quiet devices stay quiet
    host.aer("0000:53:00.0", 20)
    assert faults(c.collect()) == [("pci:0000:53:00.0", "PcieDegraded", "PcieCorrectableErrorRate")]
    (f,) = c.collect()  # it stays reported, so that its condition can clear
    assert (f.component, f.status) == ("pci:0000:53:00.0", Status.OK)


def test_limits_from_the_settings_replace_the_table(tmp_path) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", symbol_error=0)
    rows = [{"counter": "symbol_error", "over": 10, "window": "1h", "reason": "Strict"}]
    c = check(host, tmp_path / "state", [0.0, 60.0], infiniband=rows, aer=False)
    c.collect()
    host.ib("mlx5_0", symbol_error=11)
    assert faults(c.collect()) == [("ib:mlx5_0/1", "NetworkDegraded", "Strict")]


def test_a_degradation_sets_its_condition_and_labels_and_leaves_the_node_schedulable(
    tmp_path,
) -> None:
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", link_error_recovery=0)
    c = check(host, tmp_path / "state", [0.0, 60.0])
    c.collect()
    host.ib("mlx5_0", link_error_recovery=40)
    found = [replace(f, check="link_counters") for f in c.collect()]
    policy = Policy(rule_table(PolicySettings()), PolicySettings(), boot_id="b")
    policy.observe(found)
    assert policy.verdict is Verdict.SCHEDULABLE
    state = desired(policy, NodeKeys())
    keys = NodeKeys()
    assert state.labels[keys.fault_types_label] == "NetworkDegraded"
    assert state.labels[keys.fault_reasons_label] == "LinkErrorRecoveryRate"
    assert state.labels[keys.health_status_label] == "Schedulable"
    assert not state.taints
    (cond,) = [c for c in state.conditions if c["type"] == "NetworkDegraded"]
    assert cond["status"] == "True" and "link_error_recovery 40/min" in cond["message"]


def test_ports_and_pci_devices_that_appear_between_polls_are_read(tmp_path) -> None:
    """The listings are kept between polls: a device that comes, or comes back with another
    port (a driver reload), and a PCI device added later, are still read."""
    host = Host(tmp_path / "host")
    host.ib("mlx5_0", link_downed=0)
    host.aer("0000:53:00.0", 2)
    (host.root / "sys/bus/pci/devices/0000:00:00.0").mkdir()  # a host bridge: no AER file
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0, 180.0, 240.0, 300.0])
    assert faults(c.collect()) == []
    host.ib("mlx5_1", link_downed=0)  # a new device
    host.aer("0000:54:00.0", 2)  # a new PCI device
    assert faults(c.collect()) == []
    host.ib("mlx5_1", link_downed=1)
    host.aer("0000:54:00.0", 30)
    assert faults(c.collect()) == [
        ("ib:mlx5_1/1", "NetworkDegraded", "LinkDowned"),
        ("pci:0000:54:00.0", "PcieDegraded", "PcieCorrectableErrorRate"),
    ]
    gone = host.root / "sys/class/infiniband/mlx5_1"
    gone.rename(tmp_path / "unplugged")  # unregistered for a poll
    c.collect()
    host.ib("mlx5_1", port="2", link_downed=0)  # registered again, with another port
    c.collect()
    host.ib("mlx5_1", port="2", link_downed=1)
    assert ("ib:mlx5_1/2", "NetworkDegraded", "LinkDowned") in faults(c.collect())


def test_a_pci_device_removed_as_it_is_read_and_back_by_the_next_poll_is_read(
    tmp_path, monkeypatch
) -> None:
    """A GPU removed and rescanned (its recovery) between the listing and the read of one
    poll, and back by the next: the same listing, but its AER file is no reason to pass it
    over from then on: only a device that is there without the file has no AER."""
    import checks.link_counters

    host = Host(tmp_path / "host")
    host.aer("0000:53:00.0", 2)
    dev = host.root / "sys/bus/pci/devices/0000:53:00.0"
    real = checks.link_counters.aer_total
    calls = []

    def removed_as_read(path):
        calls.append(path)
        if len(calls) == 1:
            dev.rename(tmp_path / "removed")
        return real(path)

    monkeypatch.setattr(checks.link_counters, "aer_total", removed_as_read)
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0])
    assert faults(c.collect()) == []
    (tmp_path / "removed").rename(dev)  # rescanned
    assert faults(c.collect()) == []
    host.aer("0000:53:00.0", 30)
    assert faults(c.collect()) == [("pci:0000:53:00.0", "PcieDegraded", "PcieCorrectableErrorRate")]


def test_a_port_listed_before_its_counters_has_them_read_once_they_are_there(tmp_path) -> None:
    """The kernel adds a port, then its counters/ directory: a poll between the two finds no
    counter there, and the counters that follow are read, a link going down seen."""
    host = Host(tmp_path / "host")
    port = tmp_path / "host/sys/class/infiniband/mlx5_3/ports/1"
    port.mkdir(parents=True)  # registering: no counters yet
    c = check(host, tmp_path / "state", [0.0, 60.0, 120.0])
    assert faults(c.collect()) == []
    host.ib("mlx5_3", link_downed=2)
    assert faults(c.collect()) == []  # the baseline
    host.ib("mlx5_3", link_downed=3)
    assert faults(c.collect()) == [("ib:mlx5_3/1", "NetworkDegraded", "LinkDowned")]
