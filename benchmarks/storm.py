"""Storms and backlogs through the daemon, beside `node-health scan` and `grep -E` on the same file:

    python benchmarks/storm.py [--modes backlog,storm,distinct,trickle] [--storm 1000000]
        [--backlog 100000] [--fault-share 0.01] [--distinct 1000] [--rounds 10]
        [--trickle-rate 250] [--trickle-seconds 120]

The input is built from the real lines in tests/fixtures/kernel like benchmarks/kernel_log.py
(about 1% from the fault fixtures). The daemon follows /var/log/kern.log and ships to CloudWatch
(moto behind the tests' proxy, which holds it to PutLogEvents' limits).

1. backlog: the file holds `--backlog` lines when the daemon starts.
2. storm: `--storm` lines appended at once to the file the running daemon follows.
3. distinct: `--distinct` active components, appended at once: `--rounds` rounds, each one
   line per component, every fault line one of the fixtures' XID lines with only its PCI
   address changed (a GPU a component: `--distinct` addresses), a benign line after each.
4. trickle: the corpus of 1. appended `--trickle-rate` lines a second, in ten writes a second,
   for `--trickle-seconds`.

For each: the daemon's CPU seconds, catch-up time (until the last event was spooled), events
spooled and shipped (and per second), time to the first PutLogEvents, peak RSS over the idle
daemon's (idle after it shipped a first event: the AWS client is loaded then, not by the
storm), the worst /healthz answer (asked every 100 ms), and events the spool dropped; for the
trickle also the events shipped while it was still being written. Times of the backlog run
count from the process's start (Python's start-up included), the others' from the first line
appended.
Goals: storm <= 3.6 CPU-s (node-problem-detector's on such input), /healthz <= 1 s, peak RSS
<= +8 MiB, no event dropped, first PutLogEvents within 2 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import compile_for_daemon, daemon_command, daemon_env
from benchmarks.kernel_log import FIXTURES, corpus, ere, messages
from checks.kernel_log import rules
from tests.aws.conftest import aws_env
from tests.aws.proxy import LogsProxy

CONFIG = """
cluster_name: bench
cluster_id: c1
node_group: g
instance_id: i-bench
http_listen: "127.0.0.1:{port}"
stdout_events: false
imds: "off"
cloudwatch: {{flush_interval: 1s}}
checks: {{kernel_log: {{source: file}}}}
"""


XID_PCI = re.compile(r"(NVRM: Xid \(PCI:)[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}")
PRIME = "NVRM: Xid (PCI:0000:01:00): 79, pid=1, GPU has fallen off the bus."


def fault_lines() -> list[str]:
    return [
        line
        for path in sorted((FIXTURES / "faults").glob("*.log"))
        for line in path.read_text().splitlines()
    ]


def distinct_corpus(path: Path, components: int, rounds: int, seed: int = 7) -> None:
    """`rounds` rounds of one XID line per GPU, `components` GPUs, a benign line after each;
    a GPU's line always the same fixture line, only its PCI address its own."""
    rnd = random.Random(seed)
    benign = messages("benign")
    xids = sorted(  # from "NVRM:" on: messages() takes it for a prefix
        {line[line.index("NVRM: Xid") :] for line in fault_lines() if XID_PCI.search(line)}
    )
    n = 0
    with path.open("w") as fh:
        for _ in range(rounds):
            for i in range(components):
                pci = f"{i // 256:04x}:{i % 256:02x}:00"
                fault = XID_PCI.sub(lambda m, pci=pci: m.group(1) + pci, xids[i % len(xids)])
                for msg in (fault, rnd.choice(benign)):
                    fh.write(f"[{n * 0.001 + 5:12.6f}] {msg}\n")
                    n += 1


