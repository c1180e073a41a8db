"""`node-health scan`: judge a saved kernel log or tool output with the daemon's rules and policy.

Operators paste `dmesg` and tool outputs from broken nodes, often several in one file. The
input is split into sections: each tool output that a marker line begins (agent/tool_outputs),
and the kernel log around them, whose layout is recognised from its first lines (raw
/dev/kmsg, `dmesg` with or without `-T` / `--time-format=iso`, syslog, `journalctl -k` short
or json). Each section is judged on its own and the verdict is the worst of them: each finding
becomes one event on stdout (JSON lines, or a table for a person), a summary (what was
recognised) goes to stderr, and the exit status says whether the node needs to come out (1),
is fine (0), or could not be judged (2: input in no format we know, a test that did not run,
an output cut off).
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import io
import mmap
import os
import re
import select
import stat
import sys
import time
import zlib
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
READ = 1024 * 1024  # a stream is read in these: a gzip cut off loses only the last
MAX_LINE = 1024 * 1024  # longer than any log line or tool output line: not text we read
MAX_SECTION = 64 * 1024 * 1024  # a tool output carried over from one piece to the next
FIFO_WAIT = 10.0  # seconds a FIFO may stay without a writer
# Kernel log layouts, by the start of their lines: (name, what scan's summary calls it, regex).
LAYOUTS = [
    ("kmsg", "/dev/kmsg", r"\d+,\d+,\d+,[^;\n]*;"),
    ("journal-json", "journalctl -o json", r'\{[^\n]*"MESSAGE"\s*:'),
    ("dmesg-iso", "dmesg --time-format=iso", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"),
    ("dmesg-T", "dmesg -T", r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]"),
    ("dmesg", "dmesg", r"\[\s*[+]?\d+\.\d+\]"),
    ("syslog", "syslog or journalctl -k", r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ "),
]
FORMATS = [(name, re.compile("^" + rx)) for name, _, rx in LAYOUTS]
KERNEL_LINE = re.compile(b"^(?:" + b"|".join(rx.encode() for *_, rx in LAYOUTS) + b")", re.M)
_TEXT = re.compile(rb"\S")
KNOWN = (
    "kernel logs ("
    + ", ".join(words for _, words, _ in LAYOUTS)
    + ", or kernel messages alone); tool outputs ("
    + ", ".join(k.name for k in tool_outputs.KINDS)
    + ")"
)


@dataclass
class ScanResult:
    bytes: int = 0
    layout: str = "empty"  # what was recognised, for the summary
    findings: list[Finding] = field(default_factory=list)
    verdict: Verdict = Verdict.SCHEDULABLE
    seconds: float = 0.0
    unknown: str | None = None  # why a part could not be judged (a test that did not run)
    recognised: list[str] = field(default_factory=list)  # the formats found, in order
    output_error: str | None = None  # stdout could not take the events

    @property
    def understood(self) -> bool:
        return bool(self.recognised)


class Unreadable(Exception):
    """The input stops being text we can read (a line without end, corrupt gzip)."""


def detect(head: bytes) -> str:
    """The layout of a log from its first lines: the first layout most lines that have one fit
    (continuation lines, and what is left of a tool output around it, have none); "text"
    when none has."""
    lines = [ln for ln in head.decode("utf-8", "replace").splitlines()[:50] if ln.strip()]
    if not lines:
        return "empty"
    votes = Counter(next((name for name, rx in FORMATS if rx.match(ln)), "text") for ln in lines)
    del votes["text"]
    return votes.most_common(1)[0][0] if votes else "text"


class _Prefixed:
    """A stream whose first bytes were read to tell its encoding: they come first again."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            take = len(self.head) if n < 0 else n
            data, self.head = self.head[:take], self.head[take:]
            return data
        return self.rest.read(n)

    def read1(self, n: int = -1) -> bytes:
        if self.head:
            return self.read(n)
        return getattr(self.rest, "read1", self.rest.read)(n)


