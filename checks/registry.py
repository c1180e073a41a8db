"""Where checks come from: the built-ins by name, and third-party ones by entry point.

A third-party package registers a check with, in its pyproject.toml:

    [project.entry-points."node_health.checks"]
    my_check = "my_package.module:MyCheck"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from checks.api import Check

ENTRY_POINT_GROUP = "node_health.checks"

# name -> "module:Class"; imported only when used, so a disabled check costs no memory.
BUILTIN: dict[str, str] = {
    "memory": "checks.memory:MemoryCheck",
    "kernel_log": "checks.kernel_log.check:KernelLogCheck",
    "disk": "checks.disk:DiskCheck",
    "runtime": "checks.runtime:RuntimeCheck",
    "nvml": "checks.nvidia.check:NvmlCheck",
    "nvml_xid": "checks.nvidia.xid:NvmlXidCheck",
    "dcgm_health": "checks.nvidia.dcgm_health:DcgmHealthCheck",
    "efa": "checks.efa:EfaCheck",
    "link_counters": "checks.link_counters:LinkCountersCheck",
    "neuron": "checks.neuron:NeuronCheck",
    "neuron_monitor": "checks.neuron:NeuronMonitorCheck",
}


class PluginError(RuntimeError):
    """A check could not be loaded (bad entry point, not a Check, name clash)."""


def available() -> dict[str, str]:
    """Every known check name with the object reference that provides it."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:
            raise PluginError(f"entry point {ep.value!r} reuses the built-in name {ep.name!r}")
        found[ep.name] = ep.value
    return found


def load(name: str, ref: str) -> type[Check]:
    """Import the class behind `ref` ("module:Class") and check that it is a Check."""
    module_name, _, attr = ref.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"check {name!r}: cannot load {ref!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Check)):
        raise PluginError(f"check {name!r}: {ref!r} is not a subclass of checks.api.Check")
    if getattr(obj, "name", name) != name:
        raise PluginError(f"check {name!r}: {ref!r} calls itself {obj.name!r}")
    obj.name = name
    return obj
