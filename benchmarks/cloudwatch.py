"""Shipping to CloudWatch Logs (moto in server mode, behind the tests' proxy that holds it to
the real PutLogEvents limits), through the daemon:

    python benchmarks/cloudwatch.py --burst 100000 --runs 20

1. A burst of N events already in the spool: events/second until all are accepted, the number
   of PutLogEvents calls against the fewest the limits allow, and the average batch fill.
2. Detection to CloudWatch: an XID line written to the kernel-log FIFO until the PutLogEvents
   call holding its event is answered, p50/p90/max over the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import daemon_env, fifo_host, start_daemon
from benchmarks.harness import wait as wait_for
from tests.aws.conftest import aws_env
from tests.aws.proxy import LogsProxy

CONFIG = """
cluster_name: bench
cluster_id: c1
node_group: g
instance_id: i-bench
http_listen: ""
stdout_events: false
imds: "off"
cloudwatch: {flush_interval: 1s}
"""
XID = "NVRM: Xid (PCI:0000:{bus:02x}:00): 79, pid=1234, GPU has fallen off the bus."


def wait(predicate, timeout: float = 120.0) -> None:
    wait_for(predicate, timeout, "not shipped in time (see its agent.log)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    tmp = Path(tempfile.mkdtemp(prefix="cloudwatch-bench-"))
    root, state = fifo_host(tmp), tmp / "state"
    (state / "spool").mkdir(parents=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (state / "spool" / "0000000001.jsonl").open("w") as f:
        for i in range(args.burst):
            event = {"level": "info", "ts": now, "msg": f"burst event {i}", "node": "b", "seq": i}
            f.write(json.dumps(event, separators=(",", ":")) + "\n")
    sizes = [len(line) - 1 + 26 for line in (state / "spool" / "0000000001.jsonl").open("rb")]
    fewest = max(math.ceil(args.burst / 10_000), math.ceil(sum(sizes) / 1_048_576))
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG)
    with LogsProxy(f"http://{host}:{port}") as proxy:
        env = daemon_env(tmp, root, "bench-node") | aws_env(proxy.url)
        start = time.monotonic()
        agent, kmsg = start_daemon(cfg, env, tmp / "agent.log")
        try:
            wait(lambda: sum('"seq"' in e["message"] for e in proxy.events()) == args.burst)
            took = time.monotonic() - start
            burst_calls = [p for p in proxy.puts if '"seq"' in p["logEvents"][0]["message"]]
            fill = statistics.mean(
                sum(len(e["message"].encode()) + 26 for e in p["logEvents"]) / 1_048_576
                for p in burst_calls
            )
            latencies = []
            for run in range(args.runs):
                before = len(proxy.puts)
                t0 = time.monotonic()
                line = XID.format(bus=16 + run)
                os.write(kmsg, f"3,{2000 + run},{run * 1_000_000},-;{line}\n".encode())
                wait(
                    lambda b=before, x=line: any(
                        x in e["message"] for p in proxy.puts[b:] for e in p["logEvents"]
                    )
                )
                latencies.append(time.monotonic() - t0)
                time.sleep(0.2)
        finally:
            agent.terminate()
            agent.wait(15)
            os.close(kmsg)
    moto.stop()
    print(f"burst of {args.burst} events ({sum(sizes) / 1e6:.1f} MB with overhead):")
    print(f"  {took:.1f} s from the agent's start, {args.burst / took:,.0f} events/s")
    print(f"  {len(burst_calls)} PutLogEvents calls; the limits allow no fewer than {fewest}")
    print(f"  average batch fill {fill:.0%} of 1,048,576 bytes (or of 10,000 events)")
    q = statistics.quantiles(latencies, n=10, method="inclusive")
    print(f"detection to CloudWatch, {len(latencies)} runs (flush_interval 1 s):")
    print(
        f"  p50 {statistics.median(latencies):.2f} s  p90 {q[8]:.2f} s  max {max(latencies):.2f} s"
    )
    print(f"  goal: accepted within 1.5 s: {'met' if max(latencies) <= 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
