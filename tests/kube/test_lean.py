"""The agent's API calls load the kubernetes client's configuration and transport, never the
package's ~900 models nor its generated API classes (about 40 MiB of RSS), and work."""

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


def test_the_client_loads_no_models_and_no_api_class(kcfg: Path, api) -> None:
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
    assert "kubernetes.client.api_client" in loaded
    assert not [m for m in loaded if m.startswith("kubernetes.client.models.")]
    assert not [m for m in loaded if m.startswith("kubernetes.client.api.")]
