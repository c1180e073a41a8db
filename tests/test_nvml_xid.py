"""XIDs through NVML's event API (a fake event source), judged as the kernel log's line, and
counted once when the kernel log reports the same fault."""

from __future__ import annotations

import contextlib
import queue
from dataclasses import replace

import pytest

from agent.policy import Policy, PolicySettings, Reported, Verdict, rule_table
from checks.api import Action, CheckContext, Status
from checks.kernel_log import rules as rules_module
from checks.kernel_log.classifier import Classifier
from checks.nvidia import nvml
from checks.nvidia.xid import NvmlXidCheck


class FakeEvents:
    def __init__(self, events: list[nvml.XidEvent]) -> None:
        self.q: queue.Queue[nvml.XidEvent] = queue.Queue()
        for e in events:
            self.q.put(e)
        self.closed = False

    def wait(self, timeout: float) -> nvml.XidEvent | None:
        try:
            return self.q.get(timeout=min(timeout, 0.05))
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


async def first(check: NvmlXidCheck, n: int) -> list:
    out = []
    async with contextlib.aclosing(check.stream()) as stream:
        async for f in stream:
            out.append(f)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize(
    ("xid", "reason", "action"),
    [
        (79, "XidHardwareFailure", Action.REPLACE),
        (48, "XidHardwareFailure", Action.REBOOT),
        (13, "XidUserAppError", Action.RESTART_APP),
    ],
)
async def test_events_are_judged_as_the_kernel_log_line(
    xid: int, reason: str, action: Action
) -> None:
    source = FakeEvents([nvml.XidEvent("0000:b9:00", xid)])
    check = NvmlXidCheck(CheckContext(), events=lambda: source)
    [f] = await first(check, 1)
    assert (f.component, f.reason, f.action) == ("gpu:0000:b9:00", reason, action)
    assert f.evidence["xid"] == str(xid)  # HyperPod's reason names the class; the code stays
    assert f.evidence["source"] == "nvml" and f.status is Status.FAULT
    assert source.closed  # the event set is freed when the stream stops


async def test_no_events_to_read_back_in_a_one_off_run() -> None:
    check = NvmlXidCheck(CheckContext(), events=lambda: FakeEvents([]))
    assert [f async for f in check.stream(follow=False)] == []


def test_missing_without_a_driver() -> None:
    def no_driver() -> nvml.XidEvents:
        raise nvml.NvmlError(nvml.LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")

    assert (
        NvmlXidCheck(CheckContext(), events=no_driver).missing()[0].startswith("no NVIDIA driver")
    )


def test_the_same_xid_from_both_sources_counts_once() -> None:
    line = "NVRM: Xid (PCI:0000:b9:00): 48, pid=1, name=python, An uncorrectable double bit error"
    from_log = Classifier(rules_module.build()).record(line)
    check = NvmlXidCheck(CheckContext(), events=lambda: FakeEvents([]))
    from_nvml = check.judge(nvml.XidEvent("0000:b9:00", 48))
    assert from_log is not None and from_nvml is not None
    now = [1000.0]
    settings = PolicySettings()
    policy = Policy(rule_table(settings), settings, clock=lambda: now[0])
    changes = policy.observe([replace(from_log, check="kernel_log")])
    now[0] += 0.5
    changes += policy.observe([replace(from_nvml, check="nvml_xid")])
    reported = [c for c in changes if isinstance(c, Reported)]
    assert len(reported) == 1 and reported[0].finding.check == "kernel_log"
    assert policy.verdict is Verdict.PENDING_REBOOT
    # A minute later it is a new fault, whichever source sees it.
    now[0] += 60
    later = policy.observe([replace(from_nvml, check="nvml_xid")])
    assert any(isinstance(c, Reported) for c in later)


def test_two_codes_of_one_reason_from_the_two_sources_both_count() -> None:
    # XID 48 in the kernel log, then XID 79 through NVML half a second later: both are
    # XidHardwareFailure on the same GPU, but different faults; the lost GPU must not be
    # taken for the log's double-bit error seen again.
    line = "NVRM: Xid (PCI:0000:b9:00): 48, pid=1, name=python, An uncorrectable double bit error"
    from_log = Classifier(rules_module.build()).record(line)
    check = NvmlXidCheck(CheckContext(), events=lambda: FakeEvents([]))
    from_nvml = check.judge(nvml.XidEvent("0000:b9:00", 79))
    assert from_log is not None and from_nvml is not None
    assert from_log.reason == from_nvml.reason == "XidHardwareFailure"
    now = [1000.0]
    settings = PolicySettings()
    policy = Policy(rule_table(settings), settings, clock=lambda: now[0])
    policy.observe([replace(from_log, check="kernel_log")])
    now[0] += 0.5
    changes = policy.observe([replace(from_nvml, check="nvml_xid")])
    assert [c.finding.evidence["xid"] for c in changes if isinstance(c, Reported)] == ["79"]
    assert policy.verdict is Verdict.PENDING_REPLACEMENT
