"""The node's hardware identities and their history of faults and remediations.

A GPU that faults after every reboot, or a node remediated again and again, is a repeat
offender: a reboot does not fix it, and a bad GPU moved to another instance brings its faults
along. So faults and the reboots that remediated them are kept per hardware identity (GPU UUID
and serial, NIC GUID, Neuron device serial), in the host state dir where they outlive the agent
and the boot, and the policy's history rules (`agent.policy.HistoryRules`, the `history` block
of agent/policy.yaml) read them.

Findings name a GPU by its PCI address (`gpu:dddd:bb:dd`, as the kernel log's XIDs do); the
inventory maps it to the GPU's UUID and serial through NVML where NVML answers. Neuron findings
name a device by its index (`neuron:<n>`, as neuron-monitor and NEURON_HW_ERR's nd-id do); the
Neuron driver's sysfs gives its serial. Without them, a device is known by its component name
alone (still stable on one instance across reboots). The file is bounded (`MAX_DEVICES`,
`MAX_ENTRIES`) and corruption-safe: an unreadable file is moved aside with a warning, and a
failed write is logged, never a stop of the node decision.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.policy import HistoryRules, write_atomic
from checks.api import move_aside

log = structlog.get_logger("agent.hardware")

MAX_DEVICES = 64  # more than any instance has GPUs and NICs together
MAX_ENTRIES = 32  # faults, and remediations, kept per device and for the node
VERSION = 1


@dataclass
class Inventory:
    """What identifies the node's hardware: GPUs by PCI address, NICs by device name, Neuron
    devices by index."""

    gpus: dict[str, dict[str, str]] = field(default_factory=dict)  # pci -> uuid, serial
    nics: dict[str, str] = field(default_factory=dict)  # infiniband device -> node GUID
    neurons: dict[str, str] = field(default_factory=dict)  # Neuron device index -> serial

    def identity(self, component: str) -> dict[str, str]:
        """The identity of a finding's component: {kind, uuid, serial}, {kind, guid} or
        {kind, device, serial}."""
        kind, _, name = component.partition(":")
        if kind == "gpu" and name in self.gpus:
            return {"kind": "gpu", "pci": name, **self.gpus[name]}
        if kind == "neuron" and name in self.neurons:
            return {"kind": "neuron", "device": name, "serial": self.neurons[name]}
        if name in self.nics:
            return {"kind": "nic", "device": name, "guid": self.nics[name]}
        return {"kind": kind}

    def serials(self) -> list[str]:
        """Every serial, UUID and GUID on the node: what the controller's record is matched on."""
        out = [v for g in self.gpus.values() for v in (g.get("serial"), g.get("uuid")) if v]
        return sorted({*out, *self.nics.values(), *self.neurons.values()})


