"""The daemon on a real broker: every event QoS 1 on the events topic, a retained status, the
last will when it dies, commands (and answers to bad ones), a broker restart mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import paho.mqtt.client as paho
import pytest

from tests.conftest import spooled, wait_for
from tests.test_daemon import faulty, start, stop
from tests.test_kernel_log_e2e import XID79, gpu_host

BASE = "node-health/train-1/node-a"


class Subscriber:
    """A plain paho client that keeps every message it gets."""

    def __init__(self, port: int, *topics: str, ca=None, auth=None) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._got
        self.client.on_connect = lambda c, *a: [c.subscribe(t, qos=1) for t in topics]
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _got(self, client, userdata, msg) -> None:
        try:
            doc = json.loads(msg.payload)
        except (ValueError, RecursionError):  # a command the test sent: not the agent's
            return
        with self.lock:
            self.messages.append((msg.topic, doc, msg.retain))

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [m for t, m, _ in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def mqtt(config: str, port: int, more: str = "") -> str:
    with open(config, "a") as f:
        f.write(
            f"cluster_name: train-1\nmqtt: {{host: 127.0.0.1, port: {port}, keepalive: 2{more}}}\n"
        )
    return config


@pytest.fixture
def sub(broker):
    s = Subscriber(broker.port, f"{BASE}/#")
    yield s
    s.close()


def test_events_status_and_last_will(cli_env, tmp_path, broker, sub):
    state = tmp_path / "state"
    proc = start(cli_env, "--config", mqtt(faulty(tmp_path), broker.port))
    wait_for(lambda: any("verdict" in e for e in sub.on(f"{BASE}/events")))
    wait_for(
        lambda: any(
            s.get("verdict") == "UnschedulablePendingReboot" for s in sub.on(f"{BASE}/status")
        )
    )
    events = sub.on(f"{BASE}/events")
    # MQTT gets a batch as it is decided, the spool once it is committed: just after
    wait_for(lambda: len(spooled(state)) >= len(events))
    assert events == spooled(state)[: len(events)]  # the same events, in order
    status = sub.on(f"{BASE}/status")[-1]
    assert status["online"] is True
    assert (
        status["labels"]["sagemaker.amazonaws.com/node-health-status"]
        == "UnschedulablePendingReboot"
    )
    assert status["checks"]["fixed"] == "fault"
    proc.send_signal(signal.SIGKILL)  # no goodbye: the broker sends the will
    proc.wait(10)
    wait_for(lambda: sub.on(f"{BASE}/status")[-1]["online"] is False, 15)
    # A subscriber that comes later gets the retained status: offline.
    late = Subscriber(broker.port, f"{BASE}/status")
    try:
        wait_for(lambda: bool(late.on(f"{BASE}/status")))
        assert late.on(f"{BASE}/status")[-1]["online"] is False
    finally:
        late.close()


def test_commands_and_answers_to_bad_ones(cli_env, tmp_path, broker, sub):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    proc = start(cli_env, "--config", mqtt(str(cfg), broker.port))
    try:
        wait_for(lambda: bool(sub.on(f"{BASE}/status")))
        sub.publish(
            f"{BASE}/cmd", json.dumps({"command": "run-check", "check": "fixed", "id": "c1"})
        )
        sub.publish("node-health/train-1/cmd", b"this is not json")  # cluster-wide, garbage
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "reboot-everything", "id": "c3"}))
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "run-check", "check": "nope"}))
        wait_for(
            lambda: len([e for e in sub.on(f"{BASE}/events") if "MQTT command" in e["msg"]]) == 5
        )
    finally:
        stop(proc)
    answers = [e for e in sub.on(f"{BASE}/events") if "MQTT command" in e["msg"]]
    by_msg = {e["msg"].split(":")[0]: e for e in answers}
    assert by_msg["MQTT command run-check accepted"]["command_id"] == "c1"
    done = by_msg["MQTT command run-check fixed done"]
    assert (done["command_id"], done["result"], done["findings_total"]) == ("c1", "ok", 1)
    assert "MQTT command refused" in by_msg
    assert by_msg["MQTT command refused"]["command"] == "this is not json"
    assert by_msg["MQTT command reboot-everything refused"]["level"] == "warn"
    assert "no check 'nope' runs here" in by_msg["MQTT command run-check refused"]["msg"]
    assert proc.returncode == 0  # nothing crashed


def test_a_broker_restart_mid_stream_loses_nothing(cli_env, tmp_path, broker, sub):
    root = gpu_host(tmp_path)
    env = cli_env | {"NODE_HEALTH_HOST_ROOT": str(root)}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n  fixed: {enabled: false}\n"
    )
    state = tmp_path / "state"
    proc = start(env, "--config", mqtt(str(cfg), broker.port))
    kmsg = os.open(root / "dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
    try:
        wait_for(lambda: bool(sub.on(f"{BASE}/status")))
        broker.stop()
        for i in range(5):  # while the broker is away
            line = XID79.replace("b9:00", f"{0x20 + i:02x}:00")
            os.write(kmsg, f"3,{900 + i},{i * 1000},-;{line}\n".encode())
        wait_for(lambda: sum("Xid" in e.get("msg", "") for e in spooled(state)) >= 5)
        sub.close()
        time.sleep(3)  # the agent backs off further: our subscriber is back before it is
        broker.start()  # same port
        again = Subscriber(broker.port, f"{BASE}/events")
        try:
            wait_for(lambda: sum("Xid" in e["msg"] for e in again.on(f"{BASE}/events")) >= 5, 40)
        finally:
            again.close()
    finally:
        os.close(kmsg)
        stop(proc)
    assert "mqtt_disconnected" in proc.stderr.read()


def test_a_deep_check_asked_for_over_mqtt_runs(cli_env, tmp_path, broker, sub):
    from tests.conftest import whole_table
    from tests.test_daemon import node_state, with_tools

    env = with_tools(cli_env, tmp_path)
    env["FAKE_DCGMI_OUTPUT"] = str(whole_table(tmp_path, "r2-3.3.1-metadata-truncated.txt"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\ndeep_check: {level: 1}\n"
    )
    state = tmp_path / "state"
    proc = start(env, "--config", mqtt(str(cfg), broker.port))
    try:
        wait_for(lambda: bool(sub.on(f"{BASE}/status")))
        sub.publish("node-health/train-1/cmd", json.dumps({"command": "deep-check", "id": "d1"}))
        deep = "sagemaker.amazonaws.com/deep-health-check-status"
        wait_for(lambda: node_state(state).get("labels", {}).get(deep) == "Passed", 30)
        wait_for(lambda: any(e["msg"].startswith("MQTT command") for e in sub.on(f"{BASE}/events")))
        # The result event reaches the subscriber on its own time, after the label may.
        wait_for(
            lambda: any(
                e.get("deep_health_check_status") == "Passed" for e in sub.on(f"{BASE}/events")
            )
        )
    finally:
        stop(proc)
    [answer] = [e for e in sub.on(f"{BASE}/events") if e["msg"].startswith("MQTT command")]
    assert answer["msg"] == "MQTT command deep-check accepted" and answer["command_id"] == "d1"


def test_with_the_job_runner_a_deep_check_over_mqtt_is_refused_and_says_why(
    cli_env, tmp_path, broker, sub
):
    """The agent's image has no tools for it: the controller runs it as a Job, asked through
    the node's annotation; the command is answered as refused, not as accepted."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\ndeep_check: {runner: job}\n"
    )
    proc = start(cli_env, "--config", mqtt(str(cfg), broker.port))
    try:
        wait_for(lambda: bool(sub.on(f"{BASE}/status")))
        sub.publish("node-health/train-1/cmd", json.dumps({"command": "deep-check", "id": "d2"}))
        wait_for(lambda: any(e["msg"].startswith("MQTT command") for e in sub.on(f"{BASE}/events")))
    finally:
        stop(proc)
    [answer] = [e for e in sub.on(f"{BASE}/events") if e["msg"].startswith("MQTT command")]
    assert answer["msg"].startswith("MQTT command deep-check refused: deep_check.runner is job")
    assert answer["level"] == "warn" and answer["command_id"] == "d2"
    assert not (tmp_path / "state" / "deep-health-check").exists()  # nothing ran here


