"""The `kubernetes` client's configuration, transport (ApiClient) and config loaders, loaded
without the package's `__init__` files.

`import kubernetes` runs `kubernetes/__init__.py` and `kubernetes/client/__init__.py`, which
import every API group and all of the client's models: about 59 MiB of RSS on a daemon whose
whole budget is 64. The agent asks for raw JSON (`_preload_content=False`), so it never
deserializes into a model. Here each parent package is registered as an empty package over its
real directory, and only the modules the calls need are imported from it: the same code, about
18 MiB. (The generated API classes are not needed either: agent/kube/client.py sends their
requests through the ApiClient.) Where the whole package was imported already, that is used
as it is.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_PACKAGES = (
    "kubernetes",
    "kubernetes.client",
    "kubernetes.client.models",  # never filled: nothing here deserializes into a model
    "kubernetes.config",
)
# What the loaded modules take from `kubernetes.client` itself, and where it is defined.
_CLIENT_NAMES = {
    "Configuration": "kubernetes.client.configuration",
    "ApiException": "kubernetes.client.exceptions",
    "ApiClient": "kubernetes.client.api_client",
}


@functools.cache
def api() -> types.SimpleNamespace:
    """Configuration, ApiClient, ApiException and the config loaders."""
    if "kubernetes" not in sys.modules:
        _register_empty_packages()
    from kubernetes.client.api_client import ApiClient
    from kubernetes.client.configuration import Configuration
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.incluster_config import load_incluster_config

    return types.SimpleNamespace(
        Configuration=Configuration,
        ApiClient=ApiClient,
        ApiException=ApiException,
        load_incluster_config=load_incluster_config,
        load_kube_config=_load_kube_config,
    )


def _load_kube_config(**kw: Any) -> None:
    """kubeconfig files (a person's command, the tests): brings OAuth and exec plugins."""
    from kubernetes.config.kube_config import load_kube_config

    load_kube_config(**kw)


def _register_empty_packages() -> None:
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or spec.origin is None:
        raise ImportError("the kubernetes package is not installed")
    root = Path(spec.origin).parent
    for name in _PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        package.__package__ = name
        sys.modules[name] = package
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, package)
    client = sys.modules["kubernetes.client"]
    for attr, module in _CLIENT_NAMES.items():  # in this order: each needs the one before
        setattr(client, attr, getattr(importlib.import_module(module), attr))
