"""The agent's API calls load the kubernetes client's transport and its three API classes,
never the package's ~900 models nor the other API groups (about 38 MiB of RSS), and work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PROBE = """
import json, sys
from agent.kube.client import KubeClient
client = KubeClient(kubeconfig=sys.argv[1])
node = client.get_node("node-a")
client.patch_node("node-a", {"metadata": {"labels": {"x": "y"}}}, "application/merge-patch+json")
loaded = sorted(m for m in sys.modules if m.startswith("kubernetes"))
print(json.dumps({"node": node["metadata"]["name"], "loaded": loaded}))
"""


def test_the_client_loads_no_models_and_no_other_api_group(kcfg: Path, api) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(kcfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["node"] == "node-a"
    assert api.node("node-a")["metadata"]["labels"]["x"] == "y"
    loaded = seen["loaded"]
    assert "kubernetes.client.api.core_v1_api" in loaded
    assert not [m for m in loaded if m.startswith("kubernetes.client.models.")]
    apis = {m for m in loaded if m.startswith("kubernetes.client.api.")}
    assert apis == {
        "kubernetes.client.api.core_v1_api",
        "kubernetes.client.api.coordination_v1_api",
        "kubernetes.client.api.custom_objects_api",
    }
