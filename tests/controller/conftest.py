"""The fake Kubernetes API server and its kubeconfig, as for the node writer's tests."""

from tests.kube.conftest import api, kcfg

__all__ = ["api", "kcfg"]
