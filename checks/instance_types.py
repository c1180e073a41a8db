"""What a healthy node of an instance type has (checks/instance_types.yaml), as data."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from importlib import resources

from checks.api import load_yaml


@dataclass(frozen=True)
class Expected:
    """None: not known, so not checked."""

    gpus: int | None = None
    gpu_model: str | None = None
    nvlinks_per_gpu: int | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    efa_devices: int | None = None
    neuron_devices: int | None = None
    allreduce_busbw: float | None = None  # GB/s, all_reduce_perf across the node's GPUs
    allreduce_bytes: int = 1 << 30  # the message size allreduce_busbw is set for


@cache
def _table() -> dict[str, Expected]:
    raw = load_yaml(resources.files("checks").joinpath("instance_types.yaml").read_text())
    return {name: Expected(**values) for name, values in raw["types"].items()}


def expected(
    instance_type: str | None, overrides: dict[str, int | float | str | None] | None = None
) -> Expected:
    """The table's values for `instance_type`, with a check's own settings over them."""
    base = _table().get(instance_type or "", Expected())
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = {f.name for f in fields(Expected)}
    return Expected(
        **(
            {f.name: getattr(base, f.name) for f in fields(Expected)}
            | {k: v for k, v in given.items() if k in known}
        )
    )
