"""Storms and backlogs through the daemon, beside `node-health scan` and `grep -E` on the same file:

    python benchmarks/storm.py [--storm 1000000] [--backlog 100000] [--fault-share 0.01]

The input is built from the real lines in tests/fixtures/kernel like benchmarks/kernel_log.py
(about 1% from the fault fixtures). The daemon follows /var/log/kern.log and ships to CloudWatch
(moto behind the tests' proxy, which holds it to PutLogEvents' limits).

1. Start-up backlog: the file holds `--backlog` lines when the daemon starts.
2. Storm: `--storm` lines appended at once to the file the running daemon follows.

For each: the daemon's CPU seconds, catch-up time (until the last event was spooled), events
spooled and shipped (and per second), time to the first PutLogEvents, peak RSS over the idle
daemon's (idle after it shipped a first event: the AWS client is loaded then, not by the
storm), the worst /healthz answer (asked every 100 ms), and events the spool dropped. Times
of the backlog run count from the process's start (Python's start-up included).
Goals: storm <= 3.6 CPU-s (node-problem-detector's on such input), /healthz <= 1 s, peak RSS
<= +8 MiB, no event dropped, first PutLogEvents within 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import compile_for_daemon, daemon_command, daemon_env
from benchmarks.kernel_log import corpus, ere
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


PRIME = "NVRM: Xid (PCI:0000:01:00): 79, pid=1, GPU has fallen off the bus."


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


def run(label: str, lines: int, share: float, at_start: bool, moto_url: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"storm-{label}-"))
    root = tmp / "host"
    (root / "var/log").mkdir(parents=True)
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("bench-boot\n")
    data = tmp / "input.log"
    corpus(data, lines, share)
    kern = root / "var/log/kern.log"
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
            puts = 0
            if not at_start:  # the storm comes once the agent is up, has shipped, and idles
                with kern.open("a") as fh:  # the first event loads the AWS client: not storm's
                    fh.write(f"[{1:12.6f}] {PRIME}\n")
                while not proxy.puts:
                    time.sleep(0.05)
                settle(agent.pid, state, quiet=1.0)
                puts = len(proxy.puts)
                base_rss = status_kib(agent.pid, "VmRSS")
                cpu0 = cpu_seconds(agent.pid)
                probe.start()
                t0 = time.monotonic()
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
    ap.add_argument("--storm", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--fault-share", type=float, default=0.01)
    args = ap.parse_args()
    compile_for_daemon()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    url = f"http://{host}:{port}"
    results = [
        run("backlog", args.backlog, args.fault_share, True, url),
        run("storm", args.storm, args.fault_share, False, url),
    ]
    moto.stop()
    patterns = Path(tempfile.mkstemp(suffix=".ere")[1])
    patterns.write_text("".join(ere(cr.rule.pattern) + "\n" for cr in rules.build().rules))
    for r in results:
        scan_wall, scan_cpu = cpu_of([sys.executable, "-m", "agent", "scan", str(r["input"])])
        grep = [shutil.which("grep") or "grep", "-E", "-f", str(patterns), str(r["input"])]
        grep_wall, grep_cpu = cpu_of(grep)
        print(f"{r['label']}: {r['lines']:,} lines ({args.fault_share:.0%} from fault fixtures)")
        print(f"  daemon CPU            {r['cpu']:7.2f} s")
        print(f"  node-health scan      {scan_cpu:7.2f} s CPU ({scan_wall:.2f} s wall)")
        print(f"  grep -E (reference)   {grep_cpu:7.2f} s CPU ({grep_wall:.2f} s wall)")
        print(f"  ratio daemon / scan   {r['cpu'] / max(scan_cpu, 1e-9):7.1f}x")
        print(f"  caught up after       {r['catch_up']:7.2f} s")
        rate = r["spooled"] / max(r["catch_up"], 1e-9)
        print(f"  events spooled        {r['spooled']:7d}  ({rate:,.0f}/s)")
        ship_rate = r["shipped"] / max(r["shipped_at"], 1e-9)
        by = f"all by {r['shipped_at']:.1f} s"
        print(f"  events shipped        {r['shipped']:7d}  ({ship_rate:,.0f}/s, {by})")
        first = r["first_put"]
        said = f"{first:7.2f} s" if first is not None else "none in 60 s"
        print(f"  first PutLogEvents    {said}")
        over = r["rss_over_idle_mib"]
        rss = f"+{over:.1f} MiB over idle, " if over is not None else ""
        print(f"  peak RSS              {rss}{r['peak_rss_mib']:.1f} MiB")
        print(f"  worst /healthz        {r['healthz_worst']:7.3f} s")
        print(f"  events dropped        {r['dropped']}")
    storm, backlog = results[1], results[0]
    goals = {
        "storm <= 3.6 CPU-s": storm["cpu"] <= 3.6,
        "/healthz <= 1 s": max(r["healthz_worst"] for r in results) <= 1.0,
        "peak RSS <= +8 MiB (storm)": (storm["rss_over_idle_mib"] or 0) <= 8,
        "0 dropped (backlog)": backlog["dropped"] == 0,
        "first PutLogEvents <= 2 s (backlog)": (backlog["first_put"] or 99) <= 2.0,
    }
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    figures = {k: v for k, v in storm.items() if k != "input"}
    print(json.dumps(figures, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
