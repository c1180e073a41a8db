"""`node-health deep-check --dry-run` on a real GPU node, with whatever of dcgmi,
all_reduce_perf and stress-ng it has (run with `pytest -m gpu`; skipped without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from checks.nvidia import nvml

pytestmark = pytest.mark.gpu


def test_deep_check_dry_run_judges_a_real_node(tmp_path) -> None:
    try:
        gpus = nvml.PynvmlBackend().snapshot().count
    except nvml.NvmlError as exc:
        pytest.skip(f"no NVIDIA GPU here: {exc}")
    env = os.environ | {"NODE_HEALTH_STATE_DIR": str(tmp_path), "NODE_HEALTH_IMDS": "off"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "deep-check",
            "--dry-run",
            "--json",
            "--force",
            "--level",
            "1",
            "--gpus",
            str(gpus),
            "--deadline",
            "15m",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    *tests, result = [json.loads(line) for line in out.stdout.splitlines()]
    ran = [t for t in tests if t["result"] != "skipped"]
    print(json.dumps(tests, indent=1))
    assert result["deep_health_check_status"] in ("Passed", "Unknown"), result["msg"]
    assert out.returncode == (0 if result["deep_health_check_status"] == "Passed" else 2)
    assert not (tmp_path / "node-state.json").exists()  # --dry-run
    assert all(t["result"] in ("passed", "unknown") for t in ran)
