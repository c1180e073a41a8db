"""The hardware history and the policy's history rules: repeat offenders and lemon nodes."""

from __future__ import annotations

import json
from pathlib import Path

from agent.controller.replaced import faulty_identities
from agent.hardware import (
    MAX_DEVICES,
    MAX_ENTRIES,
    History,
    Inventory,
    read_neurons,
    read_nics,
)
from agent.models import NodeKeys
from agent.policy import (
    HistoryRules,
    Policy,
    PolicySettings,
    Verdict,
    VerdictChanged,
    builtin_history_rules,
    rule_table,
)
from checks.api import Action, Finding, Status

GPU = "gpu:0000:53:00"
UUID = "GPU-8e3c2a1f-7d4b-4c55-9a0e-3f1b2c6d7e8f"
INVENTORY = Inventory(gpus={"0000:53:00": {"uuid": UUID, "serial": "1652222014738"}})
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def fault(component: str = GPU, reason: str = "Xid79") -> Finding:
    return Finding(
        component,
        "NvidiaXid",
        Status.FAULT,
        reason,
        f"NVRM: {reason}",
        Action.REBOOT,
        temporary=True,
        check="kernel-log",
    )


class Node:
    """A node's policy and history across agent restarts and reboots (a new boot id each)."""

    def __init__(
        self,
        tmp: Path,
        clock: Clock,
        rules: HistoryRules | None = None,
        inventory: Inventory = INVENTORY,
    ) -> None:
        self.tmp, self.clock, self.boots, self.inventory = tmp, clock, 0, inventory
        self.rules = rules or builtin_history_rules()
        # escalation_window short: only the history remembers past reboots here
        self.settings = PolicySettings(escalation_window=60)
        self.start()

    def start(self) -> None:
        self.history = History(self.tmp / "hardware.json", self.rules, self.inventory)
        self.policy = Policy(
            rule_table(self.settings),
            self.settings,
            self.tmp / "policy.json",
            f"boot-{self.boots}",
            clock=self.clock,
            history=self.history,
        )
        self.policy.observe([])
        self.policy.release_hold()

    def reboot(self) -> None:
        self.policy.save()
        self.boots += 1
        self.clock.now += 600
        self.start()

    def verdict_after(self, finding: Finding) -> tuple[Verdict, str]:
        changes = self.policy.observe([finding])
        [change] = [c for c in changes if isinstance(c, VerdictChanged)]
        return change.new, change.why


def test_the_same_fault_on_the_same_gpu_after_two_reboots_means_replace(tmp_path) -> None:
    clock = Clock()
    node = Node(tmp_path, clock)
    for _ in range(2):  # a reboot each time, a day apart: past the escalation window
        assert node.verdict_after(fault())[0] is Verdict.PENDING_REBOOT
        node.reboot()
        clock.now += DAY
    verdict, why = node.verdict_after(fault())
    assert verdict is Verdict.PENDING_REPLACEMENT
    assert f"Xid79 on {UUID} again after 2 reboots" in why
    summary = json.loads(node.history.summary(clock.now))
    [gpu] = summary["devices"]
    assert (gpu["id"], gpu["serial"], gpu["reboots"], gpu["faults"]) == (
        UUID,
        "1652222014738",
        2,
        3,
    )


def test_another_fault_on_that_gpu_is_not_a_repeat(tmp_path) -> None:
    clock = Clock()
    node = Node(tmp_path, clock)
    for _ in range(2):
        node.verdict_after(fault(reason="Xid79"))
        node.reboot()
        clock.now += DAY
    assert node.verdict_after(fault(reason="Xid48"))[0] is Verdict.PENDING_REBOOT


def test_a_node_remediated_five_times_in_seven_days_is_a_lemon(tmp_path) -> None:
    clock = Clock()
    node = Node(tmp_path, clock)
    for i in range(4):  # different GPUs: no single repeat offender
        assert node.verdict_after(fault(f"gpu:0000:0{i}:00"))[0] is Verdict.PENDING_REBOOT
        node.reboot()
        clock.now += DAY
    verdict, why = node.verdict_after(fault("gpu:0000:09:00"))
    assert verdict is Verdict.PENDING_REPLACEMENT
    assert "5 remediations of this node within 7 days" in why


