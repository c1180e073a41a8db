from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings, load_settings
from agent.plan import PlannedCheck
from checks.api import Check, CheckContext, PollingCheck

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
sys.path.insert(0, str(REPO))  # tests.plugins importable from subprocesses' PYTHONPATH too


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A writable copy of the kernel-doc host tree."""
    root = tmp_path / "host"
    shutil.copytree(FIXTURES / "hosts" / "kernel-doc", root)
    return root


@pytest.fixture
def settings_for(tmp_path: Path, host_root: Path):
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "host_root": host_root,
            "imds": "off",
            "http_listen": "",
            "stdout_events": False,
            "node_name": "node-a",
            "instance_type": "p5.48xlarge",
            "region": "us-west-2",
        }
        return load_settings(None, **(base | overrides))

    return make


def planned(cls: type[Check], ctx: CheckContext | None = None, **options: Any) -> PlannedCheck:
    """A check ready for the runner, as `agent.plan` would build it."""
    opts = cls.Options.model_validate(options) if cls.Options is not None else None
    check = cls(ctx or CheckContext(), opts)
    interval = cls.interval if isinstance(check, PollingCheck) else None
    return PlannedCheck(cls.name, True, check, interval, cls.timeout)


SAMPLE_ENTRY_POINTS = """\
[node_health.checks]
fixed = tests.plugins.sample_checks:FixedCheck
hang = tests.plugins.sample_checks:HangCheck
needs = tests.plugins.sample_checks:NeedsCheck
broken = tests.plugins.no_such_module:Missing
"""


@pytest.fixture
def cli_env(tmp_path: Path, host_root: Path) -> dict[str, str]:
    """Environment for `python -m agent` with the sample checks installed as a plugin package
    (a dist-info with entry points on PYTHONPATH, as pip would leave it)."""
    import os

    site = tmp_path / "site"
    dist = site / "sample_checks-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sample-checks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(SAMPLE_ENTRY_POINTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_HEALTH_")}
    env.update(
        PYTHONPATH=f"{site}{os.pathsep}{REPO}",
        NODE_HEALTH_STATE_DIR=str(tmp_path / "state"),
        NODE_HEALTH_HOST_ROOT=str(host_root),
        NODE_HEALTH_IMDS="off",
        NODE_HEALTH_HTTP_LISTEN="",
        NODE_HEALTH_NODE_NAME="node-a",
        PATH=str(tmp_path / "no-tools"),  # no host tool (journalctl, dcgmi) leaks into a test
    )
    return env


def spooled(state_dir: Path) -> list[dict]:
    """The events a daemon spooled under `state_dir`, oldest first."""
    import json

    lines = [
        json.loads(line)
        for seg in sorted((state_dir / "spool").glob("*.jsonl"))
        for line in seg.read_text().splitlines()
    ]
    return [e for e in lines if "checkpoint" not in e]  # where checks resume: not events


def wait_for(predicate, timeout: float = 10.0) -> float:
    """Poll until `predicate()` holds; the seconds it took."""
    import time

    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - start


def whole_table(tmp_path: Path, name: str) -> Path:
    """A quoted dcgmi table that ends at a row's value, with the rest of that row and the
    table's closing border (its first line) that dcgmi prints after it."""
    text = (REPO / "tests" / "fixtures" / "dcgm" / name).read_text().rstrip("\n")
    end = "" if text.endswith("|") else " |" if "|" in text.splitlines()[-1][1:] else ""
    closing = (
        (REPO / "tests" / "fixtures" / "dcgm" / "deployment-row-remap-pending.txt")
        .read_text()
        .split("\n")[0]
    )
    path = tmp_path / name
    path.write_text(text + end + "\n" + closing + "\n")
    return path
