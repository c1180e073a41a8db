"""The kernel-log rules on verbatim real lines (tests/fixtures/kernel/SOURCES.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checks.api import Action
from checks.kernel_log import rules
from checks.kernel_log.classifier import Classifier
from checks.kernel_log.formats import Stamp, journal_message, unescape_kmsg

KERNEL = Path(__file__).parent / "fixtures" / "kernel"
ENGINES = ["hyperscan", "re"]
R, RA, B, P = Action.RESTART_APP, Action.REBOOT, Action.NONE, Action.REPLACE

# file -> [(reason, component, action)] in order: what an operator sees for each real log. A
# reason names a class (HyperPod's XidHardwareFailure); the code is in the evidence (`seen`).
EXPECTED = {
    "xid71-nvlink-hyperpod-doc.log": [("XidHardwareFailure xid=71", "gpu:0000:b9:00", RA)],
    # One XID 13 printed as three lines is one fault; the XID 109 that follows is another.
    "xid13-burst-gpud.log": [
        ("XidUserAppError xid=13", "gpu:0000:cb:00", R),
        ("XidHardwareFailure xid=109", "gpu:0000:cb:00", RA),
    ],
    "xid45-caused-by-nvlink5.log": [
        ("XidCausedByPreviousXid xid=45 cause=149", "gpu:0000:dc:00", B),
        ("XidCausedByPreviousXid xid=45 cause=145", "gpu:0000:ed:00", B),
        ("XidCausedByPreviousXid xid=45 cause=145", "gpu:0000:ba:00", B),
        ("XidCausedByPreviousXid xid=45 cause=145", "gpu:0000:97:00", B),
    ],
    "xid144-150-nvlink5-gpud.log": [
        ("XidHardwareFailure xid=149", "gpu:0019:01:00", RA),
        ("XidInformational xid=145", "gpu:0018:01:00", B),
        ("XidInformational xid=144", "gpu:0000:01:00", B),
    ],
    "xid154-recovery-action-nvsentinel.log": [("XidHardwareFailure xid=154", "gpu:0008:01:00", RA)],
    "xid43-dra-driver.log": [("XidInformational xid=43", "gpu:0009:01:00", B)],
    "xid119-gsp-gpud500.log": [("XidHardwareFailure xid=119", "gpu:0000:9b:00", RA)],
    # The lost GPU, and the driver's count of GPUs it could not probe.
    "gpu-fallen-off-bus-no-xid-nvsentinel.log": [
        ("XidHardwareFailure", "gpu:0000:b3:00", P),
        ("GpuProbeFailed", "gpu", RA),
    ],
    "sxid-nvsentinel-e2e.log": [
        # Two non-fatal SXids within the de-duplication window: one event, the second counted.
        ("SXidNonFatalError sxid=20009", "nvswitch:0000:c3:00", B),
        ("SXidFatalError sxid=24007", "nvswitch:0000:c3:00", P),
    ],
    "neuron-hw-err-neuron-sdk-doc.log": [
        ("NeuronHardwareFailure error=SRAM_UNCORRECTABLE_ERROR", "neuron:0", P)
    ],
    "hung-task-logrotate.log": [("TaskHung", "node", B)],
    "hung-task-kworker-sof.log": [("TaskHung", "node", B)],
    "oom-memcg-uwsgi.log": [("OOMKilling", "node", B)],
    "oom-kubepods-k8s56891.log": [("OOMKilling", "node", B)],
    # Six soft lockups on CPU 0 in three minutes: the fifth crosses the rate and asks for a
    # reboot; an RCU stall before them is an event.
    "soft-lockup-rcu-cloud-hypervisor.log": [
        ("RCUStall", "node", B),
        *[("SoftLockup", "cpu:0", B)] * 4,
        ("SoftLockup", "cpu:0", RA),
        ("SoftLockup", "cpu:0", B),
    ],
    "nvme-removed-nvme-cli.log": [("NvmeIOTimeout", "nvme2", B), ("NvmeRemoved", "nvme2", P)],
    "nvme-timeouts-propolis.log": [("NvmeIOTimeout", "nvme1", B)],
    "block-io-error-spdk.log": [("BufferIOError", "nvme0n1", B)],
    "block-io-error-nvmecha.log": [("BlockIOError", "nvme0n1", B), ("BufferIOError", "nvme0n1", B)],
    # I/O errors of a loop device are no disk's; the filesystem's own errors stay events.
    "io-ext4-sonic23146.log": [("Ext4Warning", "fs:loop1", B), ("Ext4Error", "fs:loop1", B)],
    "ext4-readonly-wsl.log": [("Ext4Error", "fs:sdb", B), ("FilesystemIsReadOnly", "fs:sdb", RA)],
    "xfs-shutdown-npd845.log": [("XfsHasShutdown", "fs:dm-4", RA)],
    "edac-ce-osm.log": [
        ("MachineCheckEventsLogged", "node", B),
        ("EdacCorrectedError", "memory:MC0", B),
    ],
    "edac-ue-cper-ovro117.log": [
        ("EdacUncorrectedError", "memory:MC3", P),
        ("CperRecoverableError", "node", B),
        ("MachineCheckEventsLogged", "node", B),
    ],
    "aer-corrected-coreboot.log": [("PcieCorrectedError", "pci:0000:00:1c.1", B)] * 2,
    "aer-correctable-rebar.log": [("PcieCorrectedError", "pci:0000:05:00.1", B)],
    # The GPU's driver cannot recover (it has no AER handlers), nor can the port: reboot; the
    # GPU's audio function without a handler is an event.
    "aer-fatal-returnn1500.log": [
        ("PcieErrorNotRecovered", "pci:0000:03:00.0", RA),
        ("PcieErrorNoHandler", "pci:0000:03:00.1", B),
        ("PcieErrorNotRecovered", "pci:0000:00:03.0", RA),
        ("PcieFatalError", "pci:0000:00:03.0", RA),
    ],
    "pids-fork-rejected-icinga.log": [("ForkRejectedByPidsLimit", "node", B)],
    "conntrack-full-k8s71261.log": [("ConntrackTableFull", "node", B)] * 2,
    "conntrack-full-kube-aws.log": [("ConntrackTableFull", "node", B)],
}


@pytest.fixture(scope="module")
def ruleset() -> rules.RuleSet:
    return rules.build()


def seen(f) -> str:
    """The reason, with the codes the evidence keeps (xid, its cause, sxid, Neuron's error)."""
    codes = [f"{k}={f.evidence[k]}" for k in ("xid", "cause", "sxid", "error") if k in f.evidence]
    return " ".join([f.reason, *codes])


def classify(ruleset: rules.RuleSet, data: bytes, engine: str = "re") -> list:
    return list(Classifier(ruleset, engine=engine).bulk(data))


def test_every_fault_fixture_has_an_expectation() -> None:
    assert {p.name for p in (KERNEL / "faults").glob("*.log")} == set(EXPECTED)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_fault_lines(ruleset, engine: str, name: str) -> None:
    found = classify(ruleset, (KERNEL / "faults" / name).read_bytes(), engine)
    assert [(seen(f), f.component, f.action) for f in found] == EXPECTED[name]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", sorted((KERNEL / "benign").glob("*.log")), ids=lambda p: p.name)
def test_benign_lines_of_healthy_nodes_stay_silent(ruleset, engine: str, path: Path) -> None:
    assert classify(ruleset, path.read_bytes(), engine) == []


def test_xid_finding_carries_what_an_operator_needs(ruleset) -> None:
    (f,) = classify(ruleset, (KERNEL / "faults" / "xid119-gsp-gpud500.log").read_bytes())
    assert f.condition == "NvidiaGPUUnhealthy" and f.temporary
    assert f.message.startswith("NVRM: Xid (PCI:0000:9b:00): 119, pid=4071838, name=python")
    assert f.evidence["xid"] == "119" and f.evidence["pid"] == "4071838"
    assert f.evidence["process"] == "python"
    assert f.evidence["mnemonic"] == "GSP_RPC_TIMEOUT"
    assert f.evidence["nvidia_bucket"] == "RESET_GPU"


def test_oom_kill_names_the_pod_from_its_cgroup(ruleset) -> None:
    (f,) = classify(ruleset, (KERNEL / "faults" / "oom-kubepods-k8s56891.log").read_bytes())
    assert f.evidence["process"] == "java" and f.evidence["pid"] == "28438"
    assert f.evidence["pod_uid"] == "95387fa4-da9c-11e7-9d36-5254b24cbf5e"


def test_corrected_errors_are_informational_events(ruleset) -> None:
    from agent.events import EventBuilder
    from agent.identity import Identity
    from agent.policy import Policy, PolicySettings, rule_table

    found = classify(ruleset, (KERNEL / "faults" / "edac-ce-osm.log").read_bytes())
    assert {f.severity for f in found} == {"info"}
    ps = PolicySettings()
    changes = Policy(rule_table(ps), ps).observe(found)
    events = [EventBuilder(Identity("n")).render(c) for c in changes]
    assert {(e["level"], e["details: "]["severity"]) for e in events} == {("info", "info")}


def test_secondary_xid_points_at_its_root_cause(ruleset) -> None:
    f = classify(ruleset, (KERNEL / "faults" / "xid45-caused-by-nvlink5.log").read_bytes())[0]
    assert f.evidence["cause"] == "149" and f.action is Action.NONE


def test_permanent_conditions_are_not_events(ruleset) -> None:
    found = classify(ruleset, (KERNEL / "faults" / "ext4-readonly-wsl.log").read_bytes())
    assert [f.temporary for f in found] == [True, False]


def test_kmsg_record_with_escaped_newlines_is_one_record(ruleset) -> None:
    # The NVSentinel multi-line message as /dev/kmsg carries it: one record, \x0a escaped.
    raw = (
        "3,1042,1843308145,-;NVRM: The NVIDIA GPU 0000:b3:00.0\\x0aNVRM: (PCI ID: 10de:26b5) "
        "installed in this system has\\x0aNVRM: fallen off the bus and is not responding to "
        "commands."
    )
    f = Classifier(ruleset).record(unescape_kmsg(raw))
    assert f is not None and (f.reason, f.component) == ("XidHardwareFailure", "gpu:0000:b3:00")


def test_journal_json_message_and_time() -> None:
    line = json.dumps(
        {
            "MESSAGE": "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.",
            "__REALTIME_TIMESTAMP": "1724281529000000",
            "__MONOTONIC_TIMESTAMP": "1843308145",
        }
    )
    message, when = journal_message(line)
    assert message.startswith("NVRM: Xid") and when == Stamp(1843.308145, 1724281529.0)
    as_bytes = json.dumps({"MESSAGE": list(b"NVRM: Xid \xff")})
    assert journal_message(as_bytes)[0] == "NVRM: Xid \ufffd"
    assert journal_message("not json") is None


def test_garbage_and_truncated_lines_are_ignored(ruleset) -> None:
    garbage = (
        b"\x00\xff\xfe NVRM: Xid (PCI:zz): , pid=\nNVRM: Xid (PCI:0000:b9:00): \n"
        + bytes(range(256)) * 10
    )
    assert classify(ruleset, garbage) == []


def test_extra_rules_win_and_rules_can_be_disabled(tmp_path) -> None:
    extra = tmp_path / "site.yaml"
    extra.write_text(
        "rules:\n"
        "  - name: site-xid-13-is-fine\n"
        "    anchor: 'NVRM: Xid'\n"
        "    pattern: 'NVRM: Xid \\(PCI:(?P<pci>[0-9a-f:]+)\\): 13,'\n"
        "    condition: NvidiaGPUUnhealthy\n"
        "    reason: SiteIgnoredXid13\n"
        "    component: 'gpu:{pci}'\n"
    )
    rs = rules.build([rules.load_file(extra)], disabled={"no-such-rule"})
    found = classify(rs, (KERNEL / "faults" / "xid13-burst-gpud.log").read_bytes())
    assert [(seen(f), f.action) for f in found] == [
        ("SiteIgnoredXid13", B),
        ("XidHardwareFailure xid=109", RA),
    ]
    quiet = rules.build(disabled={"conntrack-full"})
    assert classify(quiet, (KERNEL / "faults" / "conntrack-full-kube-aws.log").read_bytes()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules:\n  - name: x\n    anchor: abc\n    pattern: '(unclosed'\n    condition: C\n",
            "not a valid regular expression",
        ),
        (
            "rules:\n  - name: x\n    anchor: abc\n    pattern: abc\n    condition: C\n"
            "    component: 'gpu:{pci}'\n",
            "template names ['pci'] not in its pattern",
        ),
        (
            "rules:\n  - name: x\n    anchor: abc\n    pattern: abc\n    condition: C\n"
            "    lookup: [{table: nope, key: x}]\n",
            "no table 'nope'",
        ),
        ("rules: [\n", "site.yaml"),
    ],
)
def test_bad_rule_files_are_named_errors(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(rules.RuleError, match=message.replace("[", r"\[").replace("(", r"\(")):
        rules.build([rules.load_file(path)])


def test_every_packaged_pattern_compiles(ruleset) -> None:
    assert all(cr.regex.groupindex is not None for cr in ruleset.rules)


def test_packaged_rules_are_what_pydantic_validates() -> None:
    # Built directly for `node-health scan`; a settings file goes through pydantic.
    from importlib import resources

    text = resources.files("checks.kernel_log").joinpath("rules.yaml").read_text()
    assert rules.validate(text, "rules.yaml") == rules.packaged()


def test_xid_actions_follow_nvidias_buckets_and_hyperpods_overrides(ruleset) -> None:
    xid, override = ruleset.tables["xid"], ruleset.tables["xid_override"]

    def action(code: int) -> Action:
        return (override.get(str(code)) or xid[str(code)]).action

    assert {c: action(c) for c in (13, 31, 94)} == dict.fromkeys((13, 31, 94), R)
    assert {c: action(c) for c in (43, 63)} == dict.fromkeys((43, 63), B)
    reset_gpu = (62, 95, 109, 110, 119, 120, 136, 140, 143, 155, 156, 158)
    assert {c: action(c) for c in reset_gpu} == dict.fromkeys(reset_gpu, RA)
    assert {c: action(c) for c in (64, 74, 79)} == dict.fromkeys((64, 74, 79), P)
    assert action(48) is RA
    # NVIDIA's current catalog past 158 (R575 and later).
    assert action(159) is RA and action(160) is B and action(161) is B
    assert {c: action(c) for c in (162, 163, 164, 165, 166, 170)} == dict.fromkeys(
        (162, 163, 164, 165, 166, 170), B
    )
    assert {c: action(c) for c in (167, 168, 169, 171, 172)} == dict.fromkeys(
        (167, 168, 169, 171, 172), RA
    )
    assert xid["165"].evidence["mnemonic"] == "PSHC_ZERO_LIFETIME"


def test_a_record_cut_to_the_message_limit_says_so(ruleset) -> None:
    from checks.kernel_log.classifier import CUT, MAX_MESSAGE

    line = "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus. " + "x" * 3000
    f = Classifier(ruleset).record(line)
    assert f is not None and seen(f) == "XidHardwareFailure xid=79"
    for text in (f.message, f.evidence["line"]):
        assert len(text) == MAX_MESSAGE and text.endswith(CUT)
        assert text.startswith("NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus. xx")
    short = Classifier(ruleset).record(line[:80])
    assert short is not None and not short.message.endswith(CUT)


CORPUS = Path(__file__).parent / "corpus" / "logs"


def test_a_disk_failing_again_and_again_is_replaced(ruleset) -> None:
    # One burst of medium errors is an event; the same burst on the same disk three times in
    # an hour (the verbatim longhorn lines, replayed at the times given) is a failing disk.
    lines = (CORPUS / "scsi-medium-error-burst-longhorn1920.log").read_text().splitlines()
    c = Classifier(ruleset)
    actions = []
    for minute in (0, 10, 20):
        for line in lines:
            if (f := c.record(line, Stamp(minute * 60.0, None))) is not None:
                actions.append((f.reason, f.component, f.action))
    assert actions == [("MediumError", "disk:sde", B)] * 2 + [("MediumError", "disk:sde", P)]


def test_a_flood_of_xid_45_is_one_event_per_window_with_a_count(ruleset) -> None:
    lines = [
        line
        for line in (CORPUS / "xid31-62-45-flood-chia301.log").read_text().splitlines()
        if "): 45," in line
    ]
    c = Classifier(ruleset)
    found = [c.record(line) for line in lines]  # eight lines within 30 seconds
    events = [f for f in found if f is not None]
    assert [(seen(f), f.action) for f in events] == [("XidInformational xid=45", B)]
    later = c.record(lines[0], Stamp(14370.688139 + 600, None))
    assert later is not None and later.evidence["repeated"] == str(len(lines) - 1)


def test_a_crash_asked_for_silences_only_what_it_causes(ruleset) -> None:
    sysrq = (CORPUS / "sysrq-crash-oops-sonic3276.log").read_bytes()
    assert classify(ruleset, sysrq) == []
    # Without the sysrq line, the same Oops is a kernel fault.
    oops = b"\n".join(line for line in sysrq.splitlines() if b"sysrq:" not in line)
    assert [(f.reason, f.action) for f in classify(ruleset, oops)] == [("KernelOops", RA)]


def test_fallen_off_the_bus_split_into_one_record_per_line_names_its_gpu(ruleset) -> None:
    # The NVSentinel report's three lines as separate records with one timestamp, as syslog
    # writes a multi-line printk; the driver prints them with one nv_printf (nv.c).
    text = (KERNEL / "faults" / "gpu-fallen-off-bus-no-xid-nvsentinel.log").read_text()
    lines = [line.strip().removeprefix("[ 1843.308145] ") for line in text.splitlines()[:3]]
    c = Classifier(ruleset)
    found = [c.record(line, Stamp(1843.308145, None)) for line in lines]
    assert found[:2] == [None, None]
    assert (found[2].reason, found[2].component, found[2].action) == (
        "XidHardwareFailure",
        "gpu:0000:b3:00",
        P,
    )


def test_a_replace_right_after_a_reboot_of_one_reason_is_not_folded_into_it(ruleset) -> None:
    # XID 48 then XID 79 on one GPU within the de-duplication window: one reason
    # (XidHardwareFailure), two faults; the lost GPU's replace must not vanish as a repeat.
    c = Classifier(ruleset)
    double_bit = "NVRM: Xid (PCI:0000:b9:00): 48, pid=1, name=python, An uncorrectable double bit"
    lost = "NVRM: Xid (PCI:0000:b9:00): 79, pid=1, name=python, GPU has fallen off the bus."
    found = [c.record(line, Stamp(t, None)) for t, line in ((1.0, double_bit), (1.5, lost))]
    assert [(seen(f), f.action) for f in found] == [
        ("XidHardwareFailure xid=48", RA),
        ("XidHardwareFailure xid=79", P),
    ]
