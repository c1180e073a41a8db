"""Kernel-log classification speed against `grep -E` with the same patterns, same input.

    python benchmarks/kernel_log.py [--lines 1000000] [--fault-share 0.01] [--runs 3]

The input is built from the real lines in tests/fixtures/kernel (benign lines of GPU nodes,
and about 1% lines from the fault fixtures), with fresh dmesg timestamps. grep writes its
matches to a file (to /dev/null it stops early). The goal: `node-health scan`, end to end and
start-up included, within 2x of grep.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checks.kernel_log import rules  # noqa: E402
from checks.kernel_log.classifier import Classifier  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "kernel"
# A line's own prefixes: dmesg's time, syslog's time, host and tag, a bare `kernel: ` tag. Not
# the kernel's subsystem prefixes (`NVRM: `, `INFO: `, `mce: `): they are the message.
_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s?|\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: |kernel: )+")


def messages(kind: str) -> list[str]:
    """The message part of every fixture line (their own prefixes stripped)."""
    out = []
    for path in sorted((FIXTURES / kind).glob("*.log")):
        for line in path.read_text().splitlines():
            if line.strip() and not line[:1].isspace():
                out.append(_PREFIX.sub("", line))
    return out


def corpus(path: Path, lines: int, fault_share: float, seed: int = 7) -> None:
    rnd = random.Random(seed)
    benign, faults = messages("benign"), messages("faults")
    with path.open("w") as fh:
        for i in range(lines):
            msg = rnd.choice(faults) if rnd.random() < fault_share else rnd.choice(benign)
            fh.write(f"[{i * 0.001 + 5:12.6f}] {msg}\n")


_OUTSIDE = {"d": "[0-9]", "S": "[^[:space:]]", "s": "[[:space:]]", "w": "[[:alnum:]_]"}
_INSIDE = {"d": "0-9", "s": "[:space:]", "w": "[:alnum:]_"}


def ere(pattern: str) -> str:
    """A rule's Python regex as POSIX ERE for grep -E (the constructs our rules use). In a
    bracket expression POSIX has no backslash escapes: classes become [:name:], and `]` goes
    first; `[\\S ]` (any character) becomes `.`."""
    pattern = re.sub(r"\(\?P<\w+>", "(", pattern).replace("(?:", "(")
    pattern = pattern.replace("*?", "*").replace("+?", "+").replace("??", "?")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(_OUTSIDE.get(nxt, c + nxt))
            i += 2
        elif c == "[":
            end = i + 1 + (pattern[i + 1 : i + 2] == "^")
            end += pattern[end : end + 1] == "]"
            while pattern[end] != "]" or pattern[end - 1] == "\\":
                end += 1
            out.append(_bracket(pattern[i + 1 : end]))
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _bracket(body: str) -> str:
    if body in ("\\S ", " \\S"):
        return "."
    negate = body.startswith("^")
    body = body[negate:]
    close = "\\]" in body
    body = body.replace("\\]", "")
    body = re.sub(r"\\([dsw])", lambda m: _INSIDE[m.group(1)], body).replace("\\", "")
    return "[" + "^" * negate + "]" * close + body + "]"


def timed(argv: list[str], out: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        with out.open("wb") as fh:
            t = time.perf_counter()
            subprocess.run(argv, stdout=fh, stderr=subprocess.DEVNULL, check=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--fault-share", type=float, default=0.01)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    ruleset = rules.build()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log, patterns = tmp / "kern.log", tmp / "patterns.ere"
        corpus(log, args.lines, args.fault_share)
        patterns.write_text("".join(ere(cr.rule.pattern) + "\n" for cr in ruleset.rules))
        size = log.stat().st_size
        data = log.read_bytes()
        print(
            f"input: {args.lines} lines, {size / 1e6:.1f} MB, "
            f"{args.fault_share:.1%} from fault fixtures; {len(ruleset.rules)} rules"
        )

        grep = timed(
            [shutil.which("grep") or "grep", "-E", "-f", str(patterns), str(log)],
            tmp / "grep.out",
            args.runs,
        )
        grep_lines = (tmp / "grep.out").read_bytes().count(b"\n")
        scan = timed([sys.executable, "-m", "agent", "scan", str(log)], tmp / "scan.out", args.runs)
        events = (tmp / "scan.out").read_bytes().count(b"\n")
        start = timed(
            [sys.executable, "-m", "agent", "scan", "/dev/null"], tmp / "empty.out", args.runs
        )
        print(f"grep -E -f (same patterns)  {grep:6.3f} s  ({grep_lines} matching lines)")
        print(
            f"node-health scan            {scan:6.3f} s  ({events} events)  "
            f"= {scan / grep:.2f}x grep   goal <= 2x"
        )
        print(f"  of which start-up         {start:6.3f} s  (scan of an empty input)")

        for engine in ("hyperscan", "re"):
            c = Classifier(ruleset, engine=engine)
            t = time.perf_counter()
            found = sum(1 for _ in c.bulk(data))
            dt = time.perf_counter() - t
            print(
                f"classifier, {engine:9s}      {dt:6.3f} s  {args.lines / dt / 1e6:5.1f} M lines/s"
                f"  ({c.matched} lines matched, {found} findings)"
            )

        combined = re.compile(
            "|".join(
                f"(?:{re.sub(r'[(][?]P<[0-9A-Za-z_]+>', '(', cr.rule.pattern)})"
                for cr in ruleset.rules
            )
        )
        t = time.perf_counter()
        naive = sum(1 for line in data.decode().splitlines() if combined.search(line))
        dt = time.perf_counter() - t
        print(f"reference: Python loop, one combined regex  {dt:6.3f} s  ({naive} lines)")


if __name__ == "__main__":
    main()