@pytest.fixture
def secure_broker(tmp_path):
    from tests.mqtt.conftest import Broker

    b = Broker(tmp_path, users={"agent": "s3cret"}, tls=True)
    if b.kind != "mosquitto":
        pytest.skip("TLS and passwords are set up for mosquitto")
    b.start()
    yield b
    b.stop()


def test_tls_and_a_password(cli_env, tmp_path, secure_broker):
    """Over TLS (the broker's CA given), with a user and password: it connects; with a wrong
    password it does not, says why, and keeps trying."""
    ca = tmp_path / "ca.pem"
    good = tmp_path / "good.yaml"
    good.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    more = f", tls: true, ca_file: '{ca}', username: agent"
    env = cli_env | {"NODE_HEALTH_MQTT__PASSWORD": "s3cret"}
    watcher = Subscriber(secure_broker.port, f"{BASE}/status", ca=ca, auth=("agent", "s3cret"))
    proc = start(env, "--config", mqtt(str(good), secure_broker.port, more))
    try:
        wait_for(lambda: any(m["online"] for m in watcher.on(f"{BASE}/status")), 15)
    finally:
        stop(proc)
    # A clean stop says goodbye too: offline, retained.
    wait_for(lambda: watcher.on(f"{BASE}/status")[-1]["online"] is False)
    watcher.close()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text())
    env["NODE_HEALTH_MQTT__PASSWORD"] = "wrong"
    proc = start(env, "--config", mqtt(str(bad), secure_broker.port, more))
    time.sleep(3)
    stop(proc)
    err = proc.stderr.read()
    assert "mqtt_connected" not in err and "mqtt_disconnected" in err