def trickle(src: Path, dst: Path, rate: int, stop: threading.Event) -> None:
    """`src` appended to `dst` at `rate` lines a second, in ten writes a second."""
    with src.open() as lines, dst.open("a") as out:
        t, chunk = time.monotonic(), max(1, rate // 10)
        while not stop.is_set():
            block = list(itertools.islice(lines, chunk))
            if not block:
                return
            out.write("".join(block))
            out.flush()
            t += len(block) / rate
            time.sleep(max(0.0, t - time.monotonic()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def spool_lines(state: Path) -> tuple[int, int]:
    """Events in the spool (checkpoint lines aside), and its size."""
    events = size = 0
    for seg in (state / "spool").glob("*.jsonl"):
        data = seg.read_bytes()
        events += data.count(b"\n") - data.count(b'{"checkpoint"')
        size += len(data)
    return events, size


class Probe(threading.Thread):
    """GET /healthz every 100 ms; the worst answer time."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url, self.worst, self.stopped = f"http://127.0.0.1:{port}/healthz", 0.0, False

    def run(self) -> None:
        while not self.stopped:
            t = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=120) as r:
                    r.read()
                self.worst = max(self.worst, time.monotonic() - t)
            except OSError:
                pass
            time.sleep(0.1)


def settle(pid: int, state: Path, quiet: float = 2.0) -> tuple[float, float]:
    """Wait until the daemon is idle and the spool still; (when the spool last grew, now)."""
    last_cpu, last_size, changed, idle_since = -1.0, -1, time.monotonic(), time.monotonic()
    while True:
        cpu, (_, size) = cpu_seconds(pid), spool_lines(state)
        now = time.monotonic()
        if size != last_size:
            last_size, changed = size, now
        if cpu - last_cpu > 0.02:
            idle_since = now
        last_cpu = cpu
        if now - changed > quiet and now - idle_since > quiet:
            return changed, now
        time.sleep(0.05)


def run(label: str, build: Callable[[Path], None], moto_url: str, rate: int = 0) -> dict:
    """One mode: the input `build` writes, there at the start (backlog), appended at once, or
    at `rate` lines a second."""
    at_start = label == "backlog"
    tmp = Path(tempfile.mkdtemp(prefix=f"storm-{label}-"))
    root = tmp / "host"
    (root / "var/log").mkdir(parents=True)
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("bench-boot\n")
    data = tmp / "input.log"
    build(data)
    lines = sum(1 for _ in data.open("rb"))
    kern = root / "var/log/kern.log"
    writer, stop = None, threading.Event()
    if at_start:
        shutil.copy(data, kern)
    else:
        kern.touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(port=port))
    state = tmp / "state"
    with LogsProxy(moto_url) as proxy:
        env = daemon_env(tmp, root, "bench-node") | aws_env(proxy.url)
        t0 = time.monotonic()
        agent = subprocess.Popen(
            [*daemon_command(), "--config", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "agent.log").open("w"),
        )
        probe = Probe(port)
        try:
            puts = before = 0
            if not at_start:  # the storm comes once the agent is up, has shipped, and idles
                with kern.open("a") as fh:  # the first event loads the AWS client: not storm's
                    fh.write(f"[{1:12.6f}] {PRIME}\n")
                while not proxy.puts:
                    time.sleep(0.05)
                settle(agent.pid, state, quiet=1.0)
                puts, before = len(proxy.puts), len(proxy.events())
                base_rss = status_kib(agent.pid, "VmRSS")
                cpu0 = cpu_seconds(agent.pid)
                probe.start()
                t0 = time.monotonic()
                if rate:
                    writer = threading.Thread(target=trickle, args=(data, kern, rate, stop))
                    writer.start()
                else:
                    with kern.open("ab") as out, data.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            else:
                probe.start()
                cpu0, base_rss = 0.0, 0
            first_put = None
            while first_put is None and time.monotonic() - t0 < 60:
                if len(proxy.puts) > puts:
                    first_put = time.monotonic() - t0
                time.sleep(0.01)
            shipped_during = None
            if writer is not None:
                writer.join()
                shipped_during = len(proxy.events()) - before
            last, _ = settle(agent.pid, state)
            cpu = cpu_seconds(agent.pid) - cpu0
            peak = status_kib(agent.pid, "VmHWM")
            spooled, _ = spool_lines(state)
            deadline = time.monotonic() + 120
            while len(proxy.events()) < spooled and time.monotonic() < deadline:
                time.sleep(0.1)
            shipped_at = time.monotonic() - t0
            shipped = len(proxy.events())
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        finally:
            stop.set()
            probe.stopped = True
            agent.terminate()
            agent.wait(30)
    dropped = re.search(r"^node_health_spool_dropped_events (\S+)", metrics, re.M)
    return {
        "label": label,
        "lines": lines,
        "cpu": cpu,
        "catch_up": last - t0,
        "spooled": spooled,
        "shipped": shipped,
        "shipped_at": shipped_at,
        "first_put": first_put,
        "shipped_during": shipped_during,
        "rss_over_idle_mib": (peak - base_rss) / 1024 if base_rss else None,
        "peak_rss_mib": peak / 1024,
        "healthz_worst": probe.worst,
        "dropped": float(dropped.group(1)) if dropped else None,
        "input": data,
    }


def cpu_of(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a command (its output to /dev/null... a file: grep stops early
    on /dev/null)."""
    before = os.times()
    t = time.monotonic()
    with tempfile.TemporaryFile() as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.DEVNULL, check=False)
    after = os.times()
    used = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return time.monotonic() - t, used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="backlog,storm,distinct,trickle")
    ap.add_argument("--storm", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--fault-share", type=float, default=0.01)
    ap.add_argument("--distinct", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--trickle-rate", type=int, default=250)
    ap.add_argument("--trickle-seconds", type=int, default=120)
    args = ap.parse_args()
    share = args.fault_share
    modes = {
        "backlog": (lambda p: corpus(p, args.backlog, share), 0),
        "storm": (lambda p: corpus(p, args.storm, share), 0),
        "distinct": (lambda p: distinct_corpus(p, args.distinct, args.rounds), 0),
        "trickle": (
            lambda p: corpus(p, args.trickle_rate * args.trickle_seconds, share),
            args.trickle_rate,
        ),
    }
    chosen = args.modes.split(",")
    if unknown := set(chosen) - set(modes):
        ap.error(f"unknown modes: {', '.join(sorted(unknown))} (known: {', '.join(modes)})")
    compile_for_daemon()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    url = f"http://{host}:{port}"
    results = {m: run(m, modes[m][0], url, rate=modes[m][1]) for m in chosen}
    moto.stop()
    patterns = Path(tempfile.mkstemp(suffix=".ere")[1])
    patterns.write_text("".join(ere(cr.rule.pattern) + "\n" for cr in rules.build().rules))
    what = {
        "backlog": f"{share:.0%} from fault fixtures, there at the start",
        "storm": f"{share:.0%} from fault fixtures, appended at once",
        "distinct": f"XIDs on {args.distinct:,} distinct GPUs, appended at once",
        "trickle": f"{share:.0%} from fault fixtures, appended {args.trickle_rate} lines/s",
    }
    for r in results.values():
        scan_wall, scan_cpu = cpu_of([sys.executable, "-m", "agent", "scan", str(r["input"])])
        grep = [shutil.which("grep") or "grep", "-E", "-f", str(patterns), str(r["input"])]
        grep_wall, grep_cpu = cpu_of(grep)
        print(f"{r['label']}: {r['lines']:,} lines ({what[r['label']]})")
        print(f"  daemon CPU            {r['cpu']:7.2f} s")
        print(f"  node-health scan      {scan_cpu:7.2f} s CPU ({scan_wall:.2f} s wall)")
        print(f"  grep -E (reference)   {grep_cpu:7.2f} s CPU ({grep_wall:.2f} s wall)")
        print(f"  ratio daemon / scan   {r['cpu'] / max(scan_cpu, 1e-9):7.1f}x")
        print(f"  caught up after       {r['catch_up']:7.2f} s")
        rate = r["spooled"] / max(r["catch_up"], 1e-9)
        print(f"  events spooled        {r['spooled']:7d}  ({rate:,.1f}/s)")
        ship_rate = r["shipped"] / max(r["shipped_at"], 1e-9)
        by = f"all by {r['shipped_at']:.1f} s"
        print(f"  events shipped        {r['shipped']:7d}  ({ship_rate:,.1f}/s, {by})")
        if r["shipped_during"] is not None:
            print(f"  shipped while written {r['shipped_during']:7d}")
        first = r["first_put"]
        said = f"{first:7.2f} s" if first is not None else "none in 60 s"
        print(f"  first PutLogEvents    {said}")
        over = r["rss_over_idle_mib"]
        rss = f"+{over:.1f} MiB over idle, " if over is not None else ""
        print(f"  peak RSS              {rss}{r['peak_rss_mib']:.1f} MiB")
        print(f"  worst /healthz        {r['healthz_worst']:7.3f} s")
        print(f"  events dropped        {r['dropped']}")
    goals = {}
    if storm := results.get("storm"):
        goals["storm <= 3.6 CPU-s"] = storm["cpu"] <= 3.6
        goals["peak RSS <= +8 MiB (storm)"] = (storm["rss_over_idle_mib"] or 0) <= 8
    goals["/healthz <= 1 s"] = max(r["healthz_worst"] for r in results.values()) <= 1.0
    if backlog := results.get("backlog"):
        goals["0 dropped (backlog)"] = backlog["dropped"] == 0
        goals["first PutLogEvents <= 2 s (backlog)"] = (backlog["first_put"] or 99) <= 2.0
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    for r in results.values():
        figures = {k: v for k, v in r.items() if k != "input"}
        print(json.dumps(figures, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