class _Utf8:
    """UTF-16 (told by its byte-order mark) read as UTF-8."""

    def __init__(self, raw: object) -> None:
        self.reader = codecs.getreader("utf-16")(raw, errors="replace")  # type: ignore[arg-type]

    def read(self, n: int = -1) -> bytes:
        return self.reader.read(n // 4 if n > 0 else -1).encode("utf-8")


def decoded(stream: BinaryIO) -> BinaryIO:
    """The input as UTF-8 bytes: gzip decompressed, UTF-16 with a byte-order mark decoded. A
    regular file left as it is (rewound after its first bytes) is mapped whole by `chunks`."""
    head = _read_some(stream, 4)
    raw: BinaryIO = stream if _rewind(stream) else _Prefixed(head, stream)  # type: ignore[assignment]
    if head[:2] == b"\x1f\x8b":
        gz = gzip.GzipFile(fileobj=raw)
        try:
            head = gz.read1(4)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise Unreadable(f"the gzip data is cut off or corrupt ({exc})") from None
        raw = _Prefixed(head, gz)  # type: ignore[arg-type, assignment]
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return _Utf8(raw)  # type: ignore[return-value]
    if head[:3] == codecs.BOM_UTF8:
        _read_some(raw, 3)
    return raw


def _read_some(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n and (more := stream.read(n - len(data))):
        data += more
    return data


def _rewind(stream: BinaryIO) -> bool:
    try:
        if stream.seekable() and stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            stream.seek(0)
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return False


def chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The input in large pieces that end on a line boundary (the last may lack its newline).
    A regular file is mapped whole (the prefilter scans the page cache: no copy); anything else
    is read a piece at a time, and a line longer than MAX_LINE ends the reading."""
    try:
        st = os.fstat(stream.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size and stream.tell() == 0:
            with mmap.mmap(stream.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                yield mapped  # type: ignore[misc] - bytes-like, which is all the scan needs
                return
    except (OSError, ValueError, AttributeError):  # not a real file: read it
        pass
    pending, error = bytearray(), None
    read = getattr(stream, "read1", stream.read)  # gzip's: what it has, up to a cut
    while True:
        try:
            data = read(READ)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # what came before still counts
            data, error = b"", Unreadable(f"the gzip data is cut off or corrupt ({exc})")
        if not data:
            break
        pending += data
        if len(pending) - (pending.rfind(b"\n") + 1) > MAX_LINE:
            error = Unreadable(f"a line longer than {MAX_LINE // 1024} KiB: not text we read")
            del pending[pending.rfind(b"\n") + 1 :]
            break
        if len(pending) >= CHUNK:
            cut = pending.rfind(b"\n") + 1
            yield bytes(pending[:cut])
            del pending[:cut]
    if pending:
        yield bytes(pending)
    if error:
        raise error


class _Judge:
    """The sections of one input, judged as they come: a kernel log's findings on the log's own
    time, each tool output's on its own."""

    def __init__(
        self,
        rules: RuleSet,
        settings: PolicySettings,
        identity: Identity,
        out: TextIO,
        engine: str,
        instance_type: str | None,
    ) -> None:
        self.classifier = Classifier(rules, engine=engine)
        self.policy = Policy(rule_table(settings), settings)
        self.builder = EventBuilder(identity)
        self.out, self.instance_type = out, instance_type
        self.result = ScanResult()
        self.layout: str | None = None  # the kernel log's, from its first lines
        self.kernel_findings = 0

    def kernel(self, buf: bytes) -> None:
        if not _TEXT.search(buf):  # nothing but blank lines between two tool outputs
            return
        if self.layout in (None, "empty", "text"):  # until a part shows a layout
            self.layout = detect(buf[:65536])
        found = list(_findings(self.classifier, buf, self.layout))
        self.kernel_findings += len(found)
        self.result.findings += found
        # Windows (e.g. three XID 13 in ten minutes) run on the log's own time.
        self._emit(self.policy.observe(found, report_all=True, log_time=True))

    def tool(self, kind: tool_outputs.ToolOutput, text: str) -> None:
        found = kind.judge(text, self.instance_type)
        self.result.recognised.append(kind.name)
        self.result.findings += [f for f in found if f.status is not Status.OK]
        for f in found:
            if f.status is Status.UNKNOWN and self.result.unknown is None:
                self.result.unknown = f"{kind.name}: {f.message}"
        self._emit(self.policy.observe(found, report_all=True))

    def _emit(self, changes: list) -> None:
        if self.result.output_error:
            return
        text = "".join(
            dumps(self.builder.render(c)) + "\n" for c in changes if isinstance(c, Reported)
        )
        try:
            self.out.write(text)
        except OSError as exc:  # a closed pipe, a full disk: judging goes on
            self.result.output_error = exc.strerror or str(exc)

    def done(self) -> ScanResult:
        r = self.result
        if self.layout not in (None, "empty", "text") or self.kernel_findings:
            r.recognised.insert(0, self.layout if self.layout != "text" else "kernel messages")
        r.layout = ", ".join(dict.fromkeys(r.recognised)) or "nothing recognised"
        r.verdict = self.policy.verdict
        return r


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
    judge = _Judge(rules, policy_settings, identity, out, engine, instance_type)
    carry = b""  # a tool output that runs to the end of a piece: it may go on in the next
    try:
        for chunk in chunks(decoded(stream)):
            judge.result.bytes += len(chunk)
            buf = carry + chunk if carry else chunk
            carry = _split(judge, buf, more=True)
    except Unreadable as exc:
        judge.result.unknown = str(exc)
    if carry:
        _split(judge, carry, more=False)
    result = judge.done()
    result.seconds = time.perf_counter() - start
    return result


def _split(judge: _Judge, buf: bytes, more: bool) -> bytes:
    """Judge `buf`'s sections; what is left to carry into the next piece, when `more` may come."""
    found = tool_outputs.sections(buf, KERNEL_LINE)
    if not found:
        judge.kernel(buf)
        return b""
    keep = b""
    if more and found[-1].end == len(buf) and found[-1].end - found[-1].start < MAX_SECTION:
        keep = bytes(buf[found[-1].start :])
        found.pop()
    pos = 0
    kernel = []
    for s in found:
        kernel.append(buf[pos : s.start])
        pos = s.end
    kernel.append(buf[pos : len(buf) - len(keep)])
    judge.kernel(b"".join(kernel))
    for s in found:
        judge.tool(s.kind, bytes(buf[s.start : s.end]).decode("utf-8", "replace"))
    return keep


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


def open_input(path: str) -> BinaryIO:
    """The file to scan. A FIFO is waited on for FIFO_WAIT seconds, not forever."""
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        return open(path, "rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if not poll.poll(FIFO_WAIT * 1000):
        os.close(fd)
        raise TimeoutError(f"no writer on the FIFO in {FIFO_WAIT:g}s")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def main(argv: list[str] | None = None) -> int:
    """`node-health scan`, reached without loading the rest of the CLI: start-up is most of a
    scan's time (see benchmarks/kernel_log.py)."""
    ap = argparse.ArgumentParser(
        prog="node-health scan", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument(
        "path",
        nargs="?",
        default="-",
        help="a saved kernel log (dmesg, dmesg -T, journalctl -k, syslog, /dev/kmsg), tool "
        "output (dcgmi diag, all_reduce_perf, nccom-test, neuron-monitor, neuron-ls, fi_info, "
        "nvidia-smi -q, nvidia-smi nvlink -e, nvidia-smi nvlink -s, nvidia-smi), or several in "
        "one file, gzipped or not; "
        "- or nothing for standard input",
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
    ap.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "wide"),
        help="table (on a terminal), json (JSON lines; piped), or wide: the table with the "
        "evidence",
    )
    args = ap.parse_args(argv)
    shown = args.output or ("table" if sys.stdout.isatty() else "json")
    try:
        rules, policy = _rules(args.config)
    except ValueError as exc:  # ConfigError, RuleError
        sys.stderr.write(f"node-health: configuration error: {exc}\n")
        return 2
    try:
        fh = sys.stdin.buffer if args.path == "-" else open_input(args.path)
    except OSError as exc:
        sys.stderr.write(f"node-health: cannot read {args.path}: {exc.strerror or exc}\n")
        return 2
    out = sys.stdout if shown == "json" else io.StringIO()
    with fh:
        identity = Identity(args.node, instance_type=args.instance_type)
        try:
            result = scan(fh, rules, policy, identity, out, instance_type=args.instance_type)
        except OSError as exc:  # the input failed under us (EIO, a file truncated while mapped)
            sys.stderr.write(f"node-health: cannot read {args.path}: {exc.strerror or exc}\n")
            return 2
    try:
        if isinstance(out, io.StringIO) and not result.output_error:
            sys.stdout.write(table(out.getvalue(), wide=shown == "wide") + "\n")
        sys.stdout.flush()
    except OSError as exc:
        result.output_error = result.output_error or exc.strerror or str(exc)
    if result.output_error:
        from agent.entry import quiet_stdout

        quiet_stdout()
    summary(result)
    return exit_status(result)


def table(lines: str, wide: bool) -> str:
    """The events for a person, as `run --once` shows them: the worst first, and in the
    input's order within each status; the action only where a fault asks for one."""
    import json

    from agent import terminal

    order = {"fault": 0, "unknown": 1, "ok": 2}
    events = sorted(
        (json.loads(line) for line in lines.splitlines()),
        key=lambda e: order.get(str(e.get("status")), 3),
    )
    heads = ["TIME", "STATUS", "COMPONENT", "REASON", "ACTION", "MESSAGE"]
    rows = []
    for e in events:
        evidence = e.get("evidence") or {}
        fault = e.get("status") == "fault"
        row = [str(evidence.get("log_time") or "-")]
        row += [str(e.get(k) or "-") for k in ("status", "component", "reason")]
        row += [str(e.get("action") or "-") if fault else "-", str(e.get("message") or "-")]
        if wide:
            row.append(json.dumps(evidence, separators=(",", ":")))
        rows.append(row)
    return terminal.table(heads + (["EVIDENCE"] if wide else []), rows) if rows else "no events"


def exit_status(result: ScanResult) -> int:
    """1: the node needs to come out; 2: could not judge (a part unknown, or nothing
    recognised); 0: every part recognised and fine."""
    if result.verdict is not Verdict.SCHEDULABLE:
        return 1
    return 2 if result.unknown or not result.understood else 0


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
    if result.output_error:
        err.write(f"node-health: cannot write the events to stdout: {result.output_error}\n")
    verdict = str(result.verdict)
    if result.verdict is not Verdict.SCHEDULABLE:
        words = "needs the node out"
    elif result.unknown or not result.understood:  # never "Schedulable" for what was not judged
        verdict = "unknown"
        words = result.unknown or f"not a format I know; I read {KNOWN}"
        words = f"could not judge: {words}"
    else:
        words = "node fine"
    err.write(f"verdict: {verdict} ({words})\n")