def read_nics(sys_root: Path) -> dict[str, str]:
    """InfiniBand/EFA devices' node GUIDs (/sys/class/infiniband/*/node_guid)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for dev in sorted((sys_root / "class/infiniband").iterdir()):
            with contextlib.suppress(OSError):
                guid = (dev / "node_guid").read_text().strip()
                if guid and guid.strip("0:"):
                    out[dev.name] = guid
    return out


# The Neuron driver's per-device sysfs (aws-neuron/aws-neuron-sdk,
# tools/neuron-sys-tools/neuron-sysfs-user-guide.rst, "Neuron Sysfs Filesystem Structure":
# `/sys/devices/virtual/neuron_device/neuron<n>/info/serial_number`, "The unique device
# identifier"; `neuron0/` is Neuron Device 0, the index neuron-ls and neuron-monitor use).
NEURON_SYSFS = "devices/virtual/neuron_device"


def read_neurons(sys_root: Path) -> dict[str, str]:
    """Neuron devices' serial numbers by device index; {} without the Neuron driver."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for dev in (sys_root / NEURON_SYSFS).iterdir():
            index = dev.name.removeprefix("neuron")
            if dev.name == index or not index.isdigit():
                continue  # neuron_core<n> and the like are not devices
            with contextlib.suppress(OSError, UnicodeDecodeError):
                serial = (dev / "info/serial_number").read_text().strip()
                if serial:
                    out[index] = serial
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def read_gpus() -> dict[str, dict[str, str]]:
    """GPUs' UUIDs and serials by PCI address through NVML; {} where NVML does not answer (no
    driver, no GPU): the history then knows GPUs by PCI address alone."""
    try:
        import pynvml as nv

        from checks.nvidia.nvml import pci_of
    except ImportError:
        return {}
    out: dict[str, dict[str, str]] = {}
    try:
        nv.nvmlInit()
    except nv.NVMLError:
        return {}
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            with contextlib.suppress(nv.NVMLError):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                pci = pci_of(_text(nv.nvmlDeviceGetPciInfo(h).busId))
                ident = {"uuid": _text(nv.nvmlDeviceGetUUID(h))}
                with contextlib.suppress(nv.NVMLError):  # GeForce has none
                    ident["serial"] = _text(nv.nvmlDeviceGetSerial(h))
                out[pci] = ident
    except nv.NVMLError:
        pass
    finally:
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class History:
    """Faults and remediations per device, and the node's remediations, in one JSON file."""

    def __init__(
        self, path: Path | None, rules: HistoryRules, inventory: Inventory, deferred: bool = False
    ) -> None:
        self.path, self.rules, self.inventory = path, rules, inventory
        # deferred: the agent writes the file, with the batch of events that changed it (take)
        self.deferred = deferred
        self._changed = False  # deferred: changed since the last take
        self.devices: dict[str, dict[str, Any]] = {}
        self.node: list[dict[str, Any]] = []  # the node's remediations
        self._held, self._unsaved = 0, False  # within `saving_once`; something to write then
        if path is not None:
            self._load(path)

    @contextlib.contextmanager
    def saving_once(self) -> Iterator[None]:
        """What is recorded within is written once, at the end: a batch's faults on many
        devices are one (fsynced) write on the loop, not one each (a storm held /healthz)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._unsaved:
                self._save()

    def key(self, component: str) -> str:
        """A device's key: its UUID (serial, GUID) where known, else the component."""
        ident = self.inventory.identity(component)
        return ident.get("uuid") or ident.get("guid") or ident.get("serial") or component

    # ---- recording -----------------------------------------------------------------------

    def fault(self, component: str, reason: str, action: str, at: float) -> None:
        dev = self._device(component, at)
        dev["faults"] = [*dev["faults"], {"ts": at, "reason": reason, "action": action}][
            -MAX_ENTRIES:
        ]
        self._save()

    def remediated(self, action: str, faults: list[tuple[str, str]], at: float) -> None:
        """The node was remediated (`action`) for `faults`, as (component, reason)."""
        self.node = [*self.node, {"ts": at, "action": action}][-MAX_ENTRIES:]
        for component, reason in faults:
            dev = self._device(component, at)
            entry = {"ts": at, "action": action, "reason": reason}
            dev["remediations"] = [*dev["remediations"], entry][-MAX_ENTRIES:]
        self._save()

    # ---- the rules -----------------------------------------------------------------------

    def replace_why(self, component: str, reason: str, at: float) -> str | None:
        """Why a reboot-class fault (`reason` on `component`) should be a replace, from the
        history: it already cost this device N reboots, or the node is a lemon."""
        n = self.rules.same_fault_reboots
        dev = self.devices.get(self.key(component))
        if n and dev is not None:
            reboots = [r for r in dev["remediations"] if r["reason"] == reason]
            if len(reboots) >= n:
                return (
                    f"{reason} on {self.key(component)} again after {len(reboots)} reboots "
                    f"(history rule: {n})"
                )
        m, window = self.rules.lemon_remediations, float(self.rules.lemon_window)
        recent = [r for r in self.node if at - r["ts"] <= window]
        if m and len(recent) + 1 >= m:
            return (
                f"{len(recent) + 1} remediations of this node within {window / 86400:g} days "
                f"(history rule: {m})"
            )
        return None

    def summary(self, at: float) -> str:
        """The node annotation: each device's identity and counts, and the node's recent
        remediations; with `serials`, which the controller matches on its replaced record."""
        window = float(self.rules.lemon_window)
        devices = []
        for key, dev in sorted(self.devices.items()):
            entry = {"id": key, **dev["identity"]}
            entry |= {"faults": len(dev["faults"]), "reboots": len(dev["remediations"])}
            if dev["faults"]:
                entry["last"] = dev["faults"][-1]["reason"]
            devices.append(entry)
        doc = {
            "serials": self.inventory.serials(),
            "devices": devices,
            "remediations": len([r for r in self.node if at - r["ts"] <= window]),
        }
        return json.dumps(doc, separators=(",", ":"))

    # ---- the file ------------------------------------------------------------------------

    def _device(self, component: str, at: float) -> dict[str, Any]:
        key = self.key(component)
        dev = self.devices.pop(key, None) or {"faults": [], "remediations": []}
        dev["identity"] = {"component": component, **self.inventory.identity(component)}
        dev["seen"] = at
        self.devices[key] = dev  # the most recently seen last
        while len(self.devices) > MAX_DEVICES:
            del self.devices[next(iter(self.devices))]
        return dev

    def take(self) -> str | None:
        """The file's new text, if it changed since the last take; None: unchanged."""
        if not self._changed:
            return None
        self._changed = False
        return self._text()

    def _text(self) -> str:
        doc = {"version": VERSION, "devices": self.devices, "node": self.node}
        return json.dumps(doc, indent=1)

    def _save(self) -> None:
        self._unsaved = bool(self._held)
        if self.path is None or self._held:
            return
        if self.deferred:  # the text is made when it is taken, once a batch
            self._changed = True
            return
        try:
            write_atomic(self.path, self._text())
        except OSError as exc:  # kept in memory; written again with the next entry
            log.error("hardware_history_save_failed", path=str(self.path), error=str(exc))

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            devices = {
                str(k): {
                    "identity": dict(v["identity"]),
                    "seen": float(v["seen"]),
                    "faults": [_entry(e) for e in v["faults"]][-MAX_ENTRIES:],
                    "remediations": [_entry(e) for e in v["remediations"]][-MAX_ENTRIES:],
                }
                for k, v in doc["devices"].items()
            }
            node = [_entry(e) for e in doc["node"]][-MAX_ENTRIES:]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = move_aside(path)
            log.warning("hardware_history_unreadable", moved_to=str(aside), error=str(exc))
            return
        self.devices = dict(sorted(devices.items(), key=lambda kv: kv[1]["seen"]))
        self.node = node


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    out = {"ts": float(e["ts"]), "action": str(e["action"])}
    if "reason" in e:
        out["reason"] = str(e["reason"])
    return out
