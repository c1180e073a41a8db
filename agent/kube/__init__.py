"""The agent on its own Node in a cluster: the node writer, the breaker and Node events."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import Settings
    from agent.kube.client import KubeClient


def in_cluster(settings: Settings) -> bool:
    """Whether the agent writes its Node through the API server: as set, or when it runs in
    a pod (KUBERNETES_SERVICE_HOST)."""
    enabled = settings.kubernetes.enabled
    return enabled if enabled is not None else bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def connect(settings: Settings) -> KubeClient | None:
    """The API client when the agent runs against a cluster (settings, or in-cluster by
    KUBERNETES_SERVICE_HOST), else None. A cluster that cannot be reached from the settings
    given is a configuration error, never a silent fallback to the local state file."""
    from agent.config import ConfigError

    if not in_cluster(settings):
        return None
    cfg = settings.kubernetes
    from agent.kube.client import KubeClient

    try:
        return KubeClient(cfg.kubeconfig, cfg.request_timeout)
    except Exception as exc:
        where = cfg.kubeconfig or "the in-cluster service account"
        raise ConfigError(f"kubernetes: cannot load {where}: {exc}") from None
