"""SIGTERM stops the daemon (a real process) within its stop budget with exit 0, whatever is
down: the API server, only its Events endpoint, CloudWatch (refusing or unreachable), a hung
file, a kernel-log backlog, a tool whose `setsid` child holds its pipe. What could not be sent
is still in the spool; the MQTT offline status is published on the way out.

The stop budget is cut to STOP seconds here, so the daemon's own deadline is what ends each
stop. `benchmarks/stop.py` runs these with the default budget (TEST_STOP_TIMEOUT) and collects
each stop's time (TEST_STOP_TIMES, a file)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aws.conftest import aws_env, moto_server
from tests.aws.proxy import LogsProxy
from tests.conftest import spooled, wait_for
from tests.kube.conftest import kubeconfig
from tests.kube.fake_api import FakeKubeAPI
from tests.test_daemon import faulty, free_port, start
from tests.test_proc import alive

STOP = float(os.environ.get("TEST_STOP_TIMEOUT", "3"))  # NODE_HEALTH_STOP_TIMEOUT here
EXIT_MARGIN = 2.0  # the interpreter's own exit after agent_stopped
BIN = Path(__file__).parent / "bin"
HEALTH = "sagemaker.amazonaws.com/node-health-status"


def sigterm(proc: subprocess.Popen) -> float:
    """SIGTERM, then the seconds until the process exited (it is killed past 60)."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return float("inf")
    return time.monotonic() - began


def stopped_in_time(proc: subprocess.Popen) -> str:
    took = sigterm(proc)
    err = proc.stderr.read()
    if times := os.environ.get("TEST_STOP_TIMES"):
        with open(times, "a") as f:
            test = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
            f.write(json.dumps({"test": test, "seconds": round(took, 2)}) + "\n")
    assert took < STOP + EXIT_MARGIN, f"took {took:.1f}s to stop: {err[-3000:]}"
    assert proc.returncode == 0, err[-3000:]
    assert "agent_stopped" in err
    return err


def verdict_spooled(state: Path) -> bool:
    return any("verdict" in e for e in spooled(state))


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env | {"NODE_HEALTH_STOP_TIMEOUT": f"{STOP}s"}


def in_cluster(config: str, kcfg: Path) -> str:
    with open(config, "a") as f:
        f.write(f"kubernetes: {{enabled: true, kubeconfig: '{kcfg}', request_timeout: 30s}}\n")
    return config


def test_api_server_down(env, tmp_path):
    """No API server (the port refuses): node writes and Events retry, and the stop does not
    wait for them."""
    kcfg = kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    proc = start(env, "--config", in_cluster(faulty(tmp_path), kcfg))
    wait_for(lambda: verdict_spooled(tmp_path / "state"), 20)
    time.sleep(0.5)  # the Events are being retried
    err = stopped_in_time(proc)
    assert "node_events_not_posted" in err
    assert verdict_spooled(tmp_path / "state")


def test_events_endpoint_hanging(env, tmp_path):
    """Only Event POSTs hang (the rest of the API answers): the last try is cut short."""
    with FakeKubeAPI() as api:
        api.add_node("node-a")
        api.fail("POST", r"/api/v1/namespaces/[^/]+/events", 0, times=1000, delay=120)
        kcfg = kubeconfig(tmp_path / "kubeconfig", api.url)
        proc = start(env, "--config", in_cluster(faulty(tmp_path), kcfg))
        wait_for(lambda: api.node("node-a")["metadata"]["labels"].get(HEALTH) is not None, 20)
        wait_for(lambda: api.requests("POST", r"/api/v1/namespaces/[^/]+/events"), 20)
        err = stopped_in_time(proc)
    assert "node_events_not_posted" in err
    assert verdict_spooled(tmp_path / "state")


def cloudwatch(config: str) -> str:
    with open(config, "a") as f:
        f.write(
            "cluster_name: train-1\ncluster_id: abc123\nnode_group: gpu-workers\n"
            "instance_id: i-0123456789abcdef0\n"
            "cloudwatch: {flush_interval: 0.2s, request_timeout: 30s}\n"
        )
    return config


@contextlib.contextmanager
def refusing(fault: str) -> Iterator[tuple[dict[str, str], LogsProxy]]:
    """CloudWatch (moto behind the fault proxy) answering every PutLogEvents with `fault`."""
    with moto_server() as url, LogsProxy(url) as proxy:
        proxy.faults.extend([fault] * 100_000)
        yield aws_env(proxy.url), proxy


@pytest.mark.parametrize("fault", ["503", "denied", "expired", "hold:120"])
def test_cloudwatch_refusing_or_hanging(env, tmp_path, fault):
    with refusing(fault) as (aws, proxy):
        proc = start(env | aws, "--config", cloudwatch(faulty(tmp_path)))
        wait_for(lambda: verdict_spooled(tmp_path / "state"))
        wait_for(lambda: len(proxy.faults) < 100_000, 20)  # it tried, and was refused
        stopped_in_time(proc)
    cursor = tmp_path / "state" / "cloudwatch.cursor"
    assert not cursor.exists() or json.loads(cursor.read_text())["offset"] == 0  # all unsent
    assert verdict_spooled(tmp_path / "state")  # and still there for the next start


