"""The README's example event is the agent's real output, not a hand-written one: HyperPod's
documented XID 71 line through the packaged kernel-log rules, the policy and the event
builder, rendered as the CloudWatch line."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from agent.events import EventBuilder, dumps
from agent.identity import Identity
from agent.policy import Policy, PolicySettings, rule_table
from checks.kernel_log import rules
from checks.kernel_log.classifier import Classifier
from checks.kernel_log.formats import Stamp

ROOT = Path(__file__).resolve().parent.parent
# HyperPod's documented detection event (its `details: .timestamp` and the line it quotes).
LINE = (ROOT / "tests/fixtures/kernel/faults/xid71-nvlink-hyperpod-doc.log").read_text().strip()
HAPPENED = 1724360369.0  # 2024-08-22T20:59:29Z
SEEN = HAPPENED + 1
IDENT = Identity("node-a", "i-0123456789abcdef0", "p5.48xlarge", "us-west-2", "c", "id", "g")


def rendered() -> str:
    finding = Classifier(rules.build()).record(LINE, Stamp(HAPPENED, HAPPENED))
    assert finding is not None
    finding = replace(finding, check="kernel_log")  # as the daemon names its source
    ps = PolicySettings()
    [change, *_] = Policy(rule_table(ps), ps, clock=lambda: SEEN).observe([finding])
    return dumps(EventBuilder(IDENT).render(change, now=SEEN))


def readme_example() -> str:
    events = (ROOT / "README.md").read_text().split("\n## Events\n", 1)[1]
    return re.search(r"```json\n(.*?)\n```", events, re.S).group(1)


def test_readme_example_event_is_the_real_output() -> None:
    assert readme_example() == rendered()


def test_it_reads_as_hyperpods_documented_line() -> None:
    event = rendered()
    assert (
        '"details: ":{"severity":"warn","timestamp":"2024-08-22T20:59:29Z",'
        '"reason":"XidHardwareFailure","message":"Node condition NvidiaGPUUnhealthy is now: '
        'True, reason: XidHardwareFailure, message: \\"NVRM: Xid (PCI:0000:b9:00): 71, '
        "pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link 6(0x10000, 0x0, "
        '0x0, 0x0, 0x0, 0x0, 0x0)\\""},"HealthMonitoringAgentDetectionEvent":"HealthEvent"'
    ) in event
    assert '"xid":"71"' in event  # the code stays in the evidence