def test_remediations_older_than_the_window_do_not_make_a_lemon(tmp_path) -> None:
    clock = Clock()
    node = Node(tmp_path, clock)
    for i in range(4):
        node.verdict_after(fault(f"gpu:0000:0{i}:00"))
        node.reboot()
        clock.now += 2 * DAY  # the first falls out of the 7 days
    assert node.verdict_after(fault("gpu:0000:09:00"))[0] is Verdict.PENDING_REBOOT


def test_rules_set_to_zero_are_off(tmp_path) -> None:
    clock = Clock()
    node = Node(tmp_path, clock, HistoryRules(same_fault_reboots=0, lemon_remediations=0))
    for _ in range(5):
        assert node.verdict_after(fault())[0] is Verdict.PENDING_REBOOT
        node.reboot()
        clock.now += DAY


def test_a_corrupted_history_is_moved_aside_and_the_agent_starts_afresh(tmp_path) -> None:
    path = tmp_path / "hardware.json"
    path.write_text('{"version": 1, "devices": {"x": {"faults": 3}}')
    history = History(path, HistoryRules(), INVENTORY)
    assert history.devices == {} and not path.exists()
    assert (tmp_path / "hardware.corrupt").read_text().startswith('{"version": 1')
    history.fault(GPU, "Xid79", "reboot", 1.0)
    assert json.loads(path.read_text())["devices"][UUID]["faults"][0]["reason"] == "Xid79"


def test_the_history_stays_bounded(tmp_path) -> None:
    path = tmp_path / "hardware.json"
    history = History(path, HistoryRules(), Inventory())
    for i in range(MAX_DEVICES + 10):
        history.fault(f"gpu:0000:{i:02x}:00", "Xid79", "reboot", float(i))
    for i in range(MAX_ENTRIES + 10):
        history.fault(GPU, "Xid79", "reboot", 1000.0 + i)
        history.remediated("reboot", [(GPU, "Xid79")], 1000.0 + i)
    again = History(path, HistoryRules(), Inventory())
    assert len(again.devices) == MAX_DEVICES
    assert len(again.devices[GPU]["faults"]) == MAX_ENTRIES
    assert len(again.node) == MAX_ENTRIES
    assert "gpu:0000:00:00" not in again.devices  # the least recently seen went first


