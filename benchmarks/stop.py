"""SIGTERM to exit under each outage of tests/test_stop.py, with the default stop budget.

    python -m benchmarks.stop [--budget 20]

Runs those tests (the real daemon, each outage in place) with the budget given and prints how
long each stop took: what the README's "Stopping" table shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0, help="stop_timeout, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.jsonl"
        env = os.environ | {"TEST_STOP_TIMEOUT": str(args.budget), "TEST_STOP_TIMES": str(times)}
        run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        subprocess.run([*run, "tests/test_stop.py"], cwd=REPO, env=env, check=False)
        rows = [json.loads(line) for line in times.read_text().splitlines()]
    print(f"\nstop_timeout {args.budget:g}s: SIGTERM to exit")
    for row in rows:
        print(f"  {row['test']:<60} {row['seconds']:6.2f} s")


if __name__ == "__main__":
    main()
