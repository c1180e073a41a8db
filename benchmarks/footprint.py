"""The daemon's footprint: steady RSS and idle CPU with the default checks and every sink on,
and the CLI's start-up time, each beside a reference measured in the same run.

    python benchmarks/footprint.py [--seconds 60] [--runs 10]

Goals: <= 64 MiB RSS and <= 2 millicores idle; the reference for start-up is a bare
`python -c pass` on the same interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

MIB = 1024 * 1024


def daemon_footprint(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as state:
        env = os.environ | {
            "NODE_HEALTH_STATE_DIR": state,
            "NODE_HEALTH_IMDS": "off",
            "NODE_HEALTH_HTTP_LISTEN": "127.0.0.1:19870",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_ready("http://127.0.0.1:19870/readyz")
            p = psutil.Process(proc.pid)
            time.sleep(2)  # let start-up work settle
            cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
            rss = []
            while time.monotonic() - t0 < seconds:
                rss.append(p.memory_info().rss)
                time.sleep(1)
            cpu = sum(p.cpu_times()[:2]) - cpu0
            wall = time.monotonic() - t0
            urllib.request.urlopen("http://127.0.0.1:19870/metrics", timeout=2).read()
            return {
                "rss_mib": rss[-1] / MIB,
                "rss_max_mib": max(rss) / MIB,
                "idle_millicores": 1000 * cpu / wall,
                "seconds": wall,
            }
        finally:
            proc.terminate()
            proc.wait(10)


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the daemon never became ready")


def startup(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)

    fp = daemon_footprint(args.seconds)
    print(f"daemon, default checks, sinks stdout+spool, http on, {fp['seconds']:.0f} s idle:")
    print(f"  RSS            {fp['rss_mib']:6.1f} MiB (max {fp['rss_max_mib']:.1f})   goal <= 64")
    print(f"  idle CPU       {fp['idle_millicores']:6.2f} millicores           goal <= 2")

    bare = startup([sys.executable, "-c", "pass"], args.runs)
    version = startup([sys.executable, "-m", "agent", "version"], args.runs)
    listing = startup([sys.executable, "-m", "agent", "checks", "list"], args.runs)
    print(f"start-up, median of {args.runs}:")
    print(f"  python -c pass          {1000 * bare:6.0f} ms (reference)")
    print(f"  node-health version     {1000 * version:6.0f} ms  ({version / bare:.1f}x reference)")
    print(f"  node-health checks list {1000 * listing:6.0f} ms  ({listing / bare:.1f}x reference)")


if __name__ == "__main__":
    main()
