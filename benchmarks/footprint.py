"""The daemon's footprint with each sink on, and each sink's share, beside a bare interpreter;
and the CLI's start-up time, beside a bare `python -c pass`.

    python benchmarks/footprint.py [--seconds 30] [--runs 10]

For each of five set-ups the daemon (`node-health run` as deploy/daemonset.yaml runs it, with
its interpreter flags; the default checks, the HTTP server on) runs on a host root whose
/dev/kmsg is a FIFO; one XID line is written into it, and the benchmark waits until every sink
that is on has done its work (the Node labelled in the fake API server, the line in moto's
CloudWatch, the event on the MQTT broker); then the daemon idles for --seconds while its RSS is
sampled each second (psutil) and its CPU time is counted:

1. local: stdout, the spool and the local node-state file (the embedded default);
2. + kubernetes: the node writer and Node events, against the tests' fake API server;
3. + cloudwatch: the CloudWatch Logs sink, against moto in server mode;
4. + mqtt: the MQTT sink, against mosquitto (amqtt where mosquitto is not installed);
5. every sink: all of the above together, as in a cluster.

The Kubernetes client loads the in-cluster config, as in a pod: the fake API server serves
HTTPS, and a service account's token and CA are mounted where the client reads them, in the
daemon's own mount namespace (`unshare`). Where this machine allows no namespace, it loads a
kubeconfig instead, and says so: that adds the kubeconfig loader's OAuth modules, whose cost is
printed apart. Goal: <= 64 MiB RSS with every sink on, <= 2 millicores idle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import compile_for_daemon, daemon_env, fifo_host, start_daemon, wait
from tests.aws.conftest import reset

MIB = 1024 * 1024
# A pod's service account: its files where the kubernetes client's in-cluster loader reads them
# (/var/run/secrets/kubernetes.io/serviceaccount), in this process's own mounts only.
IN_POD = [
    "/usr/bin/unshare",
    "-rm",
    "/bin/sh",
    "-c",
    "tools=$PATH; PATH=/usr/sbin:/usr/bin:/sbin:/bin; mount -t tmpfs tmpfs /run"
    ' && mkdir -p /run/secrets/kubernetes.io && cp -r "$0" /run/secrets/kubernetes.io/'
    'serviceaccount && PATH=$tools exec "$@"',
]
HEALTH_LABEL = "sagemaker.amazonaws.com/node-health-status"
XID = "NVRM: Xid (PCI:0000:10:00): 79, pid=1234, GPU has fallen off the bus."
BASE = """
http_listen: 127.0.0.1:0
stdout_events: true
imds: "off"
cluster_name: bench
cluster_id: c1
node_group: g
instance_id: i-bench
cloudwatch: {{enabled: {cloudwatch}, flush_interval: 1s}}
"""


class Doubles:
    """The fake API server, moto and an MQTT broker, for the whole run; and what each sink
    left in them, so that a sink said to be on is seen to have done its work."""

    def __init__(self, tmp: Path, api: Any, moto: str, mqtt_port: int, pod: bool) -> None:
        from tests.aws.conftest import aws_env
        from tests.kube.conftest import kubeconfig

        self.api, self.moto, self.mqtt_port = api, moto, mqtt_port
        self.env = aws_env(moto)
        self.kube_env: dict[str, str] = {}  # the daemon's with the Kubernetes sinks on
        self.wrap: tuple[str, ...] = ()  # what the daemon's command runs under
        if pod:  # the in-cluster config, from a service account's files, as in a pod
            port = api.url.rsplit(":", 1)[1]
            self.kube_env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1"}
            self.kube_env["KUBERNETES_SERVICE_PORT"] = port
            self.wrap = (*IN_POD, str(tmp / "serviceaccount"))
            self.kubernetes = "{enabled: true}"
        else:
            self.kubernetes = f"{{enabled: true, kubeconfig: '{kubeconfig(tmp / 'kc', api.url)}'}}"

    def labelled(self, node: str) -> bool:
        """The Node's health label says the XID's verdict."""
        label = self.api.node(node)["metadata"].get("labels", {}).get(HEALTH_LABEL)
        return label not in (None, "Schedulable")

    def shipped(self) -> bool:
        """CloudWatch holds the XID line."""
        from tests.aws.conftest import logs_client

        client = logs_client(self.moto)
        for group in client.describe_log_groups()["logGroups"]:
            found = client.filter_log_events(logGroupName=group["logGroupName"])["events"]
            if any("Xid" in e["message"] for e in found):
                return True
        return False


def can_mount() -> bool:
    """Whether this machine lets a process have its own mounts (a user namespace)."""
    probe = subprocess.run([IN_POD[0], "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@contextlib.contextmanager
def services(tmp: Path) -> Iterator[Doubles]:
    import logging

    from tests.aws.conftest import moto_server
    from tests.kube.fake_api import FakeKubeAPI
    from tests.mqtt.conftest import Broker, make_certs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto: no line per request
    broker = Broker(tmp)
    broker.start()
    api, pod = FakeKubeAPI(), Path(IN_POD[0]).exists() and can_mount()
    if pod:
        account = tmp / "serviceaccount"
        account.mkdir()
        ca, cert, key = make_certs(account)
        api.use_tls(cert, key)
        shutil.copy(ca, account / "ca.crt")
        (account / "token").write_text("agent-token")
        (account / "namespace").write_text("node-health")
    try:
        with api, moto_server() as moto:
            yield Doubles(tmp, api, moto, broker.port, pod)
    finally:
        broker.stop()


@contextlib.contextmanager
def subscribed(port: int, topic: str) -> Iterator[list[bytes]]:
    """The payloads published on `topic` while inside."""
    import paho.mqtt.client as paho

    got: list[bytes] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, msg: got.append(msg.payload)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        yield got
    finally:
        client.loop_stop()
        client.disconnect()


def config(kube: bool, cloudwatch: bool, mqtt: bool, svc: Doubles) -> str:
    text = BASE.format(cloudwatch=str(cloudwatch).lower())
    if kube:
        text += f"kubernetes: {svc.kubernetes}\n"
    if mqtt:
        text += f"mqtt: {{host: 127.0.0.1, port: {svc.mqtt_port}}}\n"
    return text


def measure(
    tmp: Path, name: str, on: tuple[bool, bool, bool], svc: Doubles, seconds: float
) -> dict[str, float]:
    """The daemon's RSS and CPU once each sink that is `on` has done its work."""
    kube, cloudwatch, mqtt = on
    run = tmp / name
    run.mkdir()
    root = fifo_host(run)
    cfg = run / "config.yaml"
    cfg.write_text(config(kube, cloudwatch, mqtt, svc))
    node = f"bench-{name}"
    svc.api.add_node(node)
    reset(svc.moto)
    env = daemon_env(run, root, node) | svc.env | (svc.kube_env if kube else {})
    topic = f"node-health/bench/{node}/events"
    with subscribed(svc.mqtt_port, topic) as published:
        agent, kmsg = start_daemon(cfg, env, run / "agent.log", svc.wrap)
        try:
            log = run / "agent.log"
            wait(lambda: "first_round_done" in log.read_text(), 60, f"{name}: never started")
            os.write(kmsg, f"3,1,1000000,-;{XID}\n".encode())
            spool = run / "state" / "spool"
            wait(lambda: any(XID[:20] in p.read_text() for p in spool.glob("*.jsonl")), 30, name)
            if kube:
                wait(lambda: svc.labelled(node), 30, f"{name}: the Node was never labelled")
            if cloudwatch:
                wait(svc.shipped, 30, f"{name}: nothing reached CloudWatch")
            if mqtt:
                wait(lambda: any(b"Xid" in p for p in published), 30, f"{name}: no MQTT event")
            time.sleep(1)
            p = psutil.Process(agent.pid)
            cpu0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
            rss = []
            while time.monotonic() - t0 < seconds:
                rss.append(p.memory_info().rss)
                time.sleep(1)
            cpu = sum(p.cpu_times()[:2]) - cpu0
            return {
                "rss": rss[-1] / MIB,
                "rss_max": max(rss) / MIB,
                "millicores": 1000 * cpu / (time.monotonic() - t0),
            }
        finally:
            agent.terminate()
            agent.wait(30)
            os.close(kmsg)


