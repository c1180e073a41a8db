"""The controller's idle footprint: `node-health controller` leading against the in-process
fake API server with N healthy nodes, nothing to remediate. Prints steady RSS, CPU and API
requests a second, beside a bare `python -c` interpreter's RSS as the reference.

    python benchmarks/controller.py [--nodes 200] [--interval 5] [--scan 60] [--seconds 60]

A pass is two label-selected LISTs; a scan (every `scan`) one LIST of every node.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kube.conftest import kubeconfig  # noqa: E402
from tests.kube.fake_api import FakeKubeAPI  # noqa: E402

MIB = 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--scan", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    with FakeKubeAPI() as api:
        for i in range(args.nodes):
            api.add_node(f"n{i}", {"sagemaker.amazonaws.com/node-health-status": "Schedulable"})
        k = kubeconfig(d / "kubeconfig", api.url)
        (d / "c.yaml").write_text(
            f"state_dir: {d}/state\nhttp_listen: ''\nkubernetes: {{kubeconfig: '{k}'}}\n"
            f"controller: {{interval: {args.interval}, scan: {args.scan}}}\n"
        )
        env = {k2: v for k2, v in os.environ.items() if not k2.startswith("NODE_HEALTH_")}
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, "-m", "agent", "controller", "-c", str(d / "c.yaml")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(8)  # started, leading, a few passes
            p = psutil.Process(proc.pid)
            before, requests = p.cpu_times(), len(api.requests())
            time.sleep(args.seconds)
            after, rss = p.cpu_times(), p.memory_info().rss
            requests = len(api.requests()) - requests
        finally:
            proc.terminate()
            proc.wait(10)
    probe = "import os, psutil; print(psutil.Process(os.getpid()).memory_info().rss)"
    bare = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    cpu = (after.user + after.system - before.user - before.system) / args.seconds * 1000
    print(
        f"nodes {args.nodes}, pass every {args.interval:g}s, scan every {args.scan:g}s, "
        f"over {args.seconds:g}s"
    )
    print(f"RSS {rss / MIB:.1f} MiB (bare interpreter {int(bare.stdout) / MIB:.1f} MiB)")
    print(f"CPU {cpu:.1f} millicores; API requests {requests / args.seconds:.1f}/s")


if __name__ == "__main__":
    main()