def test_an_unwritable_state_dir_keeps_the_history_in_memory(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    history = History(blocker / "hardware.json", HistoryRules(), INVENTORY)
    history.remediated("reboot", [(GPU, "Xid79")], 1.0)
    history.remediated("reboot", [(GPU, "Xid79")], 2.0)
    assert history.replace_why(GPU, "Xid79", 3.0) is not None


def test_nic_guids_come_from_sysfs(tmp_path) -> None:
    for dev, guid in (("rdmap16s27", "0c42:a103:0016:054c"), ("rdmap32s27", "0000:0000:0000:0000")):
        (tmp_path / "class/infiniband" / dev).mkdir(parents=True)
        (tmp_path / "class/infiniband" / dev / "node_guid").write_text(guid + "\n")
    nics = read_nics(tmp_path)
    assert nics == {"rdmap16s27": "0c42:a103:0016:054c"}  # an all-zero GUID identifies nothing
    inv = Inventory(gpus=INVENTORY.gpus, nics=nics)
    assert inv.serials() == sorted(["0c42:a103:0016:054c", "1652222014738", UUID])
    assert read_nics(tmp_path / "absent") == {}


def neuron_sysfs(root: Path, serials: dict[str, str]) -> Path:
    """A sysfs tree with the Neuron driver's device directories (neuron-sysfs-user-guide.rst's
    layout: neuron<n>/info/serial_number, neuron<n>/neuron_core<m>/...)."""
    base = root / "devices/virtual/neuron_device"
    for name, serial in serials.items():
        (base / name / "info").mkdir(parents=True)
        (base / name / "neuron_core0/info").mkdir(parents=True)
        (base / name / "info/serial_number").write_text(serial + "\n")
    return root


def test_neuron_device_serials_come_from_the_drivers_sysfs(tmp_path) -> None:
    sys_root = neuron_sysfs(tmp_path, {"neuron10": "nd-serial-10", "neuron2": "nd-serial-2"})
    (sys_root / "devices/virtual/neuron_device/neuron3/info").mkdir(parents=True)  # unreadable
    assert read_neurons(sys_root) == {"2": "nd-serial-2", "10": "nd-serial-10"}
    assert read_neurons(tmp_path / "absent") == {}  # no Neuron driver


def test_the_same_fault_on_the_same_neuron_device_after_two_reboots_means_replace(
    tmp_path,
) -> None:
    """A Neuron device is known by its serial, as a GPU by its UUID: the repeat-offender rule
    counts its reboots, and the controller's replaced record takes the serial."""
    clock = Clock()
    neurons = read_neurons(neuron_sysfs(tmp_path / "sys", {"neuron3": "nd-serial-3"}))
    node = Node(tmp_path, clock, inventory=Inventory(neurons=neurons))
    bad = Finding(
        "neuron:3",
        "NeuronDeviceUnhealthy",
        Status.FAULT,
        "NeuronHardwareFailure",
        "NEURON_HW_ERR=DMA_ERROR nd-id=3",
        Action.REBOOT,
        check="kernel-log",
    )
    for _ in range(2):
        assert node.verdict_after(bad)[0] is Verdict.PENDING_REBOOT
        node.reboot()
        clock.now += DAY
    verdict, why = node.verdict_after(bad)
    assert verdict is Verdict.PENDING_REPLACEMENT
    assert "NeuronHardwareFailure on nd-serial-3 again after 2 reboots" in why
    summary = node.history.summary(clock.now)
    assert json.loads(summary)["serials"] == ["nd-serial-3"]
    keys = NodeKeys()
    annotated = {"metadata": {"annotations": {keys.hardware_annotation: summary}}}
    assert faulty_identities(annotated, keys) == ["nd-serial-3"]


class FakeNvml:
    """pynvml's calls read_gpus makes, over two GPUs; the second has no serial (GeForce)."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shut = False
        self.gpus = [
            ("00000000:53:00.0", b"GPU-8e3c2a1f-7d4b-4c55-9a0e-3f1b2c6d7e8f", "1652222014738"),
            ("00000000:64:00.0", "GPU-1111", None),
        ]

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetPciInfo(self, h: int):
        class Info:
            busId = self.gpus[h][0].encode()

        return Info()

    def nvmlDeviceGetUUID(self, h: int):
        return self.gpus[h][1]

    def nvmlDeviceGetSerial(self, h: int) -> str:
        if self.gpus[h][2] is None:
            raise self.NVMLError("Not Supported")
        return self.gpus[h][2]


def test_gpu_identities_by_pci_address_through_nvml(monkeypatch) -> None:
    import sys

    from agent.hardware import read_gpus

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert read_gpus() == {
        "0000:53:00": {"uuid": UUID, "serial": "1652222014738"},
        "0000:64:00": {"uuid": "GPU-1111"},
    }
    assert fake.shut

    def no_driver() -> None:
        raise fake.NVMLError("Driver Not Loaded")

    fake.nvmlInit = no_driver
    assert read_gpus() == {}  # the history then knows GPUs by PCI address


def test_a_batch_of_faults_on_many_gpus_is_one_write_of_the_history(tmp_path, monkeypatch) -> None:
    import agent.hardware

    writes = []
    real = agent.hardware.write_atomic
    monkeypatch.setattr(
        agent.hardware, "write_atomic", lambda path, text: (writes.append(path), real(path, text))
    )
    node = Node(tmp_path, Clock())
    node.policy.observe([fault(f"gpu:0000:{i:02x}:00") for i in range(40)])
    assert writes == [tmp_path / "hardware.json"]  # not one (fsynced) write a GPU
    again = History(tmp_path / "hardware.json", node.rules, INVENTORY)
    assert len(again.devices) == 40