def test_hostile_commands_are_refused_and_mqtt_goes_on(cli_env, tmp_path, broker, sub):
    """1,100 nested brackets, 1.5 MB, a "force" that is not a boolean, a long unknown command:
    each refused once, its echo cut; later commands are still answered, the status stays
    online, SIGTERM stops the agent."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n")
    proc = start(cli_env, "--config", mqtt(str(cfg), broker.port))
    answers = lambda: [e for e in sub.on(f"{BASE}/events") if "MQTT command" in e["msg"]]  # noqa: E731
    try:
        wait_for(lambda: bool(sub.on(f"{BASE}/status")))
        sub.publish(f"{BASE}/cmd", "[" * 1100 + "]" * 1100)
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "x" * 1_500_000}))
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "deep-check", "force": "yes-please"}))
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "y" * 3000, "id": "u1"}))
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "run-check", "check": "fixed"}))
        wait_for(lambda: any("run-check fixed done" in e["msg"] for e in answers()), 15)
        assert sub.on(f"{BASE}/status")[-1]["online"] is True
    finally:
        took = stop(proc)
    assert proc.returncode == 0 and took < 5
    nested, huge, force, unknown = [e for e in answers() if "refused" in e["msg"]]
    assert "nested 1100 deep" in nested["msg"] and nested["command"] == "[" * 200
    assert "1500015 bytes, more than the 4096" in huge["msg"]
    assert '"force" is true or false' in force["msg"] and force["level"] == "warn"
    assert unknown["msg"].count("y") < 200 and unknown["command_id"] == "u1"
    assert unknown["command"].startswith('{"command":"yyy') and len(unknown["command"]) < 1100
    assert all(len(json.dumps(e)) < 3000 for e in answers())  # each echoed once, cut
    assert "deep_check_requested" not in proc.stderr.read()


STATUS, CMD = "node-health/c/n/status", "node-health/c/n/cmd"


async def until(predicate, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def paho_publish(port: int, topic: str, payload: bytes) -> None:
    import paho.mqtt.publish

    paho.mqtt.publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=port)


def with_sink(port: int, status, on_command, scenario) -> None:
    """`scenario(send)` run while an MqttSink (node n, cluster c) is up; `send(payload)`
    publishes a command to it."""
    from agent.identity import Identity
    from agent.models import MqttSettings
    from agent.sinks.mqtt import MqttSink

    async def main() -> None:
        settings = MqttSettings(host="127.0.0.1", port=port, keepalive=2)
        async with MqttSink(settings, Identity("n", cluster_name="c"), status, on_command):
            await scenario(lambda p: asyncio.to_thread(paho_publish, port, CMD, p))

    asyncio.run(main())


def test_a_command_handler_that_fails_leaves_the_session_up(broker) -> None:
    watcher = Subscriber(broker.port, STATUS)
    handled: list[str] = []

    async def on_command(cmd: dict) -> None:
        handled.append(cmd["command"])
        if len(handled) == 1:
            raise RuntimeError("the agent failed on this one")

    async def scenario(send) -> None:
        await until(lambda: bool(watcher.on(STATUS)))
        await send(b'{"command":"first"}')
        await send(b'{"command":"second"}')
        await until(lambda: len(handled) == 2)

    try:
        with_sink(broker.port, dict, on_command, scenario)
    finally:
        watcher.close()
    assert handled == ["first", "second"]
    online = [s["online"] for s in watcher.on(STATUS)]
    assert online[:-1] == [True] * (len(online) - 1)  # offline only at the end, when it stops


def test_a_session_that_fails_says_offline_and_starts_again(broker) -> None:
    """Anything else failing in a session (here the agent's status): "offline" on the status
    topic, then a new session, online again, and commands are read again."""
    watcher = Subscriber(broker.port, STATUS)
    handled: list[str] = []
    calls: list[int] = []

    def status() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("status failed")
        return {}

    async def on_command(cmd: dict) -> None:
        handled.append(cmd["command"])

    async def scenario(send) -> None:
        await until(lambda: [s["online"] for s in watcher.on(STATUS)][-1:] == [True])
        await send(b'{"command":"after"}')
        await until(lambda: bool(handled))

    try:
        with_sink(broker.port, status, on_command, scenario)
    finally:
        watcher.close()
    assert [s["online"] for s in watcher.on(STATUS)][:2] == [False, True]
    assert handled == ["after"]


def test_run_check_of_the_kernel_log_reports_no_finding_twice(cli_env, tmp_path, broker, sub):
    """The kernel log's XID 43 was reported when it was read; `run-check kernel_log` answers
    with what the log holds, and reports nothing of it again."""
    from tests.conftest import FIXTURES

    (tmp_path / "host/var/log").mkdir(parents=True)
    log = tmp_path / "host/var/log/kern.log"
    log.write_bytes((FIXTURES / "kernel/faults/xid43-dra-driver.log").read_bytes())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "checks:\n  hang: {enabled: false}\n  needs: {enabled: false}\n"
        "  fixed: {enabled: false}\n  kernel_log: {source: file}\n"
    )
    proc = start(cli_env, "--config", mqtt(str(cfg), broker.port))
    xids = lambda: [  # noqa: E731
        e for e in sub.on(f"{BASE}/events") if e.get("evidence", {}).get("xid") == "43"
    ]
    try:
        wait_for(lambda: len(xids()) == 1)
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "run-check", "check": "kernel_log"}))
        wait_for(lambda: any("done" in e["msg"] for e in sub.on(f"{BASE}/events")))
        sub.publish(f"{BASE}/cmd", json.dumps({"command": "run-check", "check": "kernel_log"}))
        wait_for(lambda: sum("done" in e["msg"] for e in sub.on(f"{BASE}/events")) == 2)
    finally:
        stop(proc)
    assert len(xids()) == 1
    done = [e for e in sub.on(f"{BASE}/events") if "done" in e["msg"]]
    assert all(e["findings_total"] == 1 and e["result"] == "fault" for e in done)
    assert done[0]["findings"][0]["reason"] == "XidInformational"


def test_the_session_loop_is_supervised(broker, monkeypatch) -> None:
    """A session loop that dies outright (an error before it could catch anything) is started
    again by the supervisor behind the health endpoint, and the sink comes online."""
    from agent.identity import Identity
    from agent.models import MqttSettings
    from agent.sinks.mqtt import MqttSink
    from agent.supervise import Supervisor

    real_run = MqttSink._run
    starts: list[int] = []

    async def run(self) -> None:
        starts.append(1)
        if len(starts) == 1:
            raise RuntimeError("TLS files unreadable")
        await real_run(self)

    monkeypatch.setattr(MqttSink, "_run", run)
    watcher = Subscriber(broker.port, STATUS)
    loops = Supervisor()

    async def main() -> None:
        settings = MqttSettings(host="127.0.0.1", port=broker.port, keepalive=2)
        async with MqttSink(settings, Identity("n", cluster_name="c"), dict, _noop, loops):
            await until(lambda: bool(watcher.on(STATUS)))

    try:
        asyncio.run(main())
    finally:
        watcher.close()
    assert len(starts) == 2
    assert watcher.on(STATUS)[0]["online"] is True
    assert "mqtt" in loops.hearts


async def _noop(cmd: dict) -> None:
    return None
