"""A batch's events reach CloudWatch however long its policy state takes to save: the shipper,
which reads the spool, is told once the spool holds them (the state is saved first)."""

from __future__ import annotations

import subprocess
import sys

from tests.aws.conftest import all_events, aws_env
from tests.aws.test_cloudwatch_daemon import GROUP, STREAM, identity, streams
from tests.conftest import spooled, wait_for
from tests.test_daemon import stop

CONFIG = """
checks:
  fixed: {enabled: false}
  hang: {enabled: false}
  needs: {enabled: false}
  memory: {enabled: false}
  kernel_log: {source: file}
"""
# The recorded XID 79 line (tests/fixtures/kernel/syslog).
XID = (
    "Jun 01 20:11:11 isaac-Predator-PO5-650 kernel: NVRM: Xid (PCI:0000:01:00): 79, "
    "GPU has fallen off the bus.\n"
)
# The daemon, each save of its policy state slowed to a disk's worst (an fsync of seconds).
SLOW = """
import os, runpy, sys, time

replace = os.replace


def _replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "policy-state.json":
        time.sleep(1.0)
    replace(src, dst, *args, **kwargs)


os.replace = _replace
sys.argv = ["node-health", "run", "--config", sys.argv[1]]
runpy.run_module("agent", run_name="__main__")
"""


def test_a_batch_slow_to_save_is_shipped_once_spooled(cli_env, tmp_path, moto_url):
    state = tmp_path / "state"
    kern = tmp_path / "host" / "var/log/kern.log"
    kern.parent.mkdir(parents=True, exist_ok=True)
    kern.write_text("")
    slow = tmp_path / "slow.py"
    slow.write_text(SLOW)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    # A shipper that looks soon after it is told, before the state's save is done.
    identity(str(cfg), more="")
    cfg.write_text(cfg.read_text().replace("0.2s", "0.05s"))
    argv = [sys.executable, str(slow), str(cfg)]
    proc = subprocess.Popen(argv, env=cli_env | aws_env(moto_url), stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (state / "node-state.json").exists(), 20)  # started
        with kern.open("a") as fh:
            fh.write(XID)
        wait_for(lambda: any(e.get("reason") == "XidHardwareFailure" for e in spooled(state)))
        wait_for(lambda: STREAM in streams(moto_url), 20)
        wait_for(lambda: len(all_events(moto_url, GROUP, STREAM)) == len(spooled(state)), 20)
    finally:
        stop(proc)
