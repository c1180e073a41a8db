"""A fake API server per test, and a kubeconfig that points the real client at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kube.fake_api import FakeKubeAPI


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: "{url}"}}
users:
- name: agent
  user: {{token: agent-token}}
contexts:
- name: fake
  context: {{cluster: fake, user: agent}}
current-context: fake
"""
    )
    return path


@pytest.fixture
def api():
    with FakeKubeAPI() as server:
        server.add_node("node-a")
        yield server


@pytest.fixture
def kcfg(api: FakeKubeAPI, tmp_path: Path) -> Path:
    return kubeconfig(tmp_path / "kubeconfig", api.url)