@pytest.mark.parametrize("why", ["refused", "no credentials"])
def test_cloudwatch_unreachable(env, tmp_path, why):
    aws = aws_env(f"http://127.0.0.1:{free_port()}")  # nobody listens there
    if why == "no credentials":
        aws = {k: v for k, v in aws.items() if not k.startswith("AWS_")} | {
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
        }
    base = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    proc = start(base | aws, "--config", cloudwatch(faulty(tmp_path)))
    wait_for(lambda: verdict_spooled(tmp_path / "state"))
    time.sleep(1.0)  # the shipper is retrying
    stopped_in_time(proc)
    assert verdict_spooled(tmp_path / "state")


def test_a_worker_thread_stuck_reading_a_hung_file(env, tmp_path, host_root):
    """/proc/meminfo a FIFO nobody writes: the memory check's thread blocks in open() for
    ever; the process exits all the same."""
    meminfo = host_root / "proc/meminfo"
    meminfo.unlink()
    os.mkfifo(meminfo)
    proc = start(env, "--config", faulty(tmp_path))
    wait_for(lambda: verdict_spooled(tmp_path / "state"))
    time.sleep(0.5)  # the memory check is in its read
    stopped_in_time(proc)


def test_a_kernel_log_backlog(env, tmp_path, host_root):
    """A boot's worth of kernel records to read (here /dev/kmsg a plain file): the stop comes
    between two of them, and the position reached is kept for the next start."""
    (host_root / "dev").mkdir(exist_ok=True)
    (host_root / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (host_root / "proc/sys/kernel/random/boot_id").write_text("backlog-boot\n")
    xid = "NVRM: Xid (PCI:0000:b9:00): 13, Graphics SM Warp Exception on (GPC 0, TPC 0)"
    records = 400_000
    with (host_root / "dev/kmsg").open("w") as f:
        f.writelines(f"4,{seq},{seq * 1000},-;{xid}\n" for seq in range(1, records + 1))
    cfg = tmp_path / "kmsg.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    state = tmp_path / "state"
    proc = start(env, "--config", str(cfg))
    wait_for(lambda: (state / "kernel-log.json").exists(), 30)  # reading the backlog
    stopped_in_time(proc)
    seq = json.loads((state / "kernel-log.json").read_text())["kmsg_seq"]
    assert 0 < seq < records  # stopped part way; the next start resumes after `seq`


def test_a_tool_whose_setsid_child_holds_its_pipe(env, tmp_path):
    """fi_info (the EFA check's) hangs with a child in a session of its own holding stdout:
    the stop kills both and does not wait for the pipe."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "fi_info").symlink_to(BIN / "fake-tool")
    pidfile = tmp_path / "child.pid"
    tool_env = env | {
        "PATH": str(tools),
        "FAKE_FI_INFO_MODE": "setsid-hang",
        "FAKE_FI_INFO_PIDFILE": str(pidfile),
    }
    proc = start(tool_env, "--config", faulty(tmp_path))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20)
    child = int(pidfile.read_text())
    err = stopped_in_time(proc)
    assert "Event loop is closed" not in err
    wait_for(lambda: not alive(child), 5)


def test_offline_is_published_while_cloudwatch_is_unreachable(env, tmp_path):
    from tests.mqtt.conftest import Broker
    from tests.mqtt.test_mqtt_daemon import BASE, Subscriber

    broker = Broker(tmp_path)
    broker.start()
    try:
        watcher = Subscriber(broker.port, f"{BASE}/status")
        aws = aws_env(f"http://127.0.0.1:{free_port()}")
        cfg = cloudwatch(faulty(tmp_path))  # (cluster train-1, as BASE says)
        with open(cfg, "a") as f:
            f.write(f"mqtt: {{host: 127.0.0.1, port: {broker.port}, keepalive: 2}}\n")
        proc = start(env | aws, "--config", cfg)
        wait_for(lambda: any(m["online"] for m in watcher.on(f"{BASE}/status")), 20)
        stopped_in_time(proc)
        wait_for(lambda: watcher.on(f"{BASE}/status")[-1]["online"] is False)
        watcher.close()
    finally:
        broker.stop()


def test_run_once_exits_with_a_check_stuck_in_a_hung_read(env, tmp_path, host_root):
    """`run --once`: the stuck check times out (unknown, exit 2) and the process ends, its
    thread still in the read."""
    meminfo = host_root / "proc/meminfo"
    meminfo.unlink()
    os.mkfifo(meminfo)
    cfg = tmp_path / "once.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  memory: {timeout: 1s}\n")
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--once", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    timeouts = [json.loads(line) for line in out.stdout.splitlines() if "CheckTimeout" in line]
    assert [e["check"] for e in timeouts] == ["memory"]