def in_fresh_interpreter(code: str) -> float:
    """What `code` prints, run in a fresh interpreter that has `rss()` (its RSS in MiB)."""
    probe = (
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status')"
        " if l.startswith('VmRSS')) / 1024\n" + code
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return float(out.stdout.strip() or "nan")


def startup(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    compile_for_daemon()
    setups = {
        "local": (False, False, False),
        "+ kubernetes": (True, False, False),
        "+ cloudwatch": (False, True, False),
        "+ mqtt": (False, False, True),
        "every sink": (True, True, True),
    }
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc:
        results = {
            name: measure(Path(tmp), name.strip("+ ").replace(" ", "-"), on, svc, args.seconds)
            for name, on in setups.items()
        }
        pod = bool(svc.wrap)
    interp = in_fresh_interpreter("print(rss())")
    local = results["local"]["rss"]
    print(f"daemon RSS after {args.seconds:.0f} s idle (a bare interpreter: {interp:.1f} MiB):")
    print(f"  (Kubernetes: {'in-cluster config, as in a pod' if pod else 'a kubeconfig'})")
    for name, r in results.items():
        share = "" if name == "local" else f"  ({r['rss'] - local:+5.1f} MiB)"
        print(
            f"  {name:<13} {r['rss']:6.1f} MiB (max {r['rss_max']:5.1f}){share:<16}"
            f" {r['millicores']:5.2f} millicores"
        )
    oauth = in_fresh_interpreter(
        "from agent.kube.lean import api\napi()\nbefore = rss()\n"
        "import kubernetes.config.kube_config\nprint(rss() - before)"
    )
    print(f"  of + kubernetes, the kubeconfig loader (not loaded in a pod): {oauth:.1f} MiB")
    whole = in_fresh_interpreter("before = rss()\nimport kubernetes\nprint(rss() - before)")
    lean = in_fresh_interpreter(
        "before = rss()\nfrom agent.kube.lean import api\napi()\nprint(rss() - before)"
    )
    print(
        f"  the kubernetes package imported whole: {whole:.1f} MiB;"
        f" what the agent loads of it (agent/kube/lean.py): {lean:.1f} MiB"
    )
    every = results["every sink"]
    print(f"  goal <= 64 MiB with every sink: {'met' if every['rss'] <= 64 else 'NOT met'}")

    base = startup([sys.executable, "-c", "pass"], args.runs)
    version = startup([sys.executable, "-m", "agent", "version"], args.runs)
    listing = startup([sys.executable, "-m", "agent", "checks", "list"], args.runs)
    print(f"start-up, median of {args.runs}:")
    print(f"  python -c pass          {1000 * base:6.0f} ms (reference)")
    print(f"  node-health version     {1000 * version:6.0f} ms  ({version / base:.1f}x reference)")
    print(f"  node-health checks list {1000 * listing:6.0f} ms  ({listing / base:.1f}x reference)")


if __name__ == "__main__":
    main()
