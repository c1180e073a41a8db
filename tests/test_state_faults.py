"""The daemon when its state directory fails it: the node decision is still written, the
failure is logged and counted, and SIGTERM still exits 0."""

from __future__ import annotations

import json

from tests.conftest import spooled, wait_for
from tests.test_daemon import LABEL, _answers, faulty, free_port, get, start, stop


def test_a_policy_state_that_cannot_be_saved_never_holds_the_node_state(cli_env, tmp_path):
    state = tmp_path / "state"
    (state / ".policy-state.json.tmp").mkdir(parents=True)  # every save of it fails
    port = free_port()
    env = cli_env | {"NODE_HEALTH_HTTP_LISTEN": f"127.0.0.1:{port}"}
    proc = start(env, "--config", faulty(tmp_path, action="replace"))
    try:
        wait_for(lambda: (state / "node-state.json").exists())
        wait_for(lambda: any("verdict" in e for e in spooled(state)))
        wait_for(lambda: _answers(port))
        failed = 'node_health_state_save_errors_total{file="policy-state"}'
        wait_for(lambda: failed in get(f"http://127.0.0.1:{port}/metrics")[1])  # in a thread
    finally:
        assert stop(proc) < 10
    assert proc.returncode == 0
    node = json.loads((state / "node-state.json").read_text())
    assert node["labels"][LABEL] == "UnschedulablePendingReplacement"
    assert "policy_state_save_failed" in proc.stderr.read()
    assert not (state / "policy-state.json").exists()
