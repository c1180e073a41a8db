"""`node-health scan`: judge a saved kernel log with the daemon's rules and policy.

Operators paste `dmesg` from broken nodes. The layout is recognised from the first lines
(raw /dev/kmsg, `dmesg` with or without `-T` / `--time-format=iso`, syslog, `journalctl -k`
short or json); each finding becomes one event on stdout; a summary goes to stderr; the exit
status says whether the node needs to come out (1) or not (0). Bad input is 2.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from agent import tool_outputs
from agent.events import EventBuilder, dumps
from agent.identity import Identity
from agent.policy import Policy, PolicySettings, Reported, Verdict, rule_table
from checks.api import Finding, Status
from checks.kernel_log import rules as rules_module
from checks.kernel_log.classifier import Classifier
from checks.kernel_log.formats import (
    KMSG,
    from_kernel,
    journal_entry,
    kmsg_from_kernel,
    stamp,
    unescape_kmsg,
)
from checks.kernel_log.rules import RuleSet

CHUNK = 8 * 1024 * 1024
FORMATS = [
    ("kmsg", re.compile(r"^\d+,\d+,\d+,[^;]*;")),
    ("journal-json", re.compile(r"^\{")),
    ("dmesg-iso", re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")),
    ("dmesg-T", re.compile(r"^\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]")),
    ("dmesg", re.compile(r"^\[\s*[+]?\d+\.\d+\]")),
    ("syslog", re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ")),
]


@dataclass
class ScanResult:
    bytes: int = 0
    layout: str = "empty"
    findings: list[Finding] = field(default_factory=list)
    verdict: Verdict = Verdict.SCHEDULABLE
    seconds: float = 0.0
    unknown: bool = False  # a tool output that could not be judged (a test that did not run)


def detect(head: bytes) -> str:
    """The layout of a log from its first lines: the first layout most lines fit."""
    lines = [ln for ln in head.decode("utf-8", "replace").splitlines()[:50] if ln.strip()]
    if not lines:
        return "empty"
    votes = Counter(next((name for name, rx in FORMATS if rx.match(ln)), "text") for ln in lines)
    return votes.most_common(1)[0][0]


def chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The input in large pieces that end on a line boundary. A regular file is mapped whole
    (the prefilter scans the page cache: no copy); a pipe is read a piece at a time."""
    try:
        st = os.fstat(stream.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size:
            with mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                yield mapped  # type: ignore[misc] - bytes-like, which is all the scan needs
                return
    except (OSError, ValueError, AttributeError):  # not a real file: read it
        pass
    rest = b""
    while data := stream.read(CHUNK):
        data = rest + data
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield data[:cut]
    if rest:
        yield rest + b"\n"


def scan(
    stream: BinaryIO,
    rules: RuleSet,
    policy_settings: PolicySettings,
    identity: Identity,
    out: TextIO,
    engine: str = "auto",
    instance_type: str | None = None,
) -> ScanResult:
    start = time.perf_counter()
    result = ScanResult()
    classifier = Classifier(rules, engine=engine)
    policy = Policy(rule_table(policy_settings), policy_settings)
    builder = EventBuilder(identity)
    pieces = chunks(stream)
    for n, chunk in enumerate(pieces):
        if n == 0:
            head = bytes(chunk[:65536]).decode("utf-8", "replace")
            if tool := tool_outputs.recognise(head):
                text = b"".join([bytes(chunk), *pieces]).decode("utf-8", "replace")
                result.layout, result.bytes = tool.name, len(text)
                found = tool.judge(text, instance_type)
                result.findings += [f for f in found if f.status is not Status.OK]
                changes = policy.observe(found, report_all=True)
                out.write(
                    "".join(
                        dumps(builder.render(c)) + "\n" for c in changes if isinstance(c, Reported)
                    )
                )
                for f in found:
                    if f.status is Status.UNKNOWN:
                        result.unknown = True
                break
            result.layout = detect(chunk[:65536])
        result.bytes += len(chunk)
        found = list(_findings(classifier, chunk, result.layout))
        result.findings += found
        # Windows (e.g. three XID 13 in ten minutes) run on the log's own time.
        changes = policy.observe(found, report_all=True, log_time=True)
        out.write(
            "".join(dumps(builder.render(c)) + "\n" for c in changes if isinstance(c, Reported))
        )
    result.verdict = policy.verdict
    result.seconds = time.perf_counter() - start
    return result


def _findings(classifier: Classifier, chunk: bytes, layout: str) -> Iterator[Finding]:
    if layout == "journal-json":
        for line in classifier.candidate_records(chunk):
            entry = journal_entry(line)
            if entry is not None and (f := classifier.record(entry[0], entry[1])):
                yield f
    elif layout == "kmsg":
        for line in classifier.candidate_records(chunk):
            m = KMSG.match(line)
            if m and not kmsg_from_kernel(m.group(1)):
                continue  # written to /dev/kmsg by user space
            text = unescape_kmsg(line[m.end() :]) if m else line
            if f := classifier.record(text, stamp(line)):
                yield f
    else:  # a syslog line another program wrote is not judged by kernel rules
        for text in classifier.candidate_records(chunk):
            if from_kernel(text) and (f := classifier.record(text)):
                yield f


def main(argv: list[str] | None = None) -> int:
    """`node-health scan`, reached without loading the rest of the CLI: start-up is most of a
    scan's time (see benchmarks/kernel_log.py)."""
    ap = argparse.ArgumentParser(prog="node-health scan", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "path",
        nargs="?",
        default="-",
        help="a saved kernel log (dmesg, dmesg -T, journalctl -k, syslog, /dev/kmsg) or "
        "tool output (dcgmi diag, all_reduce_perf, nccom-test, neuron-monitor, neuron-ls, fi_info, "
        "nvidia-smi -q, nvidia-smi nvlink -e); - or nothing for standard input",
    )
    ap.add_argument(
        "-c",
        "--config",
        type=Path,
        default=os.environ.get("NODE_HEALTH_CONFIG"),
        help="YAML settings: its kernel_log rules and policy are added",
    )
    ap.add_argument("--node", default="unknown", help="node name to put on the events")
    ap.add_argument(
        "--instance-type",
        default=os.environ.get("NODE_HEALTH_INSTANCE_TYPE"),
        help="judge tool outputs with this instance type's counts and thresholds",
    )
    args = ap.parse_args(argv)
    try:
        rules, policy = _rules(args.config)
    except ValueError as exc:  # ConfigError, RuleError
        sys.stderr.write(f"node-health: configuration error: {exc}\n")
        return 2
    try:
        fh = sys.stdin.buffer if args.path == "-" else open(args.path, "rb")  # noqa: SIM115
    except OSError as exc:
        sys.stderr.write(f"node-health: cannot read {args.path}: {exc.strerror}\n")
        return 2
    with fh:
        identity = Identity(args.node, instance_type=args.instance_type)
        result = scan(fh, rules, policy, identity, sys.stdout, instance_type=args.instance_type)
    summary(result)
    if result.verdict is not Verdict.SCHEDULABLE:
        return 1
    return 2 if result.unknown else 0


def _rules(config: Path | None) -> tuple[RuleSet, PolicySettings]:
    """The daemon's rules and policy: packaged, plus those of the settings when given."""
    if config is None:  # the packaged tables as they are: no settings, no pydantic
        return rules_module.build(), PolicySettings()
    from agent.config import ConfigError, check_options, load_settings
    from checks.kernel_log.check import KernelLogCheck
    from checks.kernel_log.options import ruleset

    settings = load_settings(config)
    opts = check_options("kernel_log", KernelLogCheck, settings.checks.get("kernel_log"))
    try:
        return ruleset(opts), settings.policy  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"checks.kernel_log: {exc}") from None


def summary(result: ScanResult, err: TextIO | None = None) -> None:
    err = err or sys.stderr
    by_reason = Counter(f"{f.reason} ({f.action})" for f in result.findings)
    err.write(
        f"scanned {result.bytes / 1e6:.1f} MB ({result.layout}) in {result.seconds:.2f}s: "
        f"{len(result.findings)} findings\n"
    )
    for reason, count in by_reason.most_common():
        err.write(f"  {count:6d}  {reason}\n")
    words = (
        "needs the node out"
        if result.verdict is not Verdict.SCHEDULABLE
        else "could not judge: the test did not run to the end"
        if result.unknown
        else "node fine"
    )
    err.write(f"verdict: {result.verdict} ({words})\n")
